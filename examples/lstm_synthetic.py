"""The paper's acoustic model, a 6-layer bidirectional LSTM, on SYNTHETIC sequences.

Switchboard (SWB-300/2000) is not public, so this trains on a synthetic sequence-classification
set (class-dependent trajectories plus noise; horovod_dpsgd.experiments.data.synthetic_sequences). It shows the
plugin on a recurrent model and the paper's ASR recipe (warm-up to a linearly scaled lr, then
annealing); its accuracies say nothing about speech recognition.

    horovodrun -np 4 python examples/lstm_synthetic.py --epochs 5
"""

import argparse

import torch
import torch.nn.functional as F
import horovod.torch as hvd

import horovod_dpsgd
from horovod_dpsgd.checkpoint import average_model
from horovod_dpsgd.experiments.data import synthetic_sequences
from horovod_dpsgd.experiments.models import get_model
from horovod_dpsgd.experiments.recipes import lr_multiplier, scaled_lr

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--algorithm", default="dpsgd", choices=horovod_dpsgd.ALGORITHMS)
parser.add_argument("--topology", default="random_peer")
parser.add_argument("--batch-size", type=int, default=32, help="per learner")
parser.add_argument("--lr", type=float, default=0.1, help="lr at --base-batch (the paper: 0.1 at 256)")
parser.add_argument("--base-batch", type=int, default=256)
parser.add_argument("--warmup-epochs", type=float, default=1.0)
parser.add_argument("--epochs", type=int, default=5)
parser.add_argument("--samples", type=int, default=2048)
parser.add_argument("--hidden", type=int, default=64, help="LSTM hidden size (small: this runs on CPUs)")
parser.add_argument("--seed", type=int, default=0)


def main():
    args = parser.parse_args()
    hvd.init()
    torch.manual_seed(args.seed)
    train_set, test_set = synthetic_sequences(num_samples=args.samples, seed=args.seed)
    sampler = torch.utils.data.distributed.DistributedSampler(train_set, hvd.size(), hvd.rank(), seed=args.seed,
                                                              drop_last=True)
    loader = torch.utils.data.DataLoader(train_set, batch_size=args.batch_size, sampler=sampler, drop_last=True)
    model = get_model("lstm", input_dim=train_set.tensors[0].shape[-1], hidden_size=args.hidden, num_classes=10)
    peak = scaled_lr(args.lr, args.batch_size * hvd.size(), args.base_batch, linear_scaling=True)
    optimizer = torch.optim.SGD(model.parameters(), lr=peak, momentum=0.9)
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    optimizer = horovod_dpsgd.DistributedOptimizer(optimizer, named_parameters=model.named_parameters(),
                                                   algorithm=args.algorithm, topology=args.topology, seed=args.seed)
    # Warm up to the scaled lr, then anneal by 1/sqrt(2) per epoch (the paper anneals over its last 10 epochs).
    warmup = lr_multiplier(len(loader), min(1.0, args.lr / peak), args.warmup_epochs)

    def schedule(step: int) -> float:
        return warmup(step) * 0.5 ** (max(0.0, step / len(loader) - args.warmup_epochs) / 2)

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    x_test, y_test = test_set.tensors
    for epoch in range(args.epochs):
        sampler.set_epoch(epoch)
        for data, target in loader:
            optimizer.zero_grad()
            loss = F.cross_entropy(model(data), target)
            loss.backward()
            optimizer.step()
            scheduler.step()
        with torch.no_grad():
            heldout = F.cross_entropy(average_model(model).eval()(x_test), y_test).item()
        if hvd.rank() == 0:
            print(f"epoch {epoch + 1}: train loss {loss.item():.4f}  held-out loss {heldout:.4f}  "
                  f"lr {optimizer.param_groups[0]['lr']:.4g}", flush=True)


if __name__ == "__main__":
    main()
