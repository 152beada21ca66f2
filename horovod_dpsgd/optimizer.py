"""``horovod_dpsgd.DistributedOptimizer``: a drop-in for ``hvd.DistributedOptimizer``.

Like Horovod, it returns an instance of a class made for the user's optimizer class. Here that class is
``type(name, (Algorithm, type(optimizer)), {})``: the algorithm mixin
(:class:`~horovod_dpsgd.algorithms.dpsgd.DPSGD`, paper Eq. 2, the default, or
:class:`~horovod_dpsgd.algorithms.ssgd.SSGD`, Horovod's allreduce, Eq. 1) placed before the user's class, so
``isinstance(opt, torch.optim.SGD)`` holds and the algorithm's ``super()`` reaches the user's update.
"""

import functools
import os
import warnings
from typing import Any, Iterable, List, NamedTuple, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import horovod.torch as hvd
from horovod.torch.compression import Compression
from horovod.torch.mpi_ops import Adasum, Average, global_process_set

from horovod_dpsgd.algorithms.base import named_trainable
from horovod_dpsgd.algorithms.dpsgd import DPSGD
from horovod_dpsgd.algorithms.ssgd import SSGD, HorovodAllreduce
from horovod_dpsgd.callbacks import Callback
from horovod_dpsgd import topology as topologies
from horovod_dpsgd.comm.agreement import agree_at_construction, describe, warn_if_order_unchecked
from horovod_dpsgd.comm.averaging import NeighbourAverager, check_floating, check_launch
from horovod_dpsgd.comm.exchange import DEFAULT_TIMEOUT, communicator, mpi_world_size
from horovod_dpsgd.comm.hosts import detect_layout
from horovod_dpsgd.comm.liveness import watch_launcher
from horovod_dpsgd.errors import MPIEnvironmentError
from horovod_dpsgd.options import ALGORITHMS, Options
from horovod_dpsgd.topology import HostLayout, Topology

__all__ = ["DistributedOptimizer", "ALGORITHMS"]


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
                         topology: Union[str, Topology, np.ndarray] = "auto",
                         callbacks: Sequence[Callback] = (),
                         seed: int = 0,
                         timeout: Optional[float] = None,
                         overlap: bool = True,
                         cuda_aware: Optional[bool] = None,
                         nonfinite: str = "raise") -> torch.optim.Optimizer:
    """Wrap ``optimizer`` for decentralized (DPSGD) or synchronous (SSGD) training.

    Takes the positional and keyword arguments of ``horovod.torch.DistributedOptimizer`` (Horovod 0.28.1)
    and returns, like it, an instance of a class made for the user's optimizer class, built on
    ``optimizer.param_groups`` (``optimizer.state`` is not carried over). ``hvd.init()`` must have been called.

    Args:
        optimizer, named_parameters, compression, backward_passes_per_step, op,
        gradient_predivide_factor, num_groups, groups, sparse_as_dense, process_set:
            as in Horovod. With ``algorithm="dpsgd"``, ``compression`` applies to the exchanged
            weights (``Compression.fp16`` halves the bytes); ``op`` must be ``Average`` and
            ``process_set`` the global one; ``groups`` and ``sparse_as_dense`` have no effect
            (all weights travel as one buffer per dtype, sparse gradients are applied locally).
        algorithm, topology, callbacks, seed, timeout, overlap, cuda_aware, nonfinite:
            the plugin's settings, keyword-only; see :class:`horovod_dpsgd.Options`.
    """
    if algorithm == "dpsgd":
        _refuse_elastic()  # before any collective: an elastic job has no MPI world to agree over
    rank, size = hvd.rank(), hvd.size()
    layout, comm = _host_layout(process_set is global_process_set, timeout, rank, size)
    # Validate locally, then agree with the other ranks in one collective: an invalid argument on one rank, or
    # settings that differ between ranks, raise the same error on every rank instead of leaving the others waiting.
    try:
        local = _validate(optimizer, named_parameters, compression, backward_passes_per_step, op,
                          gradient_predivide_factor, num_groups, groups, process_set, rank, size,
                          Options(algorithm=algorithm, topology=topology, callbacks=tuple(callbacks or ()), seed=seed,
                                  timeout=timeout, overlap=overlap, cuda_aware=cuda_aware, nonfinite=nonfinite),
                          layout)
    except (ValueError, TypeError) as exc:
        local = exc
    ok = not isinstance(local, BaseException)
    comm = agree_at_construction(local.description if ok else local, rank, size,
                                 local.options.timeout if ok else Options().timeout,
                                 topology=local.topology if ok else None,
                                 over_world=process_set is global_process_set, comm=comm)
    watch_launcher()
    options, named = local.options, local.named
    base = {"named_parameters": named, "options": options, "rank": rank, "size": size}

    if options.algorithm == "ssgd":
        if comm is not None:
            comm.Free()
        horovod = dict(named_parameters=local.named_parameters, compression=compression,
                       backward_passes_per_step=backward_passes_per_step, op=op,
                       gradient_predivide_factor=gradient_predivide_factor, groups=local.groups,
                       sparse_as_dense=sparse_as_dense, process_set=process_set)
        if op == Adasum and size > 1:  # Adasum reduces the updates, not the gradients: Horovod's own class
            return hvd.DistributedOptimizer(optimizer, **horovod)
        return _subclass(optimizer, SSGD)(optimizer.param_groups,
                                          gradients=functools.partial(HorovodAllreduce, horovod=horovod), **base)

    check_launch(size)
    averager = NeighbourAverager.create(named, options, compression, local.topology, comm, layout)
    return _subclass(optimizer, DPSGD)(optimizer.param_groups, averager=averager,
                                       backward_passes_per_step=backward_passes_per_step, **base)


