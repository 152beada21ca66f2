"""CIFAR-10 with one of the paper's ten networks and its large-batch recipe (Sec. 4.1).

    horovodrun -np 4 python examples/cifar10_large_batch.py --data-dir ~/data --model resnet18 \
        --batch-size 512 --lr 0.1 --base-batch 1024 --warmup-epochs 5 --epochs 320 --decay-epochs 160,240

The recipe: linear scaling (peak lr = lr x total batch / base batch; the paper uses 0.1 at 1024 up to 0.8
at 8192), linear warm-up to the peak, step decay by 10x. Compare with ``--algorithm ssgd``. The paper's
runs use 16 learners; CIFAR-10 must be in ``--data-dir`` (torchvision layout; ``--download`` fetches it).
``--fake-data`` trains on torchvision's FakeData instead (random images; for smoke tests only).
"""

import argparse
import math
import time

import torch
import torch.nn.functional as F
import horovod.torch as hvd

import horovod_dpsgd
from horovod_dpsgd.checkpoint import average_model
from horovod_dpsgd.experiments.data import cifar10
from horovod_dpsgd.experiments.models import get_model
from horovod_dpsgd.experiments.recipes import lr_multiplier, scaled_lr

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--model", default="resnet18", help="one of horovod_dpsgd.experiments.models.MODEL_NAMES")
parser.add_argument("--algorithm", default="dpsgd", choices=horovod_dpsgd.ALGORITHMS)
parser.add_argument("--topology", default="random_peer", help="the paper's setting: a random peer per step")
parser.add_argument("--batch-size", type=int, default=128, help="per learner")
parser.add_argument("--lr", type=float, default=0.1, help="lr at --base-batch")
parser.add_argument("--base-batch", type=int, default=1024)
parser.add_argument("--warmup-epochs", type=float, default=5.0)
parser.add_argument("--epochs", type=int, default=320)
parser.add_argument("--decay-epochs", default="160,240")
parser.add_argument("--max-steps", type=int, default=None, help="stop after this many steps")
parser.add_argument("--data-dir", default=None)
parser.add_argument("--download", action="store_true")
parser.add_argument("--fake-data", action="store_true", help="random FakeData images (smoke tests only)")
parser.add_argument("--seed", type=int, default=0)


def main():
    args = parser.parse_args()
    hvd.init()
    torch.manual_seed(args.seed)
    if args.fake_data:
        import torchvision
        fake = dict(image_size=(3, 32, 32), num_classes=10, transform=torchvision.transforms.ToTensor())
        train_set = torchvision.datasets.FakeData(size=64 * hvd.size(), **fake)
        test_set = torchvision.datasets.FakeData(size=64, random_offset=1, **fake)
    else:
        train_set, test_set = cifar10(args.data_dir or "data", download=args.download)
    sampler = torch.utils.data.distributed.DistributedSampler(train_set, hvd.size(), hvd.rank(), seed=args.seed,
                                                              drop_last=True)
    loader = torch.utils.data.DataLoader(train_set, batch_size=args.batch_size, sampler=sampler, drop_last=True)
    test_loader = torch.utils.data.DataLoader(torch.utils.data.Subset(test_set, range(hvd.rank(), len(test_set),
                                                                                      hvd.size())), batch_size=256)

    model = get_model(args.model)
    peak = scaled_lr(args.lr, args.batch_size * hvd.size(), args.base_batch, linear_scaling=True)
    optimizer = torch.optim.SGD(model.parameters(), lr=peak, momentum=0.9, weight_decay=5e-4)
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    optimizer = horovod_dpsgd.DistributedOptimizer(optimizer, named_parameters=model.named_parameters(),
                                                   algorithm=args.algorithm, topology=args.topology, seed=args.seed)
    decay = [float(e) for e in args.decay_epochs.split(",") if e]
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_multiplier(len(loader), min(1.0, args.lr / peak), args.warmup_epochs, decay))
    if hvd.rank() == 0:
        print(f"{args.model} ({sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters), {args.algorithm}, "
              f"total batch {args.batch_size * hvd.size()}, peak lr {peak:g}", flush=True)
    max_steps = args.max_steps or math.inf
    for epoch in range(args.epochs):
        sampler.set_epoch(epoch)
        start = time.time()
        for data, target in loader:
            optimizer.zero_grad()
            loss = F.cross_entropy(model(data), target)
            loss.backward()
            optimizer.step()
            scheduler.step()
            if optimizer.step_count >= max_steps:
                break
        evaluated = average_model(model).eval()
        correct = torch.zeros(2)
        with torch.no_grad():
            for data, target in test_loader:
                correct += torch.tensor([(evaluated(data).argmax(1) == target).sum().item(), len(target)])
        correct = hvd.allreduce(correct, op=hvd.Sum, name="test_accuracy")
        if hvd.rank() == 0:
            print(f"epoch {epoch + 1}: train loss {loss.item():.4f}  test accuracy {100 * correct[0] / correct[1]:.2f}%"
                  f"  lr {optimizer.param_groups[0]['lr']:.4g}  ({time.time() - start:.0f} s)", flush=True)
        if optimizer.step_count >= max_steps:
            break


if __name__ == "__main__":
    main()
