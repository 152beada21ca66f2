"""The small workload the multi-process checks and the simulator's unit tests share: a model, each learner's
batches, and a callback that records what every hook sees."""

import torch

import horovod_dpsgd as hd


def make_model(seed: int = 0, hidden: int = 16) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(8, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, 3))


def batch(rank: int, t: int, k: int = 0, size: int = 16):
    """Learner ``rank``'s batch of step ``t`` (backward pass ``k``): the same on every run and in every process."""
    g = torch.Generator().manual_seed(100_000 * t + 1000 * k + rank)
    return torch.randn(size, 8, generator=g), torch.randint(0, 3, (size,), generator=g)


class Recorder(hd.Callback):
    """Snapshots of the flat parameters and gradients at each hook: ``(hook, step, rank, size, flat, grad)``."""

    def __init__(self):
        self.seen = []

    def _snap(self, hook, ctx):
        flat = torch.cat([p.detach().reshape(-1) for p in ctx.parameters()]).clone()
        grad = torch.cat([p.grad.reshape(-1) for p in ctx.parameters()]).clone()
        self.seen.append((hook, ctx.step, ctx.rank, ctx.size, flat, grad))

    def on_before_mixing(self, ctx):
        self._snap("before_mixing", ctx)

    def on_after_mixing(self, ctx):
        self._snap("after_mixing", ctx)

    def on_after_update(self, ctx):
        self._snap("after_update", ctx)

    def on_step_end(self, ctx):
        self._snap("step_end", ctx)
