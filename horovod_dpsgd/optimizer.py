r"""``horovod_dpsgd.DistributedOptimizer``: a drop-in for ``hvd.DistributedOptimizer``.

With ``algorithm="dpsgd"`` (the default) each learner ``j`` computes its gradient at its own
weights and applies it to the topology's weighted average of its neighbours' weights,
paper Eq. 2:

.. math::
    w_j(t+1) = \sum_k W_{jk}(t)\, w_k(t) - \alpha \nabla L_{\mu_j(t)}(w_j(t))

where the wrapped optimizer supplies the update (momentum and weight decay stay local). The
weights ``w_j(t)`` are sent to the neighbours as soon as the backward pass starts (they are
final then), so the exchange overlaps the backward computation; ``step()`` waits only for
what is still in flight, mixes, then applies the wrapped optimizer's step.

With ``algorithm="ssgd"`` the optimizer is Horovod's gradient allreduce (Eq. 1), unchanged.
"""

import os
import warnings
from contextlib import contextmanager
from typing import Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

import horovod.torch as hvd
from horovod.torch.compression import Compression
from horovod.torch.mpi_ops import Adasum, Average, global_process_set
from horovod.torch.optimizer import _DistributedOptimizer as _HorovodOptimizer

from horovod_dpsgd import topology as topologies
from horovod_dpsgd.buffers import FlatParameters
from horovod_dpsgd.callbacks import Callback, StepContext
from horovod_dpsgd.errors import MPIEnvironmentError, ParameterMismatchError
from horovod_dpsgd.exchange import DEFAULT_TIMEOUT, Exchange, Transfer, abort_job_on_uncaught_exception, communicator

__all__ = ["DistributedOptimizer", "ALGORITHMS"]

#: Values of ``algorithm=``.
ALGORITHMS = ("dpsgd", "ssgd")
_STATE_KEY = "horovod_dpsgd"


def _named_trainable(param_groups, named_parameters) -> List[Tuple[str, torch.Tensor]]:
    """Validate ``named_parameters`` as Horovod does; return (name, param) of trainable params."""
    if named_parameters is not None:
        named_parameters = list(named_parameters)
    else:
        named_parameters = [(f"allreduce.noname.{i}.{j}", v) for i, group in enumerate(param_groups)
                            for j, v in enumerate(group["params"])]
    if any(not isinstance(p, tuple) for p in named_parameters):
        raise ValueError("named_parameters should be a sequence of tuples (name, parameter), "
                         "usually produced by model.named_parameters().")
    dups = _HorovodOptimizer.find_duplicates([k for k, _ in named_parameters])
    if dups:
        raise ValueError("Parameter names in named_parameters must be unique. Found duplicates: %s" % ", ".join(dups))
    names = {id(v): k for k, v in named_parameters}
    unnamed = [id(v) for group in param_groups for v in group["params"] if id(v) not in names]
    if unnamed:
        raise ValueError("named_parameters was specified, but one or more model parameters were not named. "
                         "Python object ids: %s" % ", ".join(str(i) for i in unnamed))
    return [(names[id(p)], p) for group in param_groups for p in group["params"] if p.requires_grad]


class _StepTracking(torch.optim.Optimizer):
    """What both algorithms share: step counting, callbacks, backward detection, state."""

    def _init_tracking(self, trainable: Sequence[torch.Tensor], callbacks: Sequence[Callback],
                       algorithm: str) -> None:
        self._algorithm = algorithm
        self._callbacks = list(callbacks)
        self._step_count = 0
        self._pending = False  # a backward pass happened since the last step
        self._passes = {p: 0 for p in trainable}
        self._hook_handles = [p.register_post_accumulate_grad_hook(self._on_grad) for p in trainable]

    def _on_grad(self, p: torch.Tensor) -> None:
        self._pending = True

    def _run_callbacks(self, hook: str) -> None:
        if self._callbacks:
            ctx = StepContext(self, self._step_count, hvd.rank(), hvd.size(), self._algorithm)
            for cb in self._callbacks:
                getattr(cb, hook)(ctx)

    @property
    def step_count(self) -> int:
        """Optimizer steps taken (the ``t`` of the paper's equations)."""
        return self._step_count

    def state_dict(self):
        state = super(self.__class__, self).state_dict()
        state[_STATE_KEY] = {"step": self._step_count, "algorithm": self._algorithm}
        return state

    def _load_tracking(self, state_dict) -> dict:
        state_dict = dict(state_dict)
        extra = state_dict.pop(_STATE_KEY, None)
        if extra is not None:
            self._step_count = int(extra["step"])
        self._pending = False
        for p in self._passes:
            self._passes[p] = 0
        return state_dict


