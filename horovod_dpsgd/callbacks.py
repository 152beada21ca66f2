"""Callbacks: user code that observes (or perturbs) every optimizer step.

Pass callbacks to :func:`horovod_dpsgd.DistributedOptimizer` as ``callbacks=[...]``. Each
``optimizer.step()`` calls four hooks on every rank. A hook runs for every callback, in list order,
before the next hook runs for any, so each hook sees the effects of all earlier hooks of all callbacks:

1. ``on_before_mixing(ctx)`` - after ``backward()``: gradients are final and parameters hold
   the learner's own weights ``w_j(t)``, at which the gradient was computed.
2. ``on_after_mixing(ctx)`` - parameters hold the starting weights ``w_s,j(t)`` of Eq. 2
   (the topology's weighted average); gradients are unchanged.
3. ``on_after_update(ctx)`` - after the wrapped optimizer's update: parameters hold
   ``w_j(t + 1)``. Callbacks that perturb the weights (e.g. :class:`GaussianNoise`) do it here.
4. ``on_step_end(ctx)`` - parameters hold the final ``w_j(t + 1)``, every ``on_after_update``
   included. For observers (e.g. :class:`~horovod_dpsgd.NoiseDiagnostics`); they must not change
   the parameters.

In ``algorithm="ssgd"`` mode the communication is Horovod's gradient allreduce, so hooks 1 and 2
both run after it completed: gradients are the global average and parameters the replicated
``w_a(t)`` (SSGD mixes no weights).

A step that only initialises optimizer state (``hvd.broadcast_optimizer_state`` calls
``step()`` with zero gradients before the first backward pass) calls no callback.

Example, a user-written callback that prints the norm of the update every 100 steps::

    class UpdateNorm(horovod_dpsgd.Callback):
        def on_after_mixing(self, ctx):
            if ctx.step % 100 == 0:
                self.before = [p.detach().clone() for p in ctx.parameters()]

        def on_after_update(self, ctx):
            if ctx.step % 100 == 0 and ctx.rank == 0:
                sq = sum((p - b).pow(2).sum() for p, b in zip(ctx.parameters(), self.before))
                print(f"step {ctx.step}: |update| = {sq.sqrt():.4g}")
"""

import dataclasses
import math
from typing import Callable, Iterator, Union

import torch

__all__ = ["StepContext", "Callback", "GaussianNoise"]


@dataclasses.dataclass
class StepContext:
    """What a callback sees of the current step."""

    #: The distributed optimizer (an instance of the user's optimizer class).
    optimizer: torch.optim.Optimizer
    #: Optimizer steps completed before this one (0 for the first step).
    step: int
    #: This learner's rank and the number of learners.
    rank: int
    size: int
    #: ``"dpsgd"`` or ``"ssgd"``.
    algorithm: str

    def parameters(self) -> Iterator[torch.Tensor]:
        """The parameters the optimizer trains (those with ``requires_grad``), in group order."""
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                if p.requires_grad:
                    yield p

    @property
    def lr(self) -> float:
        """Learning rate alpha of the first parameter group."""
        return float(self.optimizer.param_groups[0]["lr"])


class Callback:
    """Base class of step callbacks; override any of the four hooks."""

    def on_before_mixing(self, ctx: StepContext) -> None:
        """After backward: gradients final, parameters are the learner's own ``w_j(t)``."""

    def on_after_mixing(self, ctx: StepContext) -> None:
        """Parameters are the mixed starting weights ``w_s,j(t)``; the update comes next."""

    def on_after_update(self, ctx: StepContext) -> None:
        """Parameters are ``w_j(t + 1)``; perturb them here."""

    def on_step_end(self, ctx: StepContext) -> None:
        """Parameters are the final ``w_j(t + 1)``, every callback's ``on_after_update`` included; observe only."""


class GaussianNoise(Callback):
    """Adds ``N(0, sigma^2)`` to every parameter after each update (the paper's SSGD*).

    Args:
        sigma: standard deviation, a non-negative number or a function ``step -> sigma``.
        seed: noise seed. In ``ssgd`` mode every rank draws the same sample (seeded by
            ``(seed, step)``), so replicas stay identical; in ``dpsgd`` mode samples are
            independent per rank (seeded by ``(seed, step, rank)``).

    The paper (Sec. 2.1) injects noise of constant variance into SSGD's weights to show that
    noise alone, unlike DPSGD's landscape-dependent noise, converges to worse solutions.
    """

    def __init__(self, sigma: Union[float, Callable[[int], float]], seed: int = 0):
        if not callable(sigma):
            self._check_sigma(sigma)
        self.sigma = sigma
        self.seed = int(seed)

    @staticmethod
    def _check_sigma(sigma: float) -> float:
        if isinstance(sigma, bool) or not isinstance(sigma, (int, float)) or not math.isfinite(sigma) \
                or sigma < 0:
            raise ValueError(f"GaussianNoise sigma must be a finite number >= 0, got {sigma!r}; "
                             "use sigma=0 to disable the noise")
        return float(sigma)

    def sigma_at(self, step: int) -> float:
        """The standard deviation used at ``step``."""
        return self._check_sigma(self.sigma(step) if callable(self.sigma) else self.sigma)

    @torch.no_grad()
    def on_after_update(self, ctx: StepContext) -> None:
        sigma = self.sigma_at(ctx.step)
        if sigma == 0.0:
            return
        key = (self.seed, ctx.step) if ctx.algorithm == "ssgd" else (self.seed, ctx.step, ctx.rank)
        generator = torch.Generator(device="cpu")
        generator.manual_seed(hash(key) & 0x7FFF_FFFF_FFFF_FFFF)
        for p in ctx.parameters():
            noise = torch.randn(p.shape, generator=generator, dtype=p.dtype, device="cpu")
            p.add_(noise.to(p.device), alpha=sigma)
