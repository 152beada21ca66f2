"""``horovod_dpsgd.DistributedOptimizer``: a drop-in for ``hvd.DistributedOptimizer``.

Like Horovod, it returns an instance of a dynamic subclass of the user's optimizer class whose
methods come from one algorithm class: :class:`~horovod_dpsgd.algorithms.dpsgd.DPSGD` (paper
Eq. 2, the default) or :class:`~horovod_dpsgd.algorithms.ssgd.SSGD` (Horovod's allreduce, Eq. 1).
"""

import os
import warnings
from typing import Iterable, Optional, Sequence, Tuple, Union

import numpy as np
import torch

import horovod.torch as hvd
from horovod.torch.compression import Compression
from horovod.torch.mpi_ops import Adasum, Average, global_process_set
from horovod.torch.optimizer import _DistributedOptimizer as _HorovodOptimizer

from horovod_dpsgd import topology as topologies
from horovod_dpsgd.algorithms.base import StepTracking
from horovod_dpsgd.algorithms.dpsgd import DPSGD
from horovod_dpsgd.algorithms.ssgd import SSGD
from horovod_dpsgd.callbacks import Callback
from horovod_dpsgd.errors import MPIEnvironmentError
from horovod_dpsgd.comm.exchange import DEFAULT_TIMEOUT

__all__ = ["DistributedOptimizer", "ALGORITHMS"]

#: Values of ``algorithm=``.
ALGORITHMS = ("dpsgd", "ssgd")
_NONFINITE = ("raise", "skip", "ignore")


def _class_dict(*bases) -> dict:
    merged = {}
    for base in bases:
        merged.update({k: v for k, v in base.__dict__.items() if k not in ("__dict__", "__weakref__")})
    return merged


