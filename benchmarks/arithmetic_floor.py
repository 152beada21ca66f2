"""The arithmetic floor of the Sec. 2.1 step: what a simulator cannot go below on one core.

Five plain PyTorch copies of the paper's 784-50-50-10 MLP, each taking one SGD step on its own 400 samples
(nB = 2000), in one thread, with no mixing and no plugin code. Prints the median time per step.

    .venv/bin/python benchmarks/arithmetic_floor.py [--learners 5] [--batch 400] [--steps 300]
"""

import argparse
import statistics
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--learners", type=int, default=5)
    parser.add_argument("--batch", type=int, default=400, help="samples per learner")
    parser.add_argument("--steps", type=int, default=300)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    models = [torch.nn.Sequential(torch.nn.Linear(784, 50), torch.nn.ReLU(), torch.nn.Linear(50, 50), torch.nn.ReLU(),
                                  torch.nn.Linear(50, 10)) for _ in range(args.learners)]
    optimizers = [torch.optim.SGD(m.parameters(), lr=1.0) for m in models]
    x, y = torch.rand(args.learners, args.batch, 784), torch.randint(0, 10, (args.learners, args.batch))

    def step():
        for model, opt, xj, yj in zip(models, optimizers, x, y):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(xj), yj).backward()
            opt.step()

    for _ in range(20):
        step()
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    print(f"{args.learners} learners x {args.batch} samples, plain torch, 1 thread: "
          f"median {1e3 * statistics.median(times):.1f} ms per step over {args.steps} steps")


if __name__ == "__main__":
    main()
