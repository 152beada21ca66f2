r"""The averager of DPSGD over MPI: the first term of paper Eq. 2, ``w_s,j(t) = sum_k W_jk(t) w_k(t)``.

:class:`NeighbourAverager` asks the topology who learner ``j`` averages with at step ``t``
(:meth:`~horovod_dpsgd.topology.Topology.plan`), has the exchange move the weights, and mixes them into
the parameters in place. The weights travel straight from the parameters' flat storage
(:mod:`horovod_dpsgd.comm.buffers`), one message per peer and dtype; a plan that averages over whole
hosts (and full averaging across hosts) is carried out host by host (:mod:`horovod_dpsgd.comm.hosts`).
"""

import os
import weakref
from typing import List, Optional, Sequence, Tuple

import torch
import horovod.torch as hvd
from horovod.torch.compression import Compressor

from horovod_dpsgd import topology as topologies
from horovod_dpsgd.comm.buffers import FlatParameters
from horovod_dpsgd.comm.exchange import (Exchange, ExchangeHandle, Transfer, abort_job_on_uncaught_exception,
                                         communicator)
from horovod_dpsgd.comm.hosts import HostAverage, HostComms, detect_layout, host_buffers
from horovod_dpsgd.errors import MPIEnvironmentError, ParameterMismatchError
from horovod_dpsgd.options import Options

__all__ = ["NeighbourAverager"]


