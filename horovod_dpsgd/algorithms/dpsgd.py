r"""Decentralized Parallel SGD, paper Eq. 2.

.. math::
    w_j(t+1) = \sum_k W_{jk}(t)\, w_k(t) - \alpha \nabla L_{\mu_j(t)}(w_j(t))

The weights ``w_j(t)`` are sent to this step's peers as soon as the backward pass starts (they
are final then), straight from the parameters' flat storage (see :mod:`horovod_dpsgd.comm.buffers`),
so the exchange overlaps the backward computation; ``step()`` waits only for what is still in
flight, mixes in place, then applies the wrapped optimizer's update (momentum and weight decay
stay local).
"""

import warnings
import weakref
from contextlib import contextmanager

import torch
import horovod.torch as hvd

from horovod_dpsgd import topology as topologies
from horovod_dpsgd.algorithms.base import StepTracking, named_trainable
from horovod_dpsgd.comm.buffers import FlatParameters
from horovod_dpsgd.errors import ParameterMismatchError
from horovod_dpsgd.comm.exchange import Exchange, Transfer, abort_job_on_uncaught_exception, communicator


class DPSGD(StepTracking):
    """Weights averaged with the topology's neighbours before each local update."""

    def __init__(self, params, named_parameters, compression, backward_passes_per_step, topology,
                 callbacks, seed, timeout, overlap, cuda_aware, nonfinite):
        super(self.__class__, self).__init__(params)
        named = named_trainable(self.param_groups, named_parameters)
        self._compression = compression
        self.backward_passes_per_step = backward_passes_per_step
        self._rank, self._size = hvd.rank(), hvd.size()
        self._topology = topologies.from_name(topology, self._size, seed)
        for name, p in named:
            if not p.is_floating_point():
                raise ParameterMismatchError(
                    f"parameter {name!r} has dtype {p.dtype}; DPSGD averages weights and needs floating-point "
                    "parameters: give it requires_grad=False or leave it out of the optimizer")
        self._flat = FlatParameters([p for _, p in named], cuda_aware=cuda_aware)
        self._comm = communicator(self._rank, self._size, timeout)
        self._check_same_parameters(named)
        self._exchange = Exchange(self._comm, timeout, overlap)
        # The communication thread ends with the optimizer. Not at interpreter exit: the daemon thread
        # then just stops, whereas waking it while Python finalizes can abort the process.
        weakref.finalize(self, self._exchange.close).atexit = False
        abort_job_on_uncaught_exception()
        self._handle = None
        self._plan = None
        self._synchronized = False
        self._should_synchronize = True
        self._init_tracking(named, callbacks, "dpsgd", nonfinite)

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
            send = group.send_buffer()
            if plan.collective:
                transfers.append(Transfer(send, None, [group.sum_buffer()]))
            elif plan.peers:
                wire, _ = self._compression.compress(send)
                transfers.append(Transfer(wire, plan.peers, group.recv_buffers(len(plan.peers), wire.dtype)))
        self._plan = plan
        self._handle = self._exchange.start(transfers, self._step_count, plan.peers) if transfers else None

    @torch.no_grad()
    def _mix(self) -> None:
        """Replace the parameters by ``w_s,j(t) = sum_k W_jk w_k(t)`` (the first term of Eq. 2)."""
        plan = self._plan
        if self._handle is None:  # no peer this step (e.g. the unmatched learner of an odd world)
            return
        self._handle.wait()
        transfers, self._handle = self._handle.transfers, None
        for group, transfer in zip(self._flat.groups, transfers):
            if plan.collective:
                group.set_average(transfer.recv[0], self._size)
            else:
                group.mix(plan.self_weight, [(w, self._compression.decompress(r, group.dtype))
                                             for w, r in zip(plan.peer_weights, transfer.recv)])

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
        loss = super(self.__class__, self).step(closure) if self._gradients_finite() else None
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
