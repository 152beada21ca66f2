r"""Synchronous SGD, paper Eq. 1, by Horovod's own gradient allreduce.

.. math::
    w_j(t+1) = w_a(t) - \alpha\, g_a(t), \qquad g_a(t) = n^{-1} \sum_k \nabla L_{\mu_k(t)}(w_a(t))

Every learner holds the same weights ``w_a``. The gradients are averaged by a
``hvd.DistributedOptimizer`` composed into this optimizer: Horovod's hooks start the allreduce during
the backward pass and its ``synchronize()`` writes ``g_a`` into ``.grad``; this optimizer then applies
the wrapped optimizer's update, so the weights are bit-identical to ``hvd.DistributedOptimizer``'s.
"""

import torch
import horovod.torch as hvd

from horovod_dpsgd.algorithms.base import Algorithm
from horovod_dpsgd.comm.agreement import resolve_step

__all__ = ["SSGD"]


class _GradientsOnly(torch.optim.Optimizer):
    """What the composed Horovod optimizer wraps: it averages the gradients, its own update does nothing."""

    def __init__(self, param_groups):
        super().__init__(param_groups, {})

    def step(self, closure=None):
        return None


class SSGD(Algorithm):
    """Gradients averaged by Horovod's allreduce (Eq. 1), then the wrapped optimizer's update.

    Args:
        horovod: Horovod's ``DistributedOptimizer`` arguments (``named_parameters``, ``compression``,
            ``backward_passes_per_step``, ``op``, ``gradient_predivide_factor``, ``groups``, ``sparse_as_dense``,
            ``process_set``).
        other keywords: see :class:`~horovod_dpsgd.algorithms.base.Algorithm`.
    """

    def __init__(self, params, *, horovod: dict, **kwargs):
        super().__init__(params, **kwargs)
        self._allreduce = hvd.DistributedOptimizer(_GradientsOnly(self.param_groups), **horovod)

    def synchronize(self) -> None:
        """Wait for the gradient allreduce: ``.grad`` then holds ``g_a`` (Horovod's ``synchronize``).

        Use it with ``skip_synchronize()`` exactly as in Horovod (e.g. to clip the averaged gradients).
        """
        if self._progress.synchronized:
            return
        if not self._progress.agreed:
            self._agree_on_step()
        self._allreduce.synchronize()
        # SSGD mixes no weights: both hooks see the averaged gradients and the replicated weights w_a(t).
        self._run_callbacks("on_before_mixing")
        self._run_callbacks("on_after_mixing")
        self._progress.synchronized = True

    def _agree_on_step(self) -> None:
        """At the first step after construction, all ranks continue from the same step
        (the step seeds SSGD*'s noise and counts in checkpoints); see
        :func:`~horovod_dpsgd.comm.agreement.resolve_step`."""
        progress = self._progress
        mine = torch.tensor([[progress.t, int(progress.restored)]], dtype=torch.int64)
        everyone = hvd.allgather(mine, name="horovod_dpsgd.step", process_set=self._allreduce.process_set)
        progress.t = resolve_step(everyone[:, 0].tolist(), [bool(r) for r in everyone[:, 1].tolist()])
        progress.agreed = True

    def zero_grad(self, set_to_none: bool = True) -> None:
        if self._allreduce._handles:
            raise AssertionError("optimizer.zero_grad() was called after loss.backward() but before "
                                 "optimizer.step() or optimizer.synchronize(). This is prohibited as it can "
                                 "cause a race condition.")
        super().zero_grad(set_to_none=set_to_none)

    @property
    def backward_passes_per_step(self) -> int:
        """Backward passes accumulated locally before the gradients are averaged (Horovod's)."""
        return self._allreduce.backward_passes_per_step

    def set_backward_passes_per_step(self, passes: int) -> None:
        self._allreduce.set_backward_passes_per_step(passes)

    def load_state_dict(self, state_dict) -> None:
        self._allreduce._handles.clear()  # as Horovod's load_state_dict: drop the allreduces in flight
        self._allreduce.set_backward_passes_per_step(self._allreduce.backward_passes_per_step)
        super().load_state_dict(state_dict)