def _launched_by_mpi() -> bool:
    return any(v in os.environ for v in ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK", "MPI_LOCALNRANKS"))


def _check_floating(named: Sequence[Tuple[str, torch.Tensor]]) -> None:
    for name, p in named:
        if not p.is_floating_point():
            raise ParameterMismatchError(
                f"parameter {name!r} has dtype {p.dtype}; DPSGD averages weights and needs floating-point "
                "parameters: give it requires_grad=False or leave it out of the optimizer")


def _check_same_parameters(comm, named: Sequence[Tuple[str, torch.Tensor]]) -> None:
    """Raise the same :class:`ParameterMismatchError` on every rank unless all ranks train the same model."""
    mine = [(n, str(p.dtype), tuple(p.shape)) for n, p in named]
    everyone = comm.allgather(mine)
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


def _host_comms(comm, topology: topologies.Topology, layout: topologies.HostLayout) -> Optional[HostComms]:
    """The host communicators the topology's plans need (:func:`~horovod_dpsgd.topology.averages_by_host`):
    for its own host layout (hierarchical), or for the job's when several hosts run several learners each
    (full averages go host by host). Collective."""
    layout = topologies.averages_by_host(topology, layout)
    if layout is None:
        return None
    return HostComms(comm, layout, topology.shards or min(layout.local_sizes))


class NeighbourAverager:
    """Moves and mixes learner ``rank``'s weights with its neighbours', one step at a time.

    :meth:`start` sends ``w_j(t)`` to step ``t``'s peers (call it once the weights are final, when the
    backward pass begins, so the transfer overlaps it); :meth:`finish` waits for the peers' weights and
    overwrites the parameters with ``w_s,j(t)``. Build it with :meth:`create`.
    """

    __slots__ = (
        # who: the topology and this learner's place in it
        "topology", "rank", "size",
        # what moves, and how: the parameters' flat storage, the exchange, the wire format
        "flat", "exchange", "compression",
        # averages over whole hosts: the hosts' communicators, each flat group's work buffers
        "hosts", "_host_buffers",
        # the step in flight
        "_plan", "_handle",
        "__weakref__",
    )

    def __init__(self, flat: FlatParameters, exchange: Exchange, topology: topologies.Topology, *, rank: int,
                 size: int, compression: Compressor, hosts: Optional[HostComms] = None):
        self.topology, self.rank, self.size = topology, rank, size
        self.flat, self.exchange, self.compression = flat, exchange, compression
        self.hosts, self._host_buffers = hosts, None
        self._plan: Optional[topologies.MixingPlan] = None
        self._handle: Optional[ExchangeHandle] = None
        # The communication thread ends with the averager. Not at interpreter exit: the daemon thread
        # then just stops, whereas waking it while Python finalizes can abort the process.
        weakref.finalize(self, exchange.close).atexit = False

    @classmethod
    def create(cls, named: Sequence[Tuple[str, torch.Tensor]], options: Options,
               compression: Compressor) -> "NeighbourAverager":
        """The averager of this Horovod rank over all ranks. Collective: every rank must call it.

        Detects the host layout (:func:`~horovod_dpsgd.comm.hosts.detect_layout`), builds the topology for it,
        moves the parameters into flat storage and checks that every rank trains the same parameters.
        """
        rank, size = hvd.rank(), hvd.size()
        if size == 1 and not _launched_by_mpi():
            raise MPIEnvironmentError(
                "horovod-dpsgd was started as a single plain `python` process, so there are no neighbours to "
                "average with: launch with `horovodrun -np N python ...` (or `mpirun -np N ...`); "
                "`horovodrun -np 1` trains one learner on purpose")
        _check_floating(named)
        comm = communicator(rank, size, options.timeout)
        layout = detect_layout(comm)
        topology = topologies.from_name(options.topology, size, options.seed, layout=layout)
        flat = FlatParameters([p for _, p in named], cuda_aware=options.cuda_aware)
        _check_same_parameters(comm, named)
        hosts = _host_comms(comm, topology, layout)
        abort_job_on_uncaught_exception()
        exchange = Exchange(comm, options.timeout, options.overlap,
                            where=layout.where if layout.num_hosts > 1 else None)
        return cls(flat, exchange, topology, rank=rank, size=size, compression=compression, hosts=hosts)

    def start(self, step: int) -> None:
        """Send ``w_j(step)`` to the peers of ``step``'s plan and post the receives."""
        plan = self.topology.plan(self.rank, step)
        self._plan = plan
        if plan.hosts or (plan.collective and self.hosts is not None):
            self._handle = self.exchange.submit(self._host_average(plan, step))
            return
        transfers: List[Transfer] = []
        for group in self.flat.groups:
            send = group.send_buffer()
            if plan.collective:
                transfers.append(Transfer(send, None, [group.sum_buffer()]))
            elif plan.peers or plan.destinations:
                wire, _ = self.compression.compress(send)
                transfers.append(Transfer(wire, plan.peers, group.recv_buffers(len(plan.peers), wire.dtype),
                                          plan.send_to))
        self._handle = self.exchange.start(transfers, step, plan.peers) if transfers else None

    def _host_average(self, plan: topologies.MixingPlan, step: int) -> HostAverage:
        """The average over the plan's hosts (every host, own first, for full averaging)."""
        comms = self.hosts
        hosts = plan.hosts or (comms.host_index,) + tuple(h for h in range(comms.layout.num_hosts)
                                                           if h != comms.host_index)
        if self._host_buffers is None:
            self._host_buffers = host_buffers(self.flat.groups, comms.shards)
        sends = [group.send_buffer() for group in self.flat.groups]
        return HostAverage(self.exchange, comms, sends, self._host_buffers, step, hosts, self.compression)

    @torch.no_grad()
    def finish(self) -> None:
        """Wait for the peers' weights and set the parameters to ``w_s,j(t) = sum_k W_jk(t) w_k(t)``."""
        handle, plan = self._handle, self._plan
        if handle is None:  # no peer this step (e.g. the unmatched learner of an odd world)
            return
        handle.wait()
        self._handle = None
        if isinstance(handle, HostAverage):
            for group, mean in zip(self.flat.groups, handle.results()):
                group.assign(mean)
            return
        for group, transfer in zip(self.flat.groups, handle.transfers):
            if plan.collective:
                group.set_average(transfer.recv[0], self.size)
            else:
                group.mix(plan.self_weight, [(w, self.compression.decompress(r, group.dtype))
                                             for w, r in zip(plan.peer_weights, transfer.recv)])

    def drain(self) -> None:
        """Complete an exchange in flight without mixing (e.g. before loading a checkpoint)."""
        if self._handle is not None:
            self._handle.wait()
            self._handle = None
