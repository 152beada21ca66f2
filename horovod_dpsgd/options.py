"""The plugin's settings of one :func:`horovod_dpsgd.DistributedOptimizer`, validated once, then frozen."""

import dataclasses
import os
from typing import Optional, Tuple, Union

import numpy as np

from horovod_dpsgd.callbacks import Callback
from horovod_dpsgd.comm.exchange import DEFAULT_TIMEOUT
from horovod_dpsgd.topology import Topology

__all__ = ["Options", "ALGORITHMS", "NONFINITE_POLICIES", "DEFAULT_TIMEOUT"]

#: Values of ``algorithm``.
ALGORITHMS = ("dpsgd", "ssgd")
#: Values of ``nonfinite``.
NONFINITE_POLICIES = ("raise", "skip", "ignore")


@dataclasses.dataclass(frozen=True)
class Options:
    """What :func:`horovod_dpsgd.DistributedOptimizer` takes beyond Horovod's arguments.

    Attributes:
        algorithm: ``"dpsgd"`` (paper Eq. 2: average weights with neighbours, then apply the gradient taken at
            the learner's own weights) or ``"ssgd"`` (Eq. 1: Horovod's gradient allreduce).
        topology: who each learner averages with, DPSGD only: a name (``"auto"``, ``"hierarchical"``,
            ``"random_peer"``, ``"one_peer_exponential"``, ``"ring"``, ``"ring:2"``, ``"random_graph:0.5"``,
            ``"exponential"``, ``"full"``, ``"periodic:8"``, ``"local_sgd:8"``; see
            :func:`horovod_dpsgd.topology.from_name`), a :class:`~horovod_dpsgd.topology.Topology`, or a mixing
            matrix. ``"auto"`` (the default) is chosen from the host layout when the optimizer is built
            (:func:`horovod_dpsgd.topology.default_topology`): ``"hierarchical:every=2"`` on two hosts running
            several learners each, ``"one_peer_exponential"`` on other layouts of several hosts, the paper's
            ``"random_peer"`` on one host; pass ``"random_peer"`` for the paper's setting on every layout.
        callbacks: :class:`~horovod_dpsgd.Callback` objects called at fixed points of every step.
        seed: seed of random topologies; the same on every rank.
        timeout: seconds any wait for a neighbour may take before
            :class:`~horovod_dpsgd.ExchangeTimeoutError` (``None``: ``HOROVOD_DPSGD_TIMEOUT`` or 300).
        overlap: exchange on a communication thread, overlapping the backward pass.
        cuda_aware: hand CUDA buffers to MPI directly (``None``: ``HOROVOD_DPSGD_CUDA_AWARE=1``); otherwise
            they are staged through pinned host memory.
        nonfinite: what a NaN or infinite gradient, or (DPSGD) NaN or infinite weights about to be mixed, do:
            ``"raise"`` :class:`~horovod_dpsgd.NonFiniteError` naming the step, rank and parameter (gradients) or
            the source rank (weights); ``"skip"`` this learner's update (counted in ``skipped_steps``), or leave
            the weights out of the mix (counted in ``rejected_weights``, see :mod:`horovod_dpsgd.comm.screen`);
            ``"ignore"`` (no check, as Horovod).

    ``None`` defaults are resolved from the environment when the options are built, so the object holds the
    values in force.
    """

    algorithm: str = "dpsgd"
    topology: Union[str, Topology, np.ndarray] = "auto"
    callbacks: Tuple[Callback, ...] = ()
    seed: int = 0
    timeout: Optional[float] = None
    overlap: bool = True
    cuda_aware: Optional[bool] = None
    nonfinite: str = "raise"

    def __post_init__(self) -> None:
        if self.algorithm not in ALGORITHMS:
            raise ValueError(f"unknown algorithm {self.algorithm!r}; choose one of {', '.join(ALGORITHMS)}")
        if self.nonfinite not in NONFINITE_POLICIES:
            raise ValueError(f"nonfinite must be one of {', '.join(NONFINITE_POLICIES)}, got {self.nonfinite!r}")
        callbacks = tuple(self.callbacks or ())
        for cb in callbacks:
            if not isinstance(cb, Callback):
                raise TypeError(f"callbacks must be horovod_dpsgd.Callback instances, got {type(cb).__name__}")
        timeout = float(os.environ.get("HOROVOD_DPSGD_TIMEOUT", DEFAULT_TIMEOUT)) if self.timeout is None \
            else float(self.timeout)
        if not timeout > 0:
            raise ValueError(f"timeout must be > 0 seconds, got {timeout:g}")
        cuda_aware = os.environ.get("HOROVOD_DPSGD_CUDA_AWARE", "0") == "1" if self.cuda_aware is None \
            else bool(self.cuda_aware)
        for name, value in (("callbacks", callbacks), ("timeout", timeout), ("cuda_aware", cuda_aware)):
            object.__setattr__(self, name, value)

    def replace(self, **changes) -> "Options":
        """A copy with ``changes`` applied (and validated)."""
        return dataclasses.replace(self, **changes)

