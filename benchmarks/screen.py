"""Cost of the non-finite weights check (horovod_dpsgd.comm.screen) against the mix it guards, side by side.

    python benchmarks/screen.py [--models mlp1m,resnet18,resnet50] [--reps 15] [--batch-size 8] [--threads 1]

One process, the models and 32x32 inputs of benchmarks/step_time.py. For each model, each repetition times, in
turn on the same flat buffers: the mix of a ring step (own weights and 2 received buffers: mul + 2 adds), the mix
of a random-peer step (one lerp), the check of a ring step and of a random-peer step with nonfinite="raise" (one
sum per received buffer: 2 and 1) and "skip" (own weights too: 3 and 2), and a forward/backward pass at
--batch-size samples. Prints medians and the per-repetition ratios
check / mix and check / forward-backward (quartiles), so that a noisy machine shows in the spread.
"""

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.step_time import MODELS  # noqa: E402
from horovod_dpsgd.comm.buffers import FlatParameters  # noqa: E402
from horovod_dpsgd.comm.screen import WeightScreen  # noqa: E402
from horovod_dpsgd.topology import MixingPlan  # noqa: E402


def timed(fn, inner):
    start = time.perf_counter()
    for _ in range(inner):
        fn()
    return (time.perf_counter() - start) / inner * 1e3  # ms


def quartiles(values):
    q1, median, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return f"{median:.3f} [{q1:.3f}, {q3:.3f}]"


def bench(name, reps, batch_size):
    model = MODELS[name]()
    (group,) = FlatParameters(list(model.parameters())).groups
    received = [group.flat.clone() + 0.01 * k for k in (1, 2)]
    raise_, skip = WeightScreen("raise", rank=0), WeightScreen("skip", rank=0)
    ring, peer = MixingPlan(1 / 3, (1, 2), (1 / 3, 1 / 3)), MixingPlan(0.5, (1,), (0.5,))
    data, target = torch.randn(batch_size, 3, 32, 32), torch.randint(0, 10, (batch_size,))

    def fwd_bwd():
        model.zero_grad()
        torch.nn.functional.cross_entropy(model(data), target).backward()

    ways = {
        "mix ring": lambda: group.mix(ring.self_weight, list(zip(ring.peer_weights, received))),
        "mix random peer": lambda: group.mix(peer.self_weight, list(zip(peer.peer_weights, received[:1]))),
        "check ring": lambda: raise_.weights(ring, [group.flat], [received], step=0),
        "check random peer": lambda: raise_.weights(peer, [group.flat], [received[:1]], step=0),
        "check ring, skip": lambda: skip.weights(ring, [group.flat], [received], step=0),
        "check random peer, skip": lambda: skip.weights(peer, [group.flat], [received[:1]], step=0),
        "forward/backward": fwd_bwd,
    }
    inner = {k: (2 if k == "forward/backward" else 20) for k in ways}
    for k, fn in ways.items():  # warm-up
        timed(fn, 2)
    got = {k: [] for k in ways}
    for _ in range(reps):
        for k, fn in ways.items():
            got[k].append(timed(fn, inner[k]))
    numel = group.numel
    print(f"\n{name}: {numel / 1e6:.2f} M parameters ({numel * 4 / 2**20:.0f} MiB), batch {batch_size}, "
          f"{reps} repetitions, median [quartiles]")
    for k, v in got.items():
        print(f"  {k:20s} {quartiles(v)} ms")
    for topo in ("ring", "random peer"):
        for policy in ("", ", skip"):
            check, what = got[f"check {topo}{policy}"], f"{topo}{policy}"
            print(f"  check / mix, {what:17s}      {quartiles([c / m for c, m in zip(check, got[f'mix {topo}'])])}")
            print(f"  check / fwd+bwd, {what:17s}  "
                  f"{quartiles([c / s for c, s in zip(check, got['forward/backward'])])}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="mlp1m,resnet18,resnet50")
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (a learner's share of the cores)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    for name in args.models.split(","):
        bench(name, args.reps, args.batch_size)


if __name__ == "__main__":
    main()
