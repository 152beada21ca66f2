"""Soak: many DPSGD steps of a small model; resident memory must not grow.

    horovodrun -np 2 python benchmarks/soak.py --steps 10000

Every rank samples its resident set size (from /proc/self/statm) every ``--every`` steps; rank 0
prints the growth after warm-up (the first ``--warmup`` steps) of the worst rank and writes the
samples to ``--out``. Not part of the test suite (it takes minutes).
"""

import argparse
import json
import os
import time

import torch
import torch.nn.functional as F
import horovod.torch as hvd

import horovod_dpsgd
from horovod_dpsgd.experiments.models import get_model


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10_000)
    parser.add_argument("--warmup", type=int, default=500)
    parser.add_argument("--every", type=int, default=250)
    parser.add_argument("--topology", default="random_peer")
    parser.add_argument("--out", default="benchmarks/results/soak.json")
    args = parser.parse_args()
    hvd.init()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = get_model("mlp")
    optimizer = horovod_dpsgd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9),
                                                   named_parameters=model.named_parameters(), topology=args.topology)
    data, target = torch.randn(64, 784), torch.randint(0, 10, (64,))
    samples, start = [], time.time()
    for step in range(1, args.steps + 1):
        optimizer.zero_grad()
        F.cross_entropy(model(data), target).backward()
        optimizer.step()
        if step % args.every == 0:
            samples.append((step, rss_mib()))
    worst = max(hvd.allgather_object(samples), key=lambda s: max(r for t, r in s if t > args.warmup) /
                min(r for t, r in s if t >= args.warmup))
    after = [r for t, r in worst if t >= args.warmup]
    growth = after[-1] / after[0] - 1
    if hvd.rank() == 0:
        result = {"steps": args.steps, "np": hvd.size(), "topology": args.topology, "seconds": time.time() - start,
                  "rss_mib_after_warmup": after[0], "rss_mib_end": after[-1], "growth": growth,
                  "samples_worst_rank": worst}
        os.makedirs(os.path.dirname(args.out), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
        print(f"{args.steps} steps in {result['seconds']:.0f} s; resident memory of the worst rank after "
              f"{args.warmup} warm-up steps: {after[0]:.1f} MiB -> {after[-1]:.1f} MiB ({100 * growth:+.2f} %)",
              flush=True)


if __name__ == "__main__":
    main()
