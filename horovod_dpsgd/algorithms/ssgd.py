r"""Synchronous SGD, paper Eq. 1.

.. math::
    w_j(t+1) = w_a(t) - \alpha\, g_a(t), \qquad g_a(t) = n^{-1} \sum_k \nabla L_{\mu_k(t)}(w_a(t))

Every learner holds the same weights ``w_a``. A gradient averager composed into the optimizer writes ``g_a``
into ``.grad``; this optimizer then applies the wrapped optimizer's update. Over MPI the averager is
:class:`HorovodAllreduce`, a ``hvd.DistributedOptimizer`` whose hooks start the allreduce during the backward
pass, so the weights are bit-identical to ``hvd.DistributedOptimizer``'s; the simulator
(:mod:`horovod_dpsgd.sim`) composes a mean over its stacked learners instead.
"""

from typing import Callable, List, Protocol

import torch
import horovod.torch as hvd

from horovod_dpsgd.algorithms.base import Algorithm
from horovod_dpsgd.comm.agreement import resolve_step

__all__ = ["SSGD", "GradientAverager", "HorovodAllreduce"]


class GradientAverager(Protocol):
    """Writes ``g_a``, the learners' average gradient, into ``.grad``; see :class:`HorovodAllreduce` (MPI)."""

    #: Backward passes accumulated locally before the gradients are averaged (Horovod's).
    backward_passes_per_step: int

    def agree_on_step(self, step: int, restored: bool) -> int:
        """The step all learners continue from (see :func:`~horovod_dpsgd.comm.agreement.resolve_step`)."""

    def synchronize(self) -> None:
        """Wait for this step's reduction: ``.grad`` then holds ``g_a``."""

    def pending(self) -> bool:
        """True while a reduction started by the backward pass has not been synchronized."""

    def set_backward_passes_per_step(self, passes: int) -> None:
        """Change ``backward_passes_per_step`` (and reset the pass counters)."""

    def drop(self) -> None:
        """Forget the reductions in flight (before loading a checkpoint)."""


class _GradientsOnly(torch.optim.Optimizer):
    """What the composed Horovod optimizer wraps: it averages the gradients, its own update does nothing."""

    def __init__(self, param_groups):
        super().__init__(param_groups, {})

    def step(self, closure=None):
        return None


class HorovodAllreduce:
    """Horovod's own ``DistributedOptimizer`` as a gradient averager: its allreduce, its hooks, its checks.

    Args:
        param_groups: the parameter groups whose gradients are averaged.
        horovod: Horovod's ``DistributedOptimizer`` arguments (``named_parameters``, ``compression``,
            ``backward_passes_per_step``, ``op``, ``gradient_predivide_factor``, ``groups``, ``sparse_as_dense``,
            ``process_set``).
    """

    __slots__ = ("horovod",)

    def __init__(self, param_groups: List[dict], *, horovod: dict):
        self.horovod = hvd.DistributedOptimizer(_GradientsOnly(param_groups), **horovod)

    @property
    def backward_passes_per_step(self) -> int:
        return self.horovod.backward_passes_per_step

    def agree_on_step(self, step: int, restored: bool) -> int:
        mine = torch.tensor([[step, int(restored)]], dtype=torch.int64)
        everyone = hvd.allgather(mine, name="horovod_dpsgd.step", process_set=self.horovod.process_set)
        return resolve_step(everyone[:, 0].tolist(), [bool(r) for r in everyone[:, 1].tolist()])

    def synchronize(self) -> None:
        self.horovod.synchronize()

    def pending(self) -> bool:
        return bool(self.horovod._handles)

    def set_backward_passes_per_step(self, passes: int) -> None:
        self.horovod.set_backward_passes_per_step(passes)

    def drop(self) -> None:
        self.horovod._handles.clear()  # as Horovod's load_state_dict: drop the allreduces in flight
        self.horovod.set_backward_passes_per_step(self.horovod.backward_passes_per_step)


class SSGD(Algorithm):
    """Gradients averaged (Eq. 1), then the wrapped optimizer's update.

    Args:
        gradients: builds the :class:`GradientAverager` from this optimizer's ``param_groups`` (called once the
            optimizer's own gradient hooks are in place), e.g. ``functools.partial(HorovodAllreduce, horovod=...)``.
        other keywords: see :class:`~horovod_dpsgd.algorithms.base.Algorithm`.
    """

    def __init__(self, params, *, gradients: Callable[[List[dict]], GradientAverager], **kwargs):
        super().__init__(params, **kwargs)
        self._gradients = gradients(self.param_groups)

    def synchronize(self) -> None:
        """Wait for the gradient averaging: ``.grad`` then holds ``g_a`` (Horovod's ``synchronize``).

        Use it with ``skip_synchronize()`` exactly as in Horovod (e.g. to clip the averaged gradients).
        """
        if self._progress.synchronized:
            return
        progress = self._progress
        if not progress.agreed:  # the step seeds SSGD*'s noise and counts in checkpoints
            progress.t = self._gradients.agree_on_step(progress.t, progress.restored)
            progress.agreed = True
        self._gradients.synchronize()
        # SSGD mixes no weights: both hooks see the averaged gradients and the replicated weights w_a(t).
        self._run_callbacks("on_before_mixing")
        self._run_callbacks("on_after_mixing")
        self._progress.synchronized = True

    def zero_grad(self, set_to_none: bool = True) -> None:
        if self._gradients.pending():
            raise AssertionError("optimizer.zero_grad() was called after loss.backward() but before "
                                 "optimizer.step() or optimizer.synchronize(). This is prohibited as it can "
                                 "cause a race condition.")
        super().zero_grad(set_to_none=set_to_none)

    @property
    def backward_passes_per_step(self) -> int:
        """Backward passes accumulated locally before the gradients are averaged (Horovod's)."""
        return self._gradients.backward_passes_per_step

    def set_backward_passes_per_step(self, passes: int) -> None:
        self._gradients.set_backward_passes_per_step(passes)

    def load_state_dict(self, state_dict) -> None:
        self._gradients.drop()
        super().load_state_dict(state_dict)
