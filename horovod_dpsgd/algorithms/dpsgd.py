r"""Decentralized Parallel SGD, paper Eq. 2.

.. math::
    w_j(t+1) = w_{s,j}(t) - \alpha \nabla L_{\mu_j(t)}(w_j(t)), \qquad w_{s,j}(t) = \sum_k W_{jk}(t)\, w_k(t)

Learner ``j`` computes its gradient at its *own* weights ``w_j(t)`` and applies it to the starting weights
``w_s,j(t)``, the average of its neighbours' weights with the topology's mixing weights ``W(t)``. An averager
composed into the optimizer computes ``w_s,j(t)``: it starts moving ``w_j(t)`` when the backward pass begins
(the weights are final then), so the transfer overlaps the backward computation, and ``step()`` waits only for
what is still in flight, mixes in place, then applies the wrapped optimizer's update (momentum and weight decay
stay each learner's own).
"""

from typing import Dict, Protocol

import torch

from horovod_dpsgd import topology as topologies
from horovod_dpsgd.algorithms.base import Algorithm

__all__ = ["DPSGD", "Averager"]


class Averager(Protocol):
    """Computes Eq. 2's starting weights ``w_s,j(t)`` in place; see
    :class:`~horovod_dpsgd.comm.averaging.NeighbourAverager` (MPI)."""

    topology: topologies.Topology

    def agree_on_step(self, step: int, restored: bool) -> int:
        """The step all learners continue from (see :func:`~horovod_dpsgd.comm.agreement.resolve_step`)."""

    def start(self, step: int) -> None:
        """Start moving the learners' weights of ``step`` (they are final: the backward pass began)."""

    def finish(self) -> None:
        """Wait, then overwrite the parameters with ``w_s,j(t)``."""

    def drain(self) -> None:
        """Complete a started step without mixing."""


class DPSGD(Algorithm):
    """Weights averaged with the topology's neighbours before each local update (Eq. 2).

    Args:
        averager: computes ``w_s,j(t)`` (see :class:`Averager`).
        backward_passes_per_step: backward passes accumulated locally before each step (Horovod's).
        other keywords: see :class:`~horovod_dpsgd.algorithms.base.Algorithm`.
    """

    def __init__(self, params, *, averager: Averager, backward_passes_per_step: int = 1, **kwargs):
        super().__init__(params, **kwargs)
        self._averager = averager
        self.backward_passes_per_step = backward_passes_per_step
        self._passes = dict.fromkeys(self._names, 0)

    def _on_backward(self, p: torch.Tensor) -> None:
        passes = self._passes[p] + 1
        if passes > self.backward_passes_per_step:
            raise AssertionError("Gradients were computed more than backward_passes_per_step times before call "
                                 "to step(). Increase backward_passes_per_step to accumulate gradients locally.")
        self._passes[p] = passes
        if not self._progress.backward:
            self._start_exchange()

    def synchronize(self) -> None:
        """Finish this step's exchange and load the mixed weights ``w_s,j(t)`` into the parameters.

        ``step()`` calls it; call it yourself (then ``step()`` inside ``skip_synchronize()``) to act between
        mixing and the update, as with Horovod's gradient clipping pattern.
        """
        progress = self._progress
        if progress.synchronized:
            return
        if not progress.backward:  # a step without a backward pass: the exchange has not started yet
            self._start_exchange()
        self._run_callbacks("on_before_mixing")
        self._averager.finish()
        self._run_callbacks("on_after_mixing")
        progress.synchronized = True

    def _start_exchange(self) -> None:
        """Start this step's exchange; at the first exchange after construction, agree on the step first."""
        progress = self._progress
        progress.backward = True
        if not progress.agreed:
            progress.t = self._averager.agree_on_step(progress.t, progress.restored)
            progress.agreed = True
        self._averager.start(progress.t)

    def _end_step(self) -> None:
        super()._end_step()
        self._passes = dict.fromkeys(self._passes, 0)

    def set_backward_passes_per_step(self, passes: int) -> None:
        self.backward_passes_per_step = passes
        self._passes = dict.fromkeys(self._passes, 0)

    def load_state_dict(self, state_dict) -> None:
        self._averager.drain()
        super().load_state_dict(state_dict)
        self._passes = dict.fromkeys(self._passes, 0)

    @property
    def rejected_weights(self) -> Dict[int, int]:
        """``{rank: count}``: how many times each learner's non-finite weights were left out of this learner's
        mix (``nonfinite="skip"``; see :mod:`horovod_dpsgd.comm.screen`)."""
        screen = getattr(self._averager, "screen", None)
        return dict(screen.rejected) if screen is not None else {}

    @property
    def topology(self) -> topologies.Topology:
        """The topology this optimizer mixes over."""
        return self._averager.topology