class _DPSGDOptimizer(_StepTracking):
    def __init__(self, params, named_parameters, compression, backward_passes_per_step, topology,
                 callbacks, seed, timeout, overlap, cuda_aware):
        super(self.__class__, self).__init__(params)
        named = _named_trainable(self.param_groups, named_parameters)
        self._compression = compression
        self.backward_passes_per_step = backward_passes_per_step
        self._rank, self._size = hvd.rank(), hvd.size()
        self._topology = topologies.from_name(topology, self._size, seed)
        for name, p in named:
            if not p.is_floating_point():
                raise ParameterMismatchError(
                    f"parameter {name!r} has dtype {p.dtype}; DPSGD averages weights and needs floating-point "
                    "parameters: give it requires_grad=False or leave it out of the optimizer")
        self._names = [n for n, _ in named]
        self._flat = FlatParameters([p for _, p in named], cuda_aware=cuda_aware)
        self._comm = communicator(self._rank, self._size, timeout)
        self._check_same_parameters(named)
        self._exchange = Exchange(self._comm, timeout, overlap)
        abort_job_on_uncaught_exception()
        self._handle = None
        self._plan = None
        self._synchronized = False
        self._should_synchronize = True
        self._init_tracking([p for _, p in named], callbacks, "dpsgd")

    def _check_same_parameters(self, named) -> None:
        mine = [(n, str(p.dtype), tuple(p.shape)) for n, p in named]
        everyone = self._comm.allgather(mine)
        for rank, theirs in enumerate(everyone):
            if theirs == everyone[0]:
                continue
            if len(theirs) != len(everyone[0]):
                detail = f"{len(everyone[0])} trainable parameters on rank 0 but {len(theirs)} on rank {rank}"
            else:
                a, b = next((a, b) for a, b in zip(everyone[0], theirs) if a != b)
                detail = f"parameter #{everyone[0].index(a)}: rank 0 has {a}, rank {rank} has {b}"
            raise ParameterMismatchError(
                f"models differ across ranks ({detail}); DPSGD averages weights element by element, so every "
                "rank must build the same model with the same parameter order, shapes and dtypes")

    def _on_grad(self, p: torch.Tensor) -> None:
        passes = self._passes[p] + 1
        if passes > self.backward_passes_per_step:
            raise AssertionError("Gradients were computed more than backward_passes_per_step times before call "
                                 "to step(). Increase backward_passes_per_step to accumulate gradients locally.")
        self._passes[p] = passes
        if not self._pending:
            self._pending = True
            self._start_exchange()

    def _start_exchange(self) -> None:
        """Send ``w_j(t)`` to this step's peers; runs when the backward pass begins."""
        plan = self._topology.plan(self._rank, self._step_count)
        transfers = []
        for group in self._flat.groups:
            send = group.pack()
            if plan.collective:
                transfers.append(Transfer(send, None, [group.mixed]))
            elif plan.peers:
                wire, ctx = self._compression.compress(send)
                transfers.append(Transfer(wire, plan.peers, group.recv_buffers(len(plan.peers), wire.dtype)))
        self._plan = plan
        self._handle = self._exchange.start(transfers, self._step_count, plan.peers) if transfers else None

    @torch.no_grad()
    def _mix(self) -> None:
        """Replace the parameters by ``w_s,j(t) = sum_k W_jk w_k(t)`` (the first term of Eq. 2)."""
        plan = self._plan
        if self._handle is not None:
            self._handle.wait()
            transfers, self._handle = self._handle.transfers, None
            for group, transfer in zip(self._flat.groups, transfers):
                if plan.collective:
                    group.mixed.div_(self._size)
                else:
                    torch.mul(group.send, plan.self_weight, out=group.mixed)
                    for weight, recv in zip(plan.peer_weights, transfer.recv):
                        group.mixed.add_(self._compression.decompress(recv, group.dtype), alpha=weight)
                group.unpack()

    def synchronize(self) -> None:
        """Finish this step's exchange and load the mixed weights ``w_s,j(t)`` into the parameters.

        ``step()`` calls it; call it yourself (then ``step()`` inside ``skip_synchronize()``)
        to act between mixing and the update, as with Horovod's gradient clipping pattern.
        """
        if self._synchronized or not self._pending:
            return
        self._run_callbacks("on_before_mixing")
        self._mix()
        self._run_callbacks("on_after_mixing")
        self._synchronized = True

    @contextmanager
    def skip_synchronize(self):
        """Context in which ``step()`` does not call ``synchronize()`` (Horovod's API)."""
        self._should_synchronize = False
        try:
            yield
        finally:
            self._should_synchronize = True

    def step(self, closure=None):
        if not self._pending:
            # No backward pass since the last step: e.g. hvd.broadcast_optimizer_state() filling
            # empty optimizer state with zero gradients. Update locally; mix nothing, count nothing.
            return super(self.__class__, self).step(closure)
        if self._should_synchronize and self._synchronized:
            warnings.warn("optimizer.step() called without optimizer.skip_synchronize() context after "
                          "optimizer.synchronize(). This can cause training slowdown. You may want to consider "
                          "using optimizer.skip_synchronize() context if you use optimizer.synchronize() in your code.")
        self.synchronize()
        loss = super(self.__class__, self).step(closure)
        self._run_callbacks("on_after_update")
        self._step_count += 1
        self._pending = self._synchronized = False
        for p in self._passes:
            self._passes[p] = 0
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zero the gradients. Unlike Horovod's, allowed at any time: DPSGD exchanges weights, not gradients."""
        return super(self.__class__, self).zero_grad(set_to_none=set_to_none)

    def set_backward_passes_per_step(self, passes: int) -> None:
        self.backward_passes_per_step = passes
        for p in self._passes:
            self._passes[p] = 0

    def load_state_dict(self, state_dict) -> None:
        if self._handle is not None:
            self._handle.wait()
            self._handle = None
        self._synchronized = False
        super(self.__class__, self).load_state_dict(self._load_tracking(state_dict))

    @property
    def topology(self) -> topologies.Topology:
        """The topology this optimizer mixes over."""
        return self._topology