def _launched_by_mpi() -> bool:
    return any(v in os.environ for v in ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK", "MPI_LOCALNRANKS"))


def DistributedOptimizer(optimizer: torch.optim.Optimizer,
                         named_parameters: Optional[Iterable[Tuple[str, torch.Tensor]]] = None,
                         compression=Compression.none,
                         backward_passes_per_step: int = 1,
                         op=Average,
                         gradient_predivide_factor: float = 1.0,
                         num_groups: int = 0,
                         groups=None,
                         sparse_as_dense: bool = False,
                         process_set=global_process_set,
                         *,
                         algorithm: str = "dpsgd",
                         topology: Union[str, topologies.Topology, np.ndarray] = "random_peer",
                         callbacks: Sequence[Callback] = (),
                         seed: int = 0,
                         timeout: Optional[float] = None,
                         overlap: bool = True,
                         cuda_aware: Optional[bool] = None,
                         nonfinite: str = "raise") -> torch.optim.Optimizer:
    """Wrap ``optimizer`` for decentralized (DPSGD) or synchronous (SSGD) training.

    Takes the positional and keyword arguments of ``horovod.torch.DistributedOptimizer``
    (Horovod 0.28.1) and returns, like it, an instance of a dynamic subclass of the user's
    optimizer class, built on ``optimizer.param_groups``. ``hvd.init()`` must have been called.

    Args:
        optimizer, named_parameters, compression, backward_passes_per_step, op,
        gradient_predivide_factor, num_groups, groups, sparse_as_dense, process_set:
            as in Horovod. With ``algorithm="dpsgd"``, ``compression`` applies to the exchanged
            weights (``Compression.fp16`` halves the bytes); ``op`` must be ``Average`` and
            ``process_set`` the global one; ``groups`` and ``sparse_as_dense`` have no effect
            (all weights travel as one buffer per dtype, sparse gradients are applied locally).
        algorithm: ``"dpsgd"`` (paper Eq. 2) or ``"ssgd"`` (Horovod's gradient allreduce, Eq. 1).
        topology: who each learner averages with: a name (``"random_peer"``, ``"ring"``,
            ``"ring:2"``, ``"random_graph:0.5"``, ``"exponential"``, ``"full"``), a
            :class:`horovod_dpsgd.topology.Topology`, or a mixing matrix. DPSGD only.
        callbacks: :class:`horovod_dpsgd.Callback` objects called at fixed points of each step.
        seed: seed of random topologies; must be the same on every rank.
        timeout: seconds any wait for a neighbour may take (default ``HOROVOD_DPSGD_TIMEOUT``
            or 300) before :class:`horovod_dpsgd.ExchangeTimeoutError`.
        overlap: exchange on a communication thread, overlapping the backward pass.
        cuda_aware: pass CUDA tensors to MPI directly (default: ``HOROVOD_DPSGD_CUDA_AWARE=1``);
            otherwise they are staged through pinned host memory.
        nonfinite: what a NaN or infinite gradient does: ``"raise"`` :class:`NonFiniteError` naming
            the step, rank and parameter; ``"skip"`` this learner's update (counted in
            ``skipped_steps``); ``"ignore"`` (no check, as Horovod).
    """
    if gradient_predivide_factor != 1.0 and op != Average:
        raise ValueError("gradient_predivide_factor not supported with op != Average")
    if num_groups != 0:
        warnings.warn("Parameter `num_groups` has been replaced by `groups` and will be removed in v0.23.0.",
                      DeprecationWarning)
        if groups is None:
            groups = num_groups
    if backward_passes_per_step <= 0:
        raise ValueError("backward_passes_per_step must be > 0")
    if groups is not None and not (isinstance(groups, list) or groups > 0):
        raise ValueError("groups should be a non-negative integer or a list of list of torch.Tensor.")
    if nonfinite not in _NONFINITE:
        raise ValueError(f"nonfinite must be one of {', '.join(_NONFINITE)}, got {nonfinite!r}")
    callbacks = list(callbacks or ())
    for cb in callbacks:
        if not isinstance(cb, Callback):
            raise TypeError(f"callbacks must be horovod_dpsgd.Callback instances, got {type(cb).__name__}")
    name = optimizer.__class__.__name__
    if algorithm == "ssgd":
        if op == Adasum and hvd.size() > 1:
            if callbacks:
                raise ValueError("callbacks are not supported with op=Adasum; use op=Average")
            return hvd.DistributedOptimizer(optimizer, named_parameters, compression, backward_passes_per_step,
                                            op, gradient_predivide_factor, groups=groups,
                                            sparse_as_dense=sparse_as_dense, process_set=process_set)
        cls = type(name, (optimizer.__class__,), _class_dict(_HorovodOptimizer, StepTracking, SSGD))
        return cls(optimizer.param_groups, named_parameters, compression, backward_passes_per_step, op,
                   gradient_predivide_factor, groups, sparse_as_dense, process_set, callbacks, nonfinite)
    if algorithm != "dpsgd":
        raise ValueError(f"unknown algorithm {algorithm!r}; choose one of {', '.join(ALGORITHMS)}")
    if op != Average:
        raise ValueError("op is the gradient reduction of algorithm='ssgd'; DPSGD averages weights with the "
                         "topology's mixing weights: leave op=hvd.Average or pass algorithm='ssgd'")
    if process_set is not global_process_set:
        raise ValueError("algorithm='dpsgd' trains over the global process set; pass algorithm='ssgd' to "
                         "reduce over a process set")
    if hvd.size() == 1 and not _launched_by_mpi():
        raise MPIEnvironmentError(
            "horovod-dpsgd was started as a single plain `python` process, so there are no neighbours to "
            "average with: launch with `horovodrun -np N python ...` (or `mpirun -np N ...`); `horovodrun -np 1` "
            "trains one learner on purpose")
    if timeout is None:
        timeout = float(os.environ.get("HOROVOD_DPSGD_TIMEOUT", DEFAULT_TIMEOUT))
    if timeout <= 0:
        raise ValueError(f"timeout must be > 0 seconds, got {timeout}")
    if cuda_aware is None:
        cuda_aware = os.environ.get("HOROVOD_DPSGD_CUDA_AWARE", "0") == "1"
    cls = type(name, (optimizer.__class__,), _class_dict(StepTracking, DPSGD))
    return cls(optimizer.param_groups, named_parameters, compression, backward_passes_per_step, topology,
               callbacks, seed, timeout, overlap, cuda_aware, nonfinite)
