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
from horovod.torch.compression import Compressor

from horovod_dpsgd import topology as topologies
from horovod_dpsgd.comm.buffers import FlatParameters
from horovod_dpsgd.comm.agreement import resolve_step
from horovod_dpsgd.comm.exchange import Exchange, ExchangeHandle, Transfer, abort_job_on_uncaught_exception
from horovod_dpsgd.comm.hosts import HostAverage, HostComms, host_buffers
from horovod_dpsgd.comm import liveness
from horovod_dpsgd.comm.screen import WeightScreen, finite
from horovod_dpsgd.errors import MPIEnvironmentError, ParameterMismatchError
from horovod_dpsgd.options import Options

__all__ = ["NeighbourAverager"]


def _launched_by_mpi() -> bool:
    return any(v in os.environ for v in ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK", "MPI_LOCALNRANKS"))


def check_launch(size: int) -> None:
    """Raise MPIEnvironmentError for a DPSGD optimizer in a lone ``python`` process (nobody to average with)."""
    if size == 1 and not _launched_by_mpi():
        raise MPIEnvironmentError(
            "horovod-dpsgd was started as a single plain `python` process, so there are no neighbours to "
            "average with: launch with `horovodrun -np N python ...` (or `mpirun -np N ...`); "
            "`horovodrun -np 1` trains one learner on purpose")


def check_floating(named: Sequence[Tuple[str, torch.Tensor]]) -> None:
    """Raise ParameterMismatchError for parameters DPSGD cannot average (integer ones)."""
    for name, p in named:
        if not p.is_floating_point():
            raise ParameterMismatchError(
                f"parameter {name!r} has dtype {p.dtype}; DPSGD averages weights and needs floating-point "
                "parameters: give it requires_grad=False or leave it out of the optimizer")


def _host_comms(comm, topology: topologies.Topology, layout: Optional[topologies.HostLayout]) -> Optional[HostComms]:
    """The host communicators the topology's plans need (:func:`~horovod_dpsgd.topology.averages_by_host`):
    for its own host layout (hierarchical), or for the job's when several hosts run several learners each
    (full averages go host by host). Collective."""
    layout = topologies.averages_by_host(topology, layout) if layout is not None else topology.layout
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
        # this optimizer's place among the learners that announce when they leave
        "membership",
        # what may be mixed: the non-finite weights check (None: nonfinite="ignore")
        "screen",
        # the step in flight
        "_plan", "_handle",
        "__weakref__",
    )

    def __init__(self, flat: FlatParameters, exchange: Exchange, topology: topologies.Topology, *, rank: int,
                 size: int, compression: Compressor, membership: Optional[liveness.Membership] = None,
                 screen: Optional[WeightScreen] = None, hosts: Optional[HostComms] = None):
        self.topology, self.rank, self.size = topology, rank, size
        self.flat, self.exchange, self.compression = flat, exchange, compression
        self.membership, self.screen = membership, screen
        self.hosts, self._host_buffers = hosts, None
        self._plan: Optional[topologies.MixingPlan] = None
        self._handle: Optional[ExchangeHandle] = None
        # The communication thread ends with the averager. Not at interpreter exit: the daemon thread
        # then just stops, whereas waking it while Python finalizes can abort the process.
        weakref.finalize(self, exchange.close).atexit = False

    @classmethod
    def create(cls, named: Sequence[Tuple[str, torch.Tensor]], options: Options, compression: Compressor,
               topology: topologies.Topology, comm,
               layout: Optional[topologies.HostLayout] = None) -> "NeighbourAverager":
        """The averager of this Horovod rank over ``comm``, the plugin's communicator on which the ranks have
        agreed on their settings (:func:`~horovod_dpsgd.comm.agreement.agree_at_construction`), laid out on hosts
        as ``layout`` (:func:`~horovod_dpsgd.comm.hosts.detect_layout`). Moves the parameters into flat storage."""
        membership = liveness.join(comm, options.timeout)
        abort_job_on_uncaught_exception()  # from here on, a rank that fails ends the job
        flat = FlatParameters([p for _, p in named], cuda_aware=options.cuda_aware)
        hosts = _host_comms(comm, topology, layout)
        exchange = Exchange(comm, options.timeout, options.overlap, check=membership.check,
                            where=layout.where if layout is not None and layout.num_hosts > 1 else None)
        rank = comm.Get_rank()
        screen = None if options.nonfinite == "ignore" else WeightScreen(options.nonfinite, rank)
        return cls(flat, exchange, topology, rank=rank, size=comm.Get_size(), compression=compression,
                   membership=membership, screen=screen, hosts=hosts)

    def agree_on_step(self, step: int, restored: bool) -> int:
        """The step every rank continues from (collective, at the first exchange after construction): fresh ranks
        take the step of the ranks that restored a state; ranks that disagree otherwise raise StepMismatchError on
        every rank (see :func:`~horovod_dpsgd.comm.agreement.resolve_step`)."""
        everyone = self.exchange.gather_step(step, restored)
        step = resolve_step([int(s) for s in everyone[:, 0]], [bool(r) for r in everyone[:, 1]])
        self._announce_after(step)
        return step

    def start(self, step: int) -> None:
        """Send ``w_j(step)`` to the peers of ``step``'s plan and post the receives."""
        plan = self.topology.plan(self.rank, step)
        self._announce_after(step + 1)
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

    def _announce_after(self, steps: int) -> None:
        """If this learner leaves now, it leaves after ``steps`` steps (its weights of step ``steps - 1`` are sent)."""
        if self.membership is not None:
            self.membership.steps = steps

    @torch.no_grad()
    def finish(self) -> None:
        """Wait for the peers' weights and set the parameters to ``w_s,j(t) = sum_k W_jk(t) w_k(t)``.

        Unless ``nonfinite="ignore"``, the weights about to be mixed are checked first and non-finite ones raise
        or are left out (:mod:`horovod_dpsgd.comm.screen`)."""
        handle, plan = self._handle, self._plan
        if handle is None:  # no peer this step (e.g. the unmatched learner of an odd world)
            return
        handle.wait()
        self._handle = None
        groups = self.flat.groups
        if isinstance(handle, HostAverage):
            means = handle.results()
            if self.screen is not None and not all(finite(means)):
                self._mix_finite_of_hosts(handle)
                return
            for group, mean in zip(groups, means):
                group.assign(mean)
            return
        if plan.collective:
            sums, count = [t.recv[0] for t in handle.transfers], self.size
            if self.screen is not None and not all(finite(sums)):
                sums, count = self._sum_of_finite(handle.step)
            for group, total in zip(groups, sums if count else ()):
                group.set_average(total, count)
            return
        weights = plan.self_weight, plan.peer_weights
        if self.screen is not None:
            weights = self.screen.weights(plan, [g.send for g in groups], [t.recv for t in handle.transfers],
                                          handle.step)
            if weights is None:  # nothing finite to mix
                return
        for group, transfer in zip(groups, handle.transfers):
            group.mix(weights[0], [(w, self.compression.decompress(r, group.dtype))
                                   for w, r in zip(weights[1], transfer.recv) if w])

    def _mix_finite_of_hosts(self, handle: HostAverage) -> None:
        """A host average met non-finite weights. Every learner of its hosts holds the same mean, so all of them
        are here: one more exchange sends each one's weights to the others, and the screen mixes them as a
        point-to-point plan, leaving out (or raising on) exactly the non-finite ones."""
        ranks = handle.sources()
        peers = tuple(r for r in ranks if r != self.rank)
        plan = topologies.MixingPlan(1.0 / len(ranks), peers, (1.0 / len(ranks),) * len(peers))
        groups = self.flat.groups
        transfers = [Transfer(g.send, peers, g.recv_buffers(len(peers), g.dtype)) for g in groups]
        self.exchange.start(transfers, handle.step, peers).wait()
        weights = self.screen.weights(plan, [g.send for g in groups], [t.recv for t in transfers], handle.step)
        for group, transfer in zip(groups, transfers if weights is not None else ()):
            group.mix(weights[0], [(w, r) for w, r in zip(weights[1], transfer.recv) if w])

    def _sum_of_finite(self, step: int) -> Tuple[List[torch.Tensor], int]:
        """Full averaging met a non-finite sum (every rank sees the same sum, so every rank is here): one more
        allreduce gathers who is not finite and sums the weights of those who are. Returns (sums, count)."""
        own_finite = all(finite([g.send for g in self.flat.groups]))
        flags = torch.zeros(self.size, dtype=torch.float64)
        flags[self.rank] = 0.0 if own_finite else 1.0
        transfers = [Transfer(flags, None, [torch.empty_like(flags)])]
        transfers += [Transfer(g.send if own_finite else torch.zeros_like(g.send), None, [g.sum_buffer()])
                      for g in self.flat.groups]
        self.exchange.start(transfers, step).wait()
        bad = [r for r, flag in enumerate(transfers[0].recv[0].tolist()) if flag]
        self.screen.reject(bad, step)
        return [t.recv[0] for t in transfers[1:]], self.size - len(bad)

    def drain(self) -> None:
        """Complete an exchange in flight without mixing (e.g. before loading a checkpoint)."""
        if self._handle is not None:
            self._handle.wait()
            self._handle = None
