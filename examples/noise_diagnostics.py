"""The paper's noise diagnostics live in TensorBoard: the README example plus two callbacks.

    horovodrun -np 4 python examples/noise_diagnostics.py --log-dir runs/diagnostics
    tensorboard --logdir runs/diagnostics

Logs alpha_e, alpha_e / alpha, Delta, Delta^(2) and the consensus distance every
``--diag-every`` steps (paper Sec. 2, Eq. 3-4; see docs/diagnostics.md). ``--noise-sigma`` adds the
Gaussian weight noise of the paper's SSGD* (use it with ``--algorithm ssgd``).
"""

import argparse

import torch
import torch.nn.functional as F
import horovod.torch as hvd

import horovod_dpsgd
from horovod_dpsgd.experiments.data import mnist_sample
from horovod_dpsgd.experiments.models import get_model

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--algorithm", default="dpsgd", choices=horovod_dpsgd.ALGORITHMS)
parser.add_argument("--topology", default="ring", help="DPSGD topology")
parser.add_argument("--batch-size", type=int, default=500, help="per learner (the paper's Sec. 2 uses nB = 2000)")
parser.add_argument("--lr", type=float, default=1.0, help="the paper's large learning rate alpha = 1")
parser.add_argument("--steps", type=int, default=400)
parser.add_argument("--diag-every", type=int, default=10)
parser.add_argument("--noise-sigma", type=float, default=0.0, help="Gaussian weight noise (SSGD*); 0: off")
parser.add_argument("--log-dir", default="runs/diagnostics")
parser.add_argument("--seed", type=int, default=0)


def main():
    args = parser.parse_args()
    hvd.init()
    torch.manual_seed(args.seed)
    torch.set_num_threads(1)
    train_set, test_set = mnist_sample()
    sampler = torch.utils.data.distributed.DistributedSampler(train_set, hvd.size(), hvd.rank(), seed=args.seed,
                                                              drop_last=True)
    loader = torch.utils.data.DataLoader(train_set, batch_size=args.batch_size, sampler=sampler, drop_last=True)
    # The probe estimates g = grad L(w_a), the gradient of the training loss: a fixed sample of the training
    # set, the same on every rank.
    probe_order = torch.utils.data.RandomSampler(train_set, generator=torch.Generator().manual_seed(args.seed))
    probe = list(torch.utils.data.DataLoader(train_set, batch_size=args.batch_size, sampler=probe_order))[:2]

    model = get_model("mlp")
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    diagnostics = horovod_dpsgd.NoiseDiagnostics(model, F.cross_entropy, probe, every=args.diag_every,
                                                 log_dir=args.log_dir)
    callbacks = [diagnostics]
    if args.noise_sigma:
        callbacks.append(horovod_dpsgd.GaussianNoise(args.noise_sigma, seed=args.seed))
    optimizer = horovod_dpsgd.DistributedOptimizer(
        torch.optim.SGD(model.parameters(), lr=args.lr), named_parameters=model.named_parameters(),
        algorithm=args.algorithm, topology=args.topology, callbacks=callbacks, seed=args.seed)

    epoch = 0
    while optimizer.step_count < args.steps:
        sampler.set_epoch(epoch)
        for data, target in loader:
            optimizer.zero_grad()
            loss = F.cross_entropy(model(data), target)
            loss.backward()
            diagnostics.observe(data, target, loss)   # references only; used on diagnostic steps
            optimizer.step()
            if diagnostics.last.get("step") == optimizer.step_count and hvd.rank() == 0:
                d = diagnostics.last
                print(f"step {optimizer.step_count}: loss {d['loss']:.4f}  alpha_e/alpha {d['alpha_e_over_alpha']:.3f}"
                      f"  Delta {d['delta']:.3g}  Delta2 {d['delta2']:.3g}  consensus {d['consensus_distance']:.3g}", flush=True)
            if optimizer.step_count >= args.steps:
                break
        epoch += 1
    diagnostics.close()
    if hvd.rank() == 0:
        print(f"TensorBoard logs in {args.log_dir}: tensorboard --logdir {args.log_dir}")


if __name__ == "__main__":
    main()