class _Validated(NamedTuple):
    """One rank's arguments, validated: what the optimizer is built from, and the description the ranks compare."""

    options: Options
    named_parameters: Optional[List[Tuple[str, torch.Tensor]]]  # as the user gave them (Horovod's argument)
    named: List[Tuple[str, torch.Tensor]]  # the trainable parameters, named
    groups: Any
    topology: Optional[Topology]  # DPSGD's, built for the world size
    description: dict


def _validate(optimizer, named_parameters, compression, backward_passes_per_step, op, gradient_predivide_factor,
              num_groups, groups, process_set, rank: int, size: int, options: Options,
              layout: Optional[HostLayout] = None) -> _Validated:
    """Check this rank's arguments (Horovod's checks, then the plugin's); raises ValueError or TypeError."""
    groups = _check_horovod_arguments(op, gradient_predivide_factor, num_groups, groups, backward_passes_per_step,
                                      process_set, options.algorithm)
    if options.algorithm == "ssgd" and op == Adasum and size > 1 and options.callbacks:
        raise ValueError("callbacks are not supported with op=Adasum; use op=Average")
    if named_parameters is not None:
        named_parameters = list(named_parameters)
    named = named_trainable(optimizer.param_groups, named_parameters)
    warn_if_order_unchecked(named_parameters, named, rank, size)
    mixing = None
    if options.algorithm == "dpsgd":
        mixing = topologies.from_name(options.topology, size, options.seed, layout=layout)
        check_floating(named)
    description = describe(options=options, topology=mixing, named=named, compression=compression,
                           backward_passes_per_step=backward_passes_per_step, op=op,
                           gradient_predivide_factor=gradient_predivide_factor)
    return _Validated(options, named_parameters, named, groups, mixing, description)


def _host_layout(over_world: bool, timeout: Optional[float], rank: int, size: int):
    """``(layout, comm)``: over MPI's world, the hosts' layout (which decides ``topology="auto"`` and the
    hierarchical plans, so every rank knows it before the ranks compare their plans) and the plugin's
    communicator it was detected on; ``(None, None)`` otherwise. Collective, whatever the arguments (a rank
    with invalid ones still takes part, and the ranks then agree on its error)."""
    if not over_world or mpi_world_size() != size:
        return None, None
    try:
        wait = Options(timeout=timeout).timeout
    except (TypeError, ValueError):  # reported with the other arguments, on every rank
        wait = DEFAULT_TIMEOUT
    comm = communicator(rank, size, wait)
    return detect_layout(comm), comm


def _check_horovod_arguments(op, gradient_predivide_factor: float, num_groups: int, groups,
                             backward_passes_per_step: int, process_set, algorithm: str):
    """Horovod's own checks of its arguments (same errors), and what DPSGD does not support; returns ``groups``."""
    if gradient_predivide_factor != 1.0 and op != Average:
        raise ValueError("gradient_predivide_factor not supported with op != Average")
    if num_groups != 0:
        warnings.warn("Parameter `num_groups` has been replaced by `groups` and will be removed in v0.23.0.",
                      DeprecationWarning)
    if backward_passes_per_step <= 0:
        raise ValueError("backward_passes_per_step must be > 0")
    groups = groups if num_groups == 0 or groups is not None else num_groups
    if groups is not None and not (isinstance(groups, list) or groups > 0):
        raise ValueError("groups should be a non-negative integer or a list of list of torch.Tensor.")
    if algorithm == "dpsgd" and op != Average:
        raise ValueError("op is the gradient reduction of algorithm='ssgd'; DPSGD averages weights with the "
                         "topology's mixing weights: leave op=hvd.Average or pass algorithm='ssgd'")
    if algorithm == "dpsgd" and process_set is not global_process_set:
        raise ValueError("algorithm='dpsgd' trains over the global process set; pass algorithm='ssgd' to "
                         "reduce over a process set")
    return groups


def _refuse_elastic() -> None:
    """DPSGD cannot run under Elastic Horovod: say so, and what to do instead (docs/api.md, "Elastic Horovod")."""
    if os.environ.get("HOROVOD_ELASTIC") == "1":  # set by horovodrun's elastic driver in every worker
        raise MPIEnvironmentError(
            "algorithm='dpsgd' does not support Elastic Horovod (horovodrun --min-np/--max-np/--host-discovery-script, "
            "hvd.elastic.run): an elastic job runs over Gloo without MPI and changes its number of learners while it "
            "runs, whereas DPSGD exchanges each learner's own weights with fixed neighbours over MPI, and a learner "
            "that leaves takes its weights with it. Either launch a fixed-size job, `horovodrun -np N python "
            "script.py` without --min-np, --max-np and --host-discovery-script, and restart it from per-learner "
            "checkpoints (horovod_dpsgd.checkpoint) after a failure; or keep the elastic launch and pass "
            "algorithm='ssgd' (Horovod's gradient allreduce, which elastic jobs support)")


def _subclass(optimizer: torch.optim.Optimizer, *mixins: type) -> type:
    """``type(optimizer)`` with the mixins before it, under the user's class name (as Horovod)."""
    cls = type(optimizer)
    algorithm = mixins[-1]
    doc = f"{cls.__module__}.{cls.__qualname__} under {algorithm.__name__}: {algorithm.__doc__}"
    return type(cls.__name__, (*mixins, cls), {"__doc__": doc})
