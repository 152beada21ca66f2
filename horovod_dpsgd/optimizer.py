"""``horovod_dpsgd.DistributedOptimizer``: a drop-in for ``hvd.DistributedOptimizer``.

Like Horovod, it returns an instance of a class made for the user's optimizer class. Here that class is
``type(name, (Algorithm, type(optimizer)), {})``: the algorithm mixin
(:class:`~horovod_dpsgd.algorithms.dpsgd.DPSGD`, paper Eq. 2, the default, or
:class:`~horovod_dpsgd.algorithms.ssgd.SSGD`, Horovod's allreduce, Eq. 1) placed before the user's class, so
``isinstance(opt, torch.optim.SGD)`` holds and the algorithm's ``super()`` reaches the user's update.
"""

import warnings
from typing import Iterable, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import horovod.torch as hvd
from horovod.torch.compression import Compression
from horovod.torch.mpi_ops import Adasum, Average, global_process_set

from horovod_dpsgd.algorithms.base import named_trainable
from horovod_dpsgd.algorithms.dpsgd import DPSGD
from horovod_dpsgd.algorithms.ssgd import SSGD
from horovod_dpsgd.callbacks import Callback
from horovod_dpsgd.comm.averaging import NeighbourAverager
from horovod_dpsgd.options import ALGORITHMS, Options
from horovod_dpsgd.topology import Topology

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
    options = Options(algorithm=algorithm, topology=topology, callbacks=tuple(callbacks or ()), seed=seed,
                      timeout=timeout, overlap=overlap, cuda_aware=cuda_aware, nonfinite=nonfinite)
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
    if named_parameters is not None:
        named_parameters = list(named_parameters)
    named = named_trainable(optimizer.param_groups, named_parameters)
    base = {"named_parameters": named, "options": options, "rank": hvd.rank(), "size": hvd.size()}

    if options.algorithm == "ssgd":
        horovod = dict(named_parameters=named_parameters, compression=compression,
                       backward_passes_per_step=backward_passes_per_step, op=op,
                       gradient_predivide_factor=gradient_predivide_factor, groups=groups,
                       sparse_as_dense=sparse_as_dense, process_set=process_set)
        if op == Adasum and hvd.size() > 1:  # Adasum reduces the updates, not the gradients: Horovod's own class
            if options.callbacks:
                raise ValueError("callbacks are not supported with op=Adasum; use op=Average")
            return hvd.DistributedOptimizer(optimizer, **horovod)
        return _subclass(optimizer, SSGD)(optimizer.param_groups, horovod=horovod, **base)

    if op != Average:
        raise ValueError("op is the gradient reduction of algorithm='ssgd'; DPSGD averages weights with the "
                         "topology's mixing weights: leave op=hvd.Average or pass algorithm='ssgd'")
    if process_set is not global_process_set:
        raise ValueError("algorithm='dpsgd' trains over the global process set; pass algorithm='ssgd' to "
                         "reduce over a process set")
    averager = NeighbourAverager.create(named, options, compression)
    return _subclass(optimizer, DPSGD)(optimizer.param_groups, averager=averager,
                                       backward_passes_per_step=backward_passes_per_step, **base)


def _subclass(optimizer: torch.optim.Optimizer, algorithm: type) -> type:
    """``type(optimizer)`` with the algorithm mixin before it, under the user's class name (as Horovod)."""
    cls = type(optimizer)
    doc = f"{cls.__module__}.{cls.__qualname__} under {algorithm.__name__}: {algorithm.__doc__}"
    return type(cls.__name__, (algorithm, cls), {"__doc__": doc})