class _SSGDOptimizer(_StepTracking):
    """Horovod's ``_DistributedOptimizer`` with step counting and callbacks."""

    def __init__(self, params, named_parameters, compression, backward_passes_per_step, op,
                 gradient_predivide_factor, groups, sparse_as_dense, process_set, callbacks):
        _HorovodOptimizer.__init__(self, params, named_parameters, compression, backward_passes_per_step, op,
                                   gradient_predivide_factor, groups, sparse_as_dense, process_set)
        trainable = [p for group in self.param_groups for p in group["params"] if p.requires_grad]
        self._init_tracking(trainable, callbacks, "ssgd")

    def step(self, closure=None):
        if not self._pending:  # state initialisation, see _DPSGDOptimizer.step
            return super(self.__class__, self).step(closure)
        if not self._callbacks:
            loss = _HorovodOptimizer.step(self, closure)
        else:
            if self._should_synchronize and not self._synchronized:
                self.synchronize()
            self._run_callbacks("on_before_mixing")
            self._run_callbacks("on_after_mixing")
            with self.skip_synchronize():
                loss = _HorovodOptimizer.step(self, closure)
            self._run_callbacks("on_after_update")
        self._step_count += 1
        self._pending = False
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        if self._handles:
            raise AssertionError("optimizer.zero_grad() was called after loss.backward() but before "
                                 "optimizer.step() or optimizer.synchronize(). This is prohibited as it can "
                                 "cause a race condition.")
        return super(self.__class__, self).zero_grad(set_to_none=set_to_none)

    def load_state_dict(self, state_dict) -> None:
        _HorovodOptimizer.load_state_dict(self, self._load_tracking(state_dict))


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
                         cuda_aware: Optional[bool] = None) -> torch.optim.Optimizer:
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
        cls = type(name, (optimizer.__class__,), _class_dict(_HorovodOptimizer, _StepTracking, _SSGDOptimizer))
        return cls(optimizer.param_groups, named_parameters, compression, backward_passes_per_step, op,
                   gradient_predivide_factor, groups, sparse_as_dense, process_set, callbacks)
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
    cls = type(name, (optimizer.__class__,), _class_dict(_StepTracking, _DPSGDOptimizer))
    return cls(optimizer.param_groups, named_parameters, compression, backward_passes_per_step, topology,
               callbacks, seed, timeout, overlap, cuda_aware)
