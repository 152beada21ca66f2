r"""Averaging over whole hosts: a sum inside each host over shared memory, one model's worth across hosts.

A hierarchical plan (:class:`~horovod_dpsgd.topology.Hierarchical`, or full averaging across hosts) sets
every learner of a group of hosts ``G`` to their mean ``w_s = |G|^-1 sum_{k in G} w_k``. Sending every
learner's weights to every other one would put ``L`` models per host on the host's link; instead, in
rounds of non-blocking MPI on the communication thread:

1. **sum inside the host** (reduce-scatter over the host's communicator, shared memory): the host's ``K``
   *shard carriers* (its learners of local index ``0..K-1``) each receive one ``1/K`` piece of the sum of
   the host's weights;
2. **across hosts**: each carrier sends its piece to the peer host and receives the peer host's sum of a
   piece (with all hosts at once, an allreduce among the carriers of piece ``l``); ``K`` parallel messages
   carry one model per host and step over the link, compressed if the optimizer compresses;
3. **relay inside the host**, between two hosts with ``K >= 2`` carriers each: every connection across the
   link carries one direction only (:func:`cross_routes`), because a TCP connection carrying a bulk
   transfer both ways at once gets about half the link's rate under Open MPI (docs/performance.md, "Across
   hosts"). So one host of the pair receives each piece on the neighbour of its carrier, which passes it on
   over shared memory (``1/K`` of a model); the two hosts take this role in turn, step by step;
4. **gather inside the host** (allgather): every learner receives every piece of the mean.

The result goes into the parameters when the training thread calls ``finish`` (the backward pass reads
them until then).
"""

from typing import List, NamedTuple, Optional, Sequence, Tuple

import numpy as np
import torch
from horovod.torch.compression import Compressor

from horovod_dpsgd.comm.buffers import FlatGroup
from horovod_dpsgd.comm.exchange import _TAGS, Exchange, ExchangeHandle, _as_bytes, _as_typed, _mpi
from horovod_dpsgd.topology import HostLayout

__all__ = ["detect_layout", "HostComms", "HostAverage", "Routes", "cross_routes"]


def detect_layout(comm) -> HostLayout:
    """The host layout of ``comm``'s ranks, the same on every rank. Collective.

    Hosts are MPI's shared-memory domains (``MPI_Comm_split_type(MPI_COMM_TYPE_SHARED)``): the learners
    that can talk over shared memory, which is what Horovod's ``local_size()`` counts too. Each host is named
    by ``MPI_Get_processor_name`` of its lowest rank.
    """
    MPI = _mpi()
    node = comm.Split_type(MPI.COMM_TYPE_SHARED, key=comm.Get_rank())
    try:
        leader = node.allreduce(comm.Get_rank(), op=MPI.MIN)
    finally:
        node.Free()
    everyone = comm.allgather((leader, MPI.Get_processor_name()))
    hosts = {}
    for rank, (host, _) in enumerate(everyone):
        hosts.setdefault(host, []).append(rank)
    return HostLayout(list(hosts.values()), [everyone[host][1] for host in hosts])


class HostComms:
    """The communicators of a host layout, seen from one rank. Collective to build.

    ``host``: this rank's host, ranks in local order. ``cross``: the ``shards`` carriers of this rank's
    piece, one per host in host order (``None`` on a rank that carries no piece).
    """

    __slots__ = ("layout", "shards", "rank", "host_index", "local_index", "host", "cross")

    def __init__(self, comm, layout: HostLayout, shards: int):
        MPI = _mpi()
        self.layout, self.shards, self.rank = layout, shards, comm.Get_rank()
        self.host_index, self.local_index = layout.host_of(self.rank), layout.local_index(self.rank)
        self.host = comm.Split(self.host_index, self.local_index)
        cross = comm.Split(self.local_index if self.local_index < shards else MPI.UNDEFINED, self.host_index)
        self.cross = None if cross == MPI.COMM_NULL else cross

    def describe(self, host: int) -> str:
        ranks = self.layout.hosts[host]
        return f"{self.layout.names[host]} (rank{'s' * (len(ranks) > 1)} {', '.join(map(str, ranks))})"


class Routes(NamedTuple):
    """One carrier's messages across hosts in a host average (:func:`cross_routes`)."""

    dests: Tuple[int, ...] = ()  #: the ranks this carrier sends its piece of its host's sum to
    sources: Tuple[int, ...] = ()  #: the ranks it receives a peer host's sum of a piece from
    pieces: Tuple[int, ...] = ()  #: the index of the piece received from each source
    relay: Optional[Tuple[int, int]] = None  #: (owner of the received piece, carrier relaying this one's) or None


def cross_routes(layout: HostLayout, shards: int, hosts: Sequence[int], rank: int, step: int) -> Routes:
    """Who carrier ``rank`` sends its piece to and receives from at ``step``, averaging over ``hosts``.

    With carriers ``A_0..A_{K-1}`` and ``B_0..B_{K-1}`` of two hosts, ``K >= 2``, and ``A`` the host that
    relays at this step (the lower of the two at even steps, the higher at odd ones)::

        A_l --piece l of A's sum--> B_l            B_l --piece l of B's sum--> A_{l+1}
        A_{l+1} --piece l of B's sum--> A_l        (inside host A: the relay round)

    so each pair of processes across the link carries one direction only, and every piece ends on its
    carrier. With one carrier per host, or more than two hosts, carrier ``l`` exchanges with carrier ``l`` of
    each peer host both ways. A learner that carries no piece sends nothing across.
    """
    index, own = layout.local_index(rank), layout.host_of(rank)
    if index >= shards or len(hosts) < 2:
        return Routes()

    def carrier(host: int, piece: int) -> int:
        return layout.hosts[host][piece % shards]

    peers = [h for h in hosts if h != own]
    if shards == 1 or len(peers) > 1:
        ranks = tuple(carrier(h, index) for h in peers)
        return Routes(ranks, ranks, (index,) * len(ranks))
    (peer,) = peers
    if own == sorted(hosts)[step % 2]:  # this host relays
        return Routes((carrier(peer, index),), (carrier(peer, index - 1),), ((index - 1) % shards,),
                      (carrier(own, index - 1), carrier(own, index + 1)))
    return Routes((carrier(peer, index + 1),), (carrier(peer, index),), (index,))


class _Buffers:
    """One flat group's work buffers for host averages, allocated once: the bounds of its pieces, the host's
    sum of this rank's piece (then the mean), the peer hosts' sums as received, and the mean of all."""

    __slots__ = ("bounds", "accum", "piece_sum", "received", "result")

    def __init__(self, group: FlatGroup, shards: int):
        n, device = group.numel, group.comm_device
        self.bounds = [k * n // shards for k in range(shards + 1)]
        # Sums of float16/bfloat16 weights are taken in float32 (MPI has no reduction for them).
        self.accum = group.dtype if group.dtype in (torch.float32, torch.float64) else torch.float32
        self.piece_sum = torch.empty(max(b - a for a, b in zip(self.bounds[:-1], self.bounds[1:])),
                                     dtype=self.accum, device=device)
        self.received: List[torch.Tensor] = []
        self.result = torch.empty(n, dtype=group.dtype, device=device)

    def piece(self, index: int) -> Tuple[int, int]:
        return self.bounds[index], self.bounds[index + 1]

    def size(self, index: int) -> int:
        return self.bounds[index + 1] - self.bounds[index]

    def counts(self, local: int) -> List[int]:
        """Elements of each local rank's piece (0 for the learners that carry none)."""
        return [b - a for a, b in zip(self.bounds[:-1], self.bounds[1:])] + [0] * (local - len(self.bounds) + 1)

    def receive_buffers(self, count: int, numel: int, dtype: torch.dtype) -> List[torch.Tensor]:
        if any(b.dtype != dtype for b in self.received):
            self.received = []
        while len(self.received) < count:
            self.received.append(torch.empty_like(self.piece_sum, dtype=dtype))
        return [b[:numel] for b in self.received[:count]]


class HostAverage(ExchangeHandle):
    """One step's average over the learners of the hosts ``hosts`` (own host first), in rounds (module doc).

    ``sends`` are the flat groups' weights as :meth:`FlatGroup.send_buffer` gave them at the step's start;
    :meth:`results` gives, once waited for, each group's mean, to be copied into the parameters.
    """

    def __init__(self, exchange: Exchange, comms: HostComms, sends: Sequence[torch.Tensor],
                 buffers: Sequence[_Buffers], step: int, hosts: Sequence[int], compression: Compressor):
        layout = comms.layout
        #: every host at once, more than two: the carriers of a piece allreduce it instead of exchanging it
        allreduce_across = len(hosts) == layout.num_hosts > 2
        routes = Routes() if allreduce_across else cross_routes(layout, comms.shards, hosts, comms.rank, step)
        super().__init__(exchange, [], step, sorted({*routes.dests, *routes.sources, *(routes.relay or ())}))
        self.comms, self.buffers, self.hosts, self.compression = comms, list(buffers), tuple(hosts), compression
        self.routes, self.allreduce_across = routes, allreduce_across
        self.count = sum(len(layout.hosts[h]) for h in hosts)
        self.local = len(layout.hosts[comms.host_index])
        self._sends = list(sends)
        self._own: List[torch.Tensor] = []  # per group: this rank's piece of its host's sum
        self._wire: List[torch.Tensor] = []  # per group: that piece as sent across hosts
        self._incoming: List[List[torch.Tensor]] = [[] for _ in self.buffers]  # per group: peer hosts' sums of it
        self._round = 0

    def _post(self) -> None:
        if self._round == 0:
            self._round = 1
            self._sum_inside_host()
            if not self._requests:
                self._next_round()

    def _next_round(self) -> bool:
        self._requests, self._request_peers, self._receives, self._steps = [], [], [], None
        rounds = {2: self._across_hosts, 3: self._relay_inside_host, 4: self._gather_inside_host}
        while not self._requests:
            self._round += 1
            if self._round not in rounds:
                return False
            rounds[self._round]()
        return True

    def _sum_inside_host(self) -> None:
        """Round 1: carrier ``l`` receives piece ``l`` of the sum of its host's weights."""
        MPI = _mpi()
        c = self.comms
        label = f"the sum inside {c.describe(c.host_index)}"
        for send, buf in zip(self._sends, self.buffers):
            if send.dtype != buf.accum:
                send = send.to(buf.accum)
            if self.local == 1:  # this learner is its host: its weights are the host's sum
                self._own.append(send)
                continue
            own = buf.piece_sum[:buf.counts(self.local)[c.local_index]]
            self._own.append(own)
            self._requests.append(c.host.Ireduce_scatter(_as_typed(send), _as_typed(own),
                                                         buf.counts(self.local), op=MPI.SUM))
            self._request_peers.append(label)

    def _across_hosts(self) -> None:
        """Round 2: this carrier sends its piece of its host's sum across and receives a peer host's sum of a
        piece (:func:`cross_routes`), or with every host at once allreduces its piece with the other carriers."""
        MPI = _mpi()
        c, routes = self.comms, self.routes
        if self.allreduce_across and c.local_index < c.shards:
            for own in self._own:
                self._requests.append(c.cross.Iallreduce(MPI.IN_PLACE, _as_typed(own), op=MPI.SUM))
                self._request_peers.append(f"the sum across all hosts of piece {c.local_index}")
            return
        if not routes.sources:  # a learner that carries no piece, or a host without a peer host this step
            return
        for group, (own, buf) in enumerate(zip(self._own, self.buffers)):
            wire, _ = self.compression.compress(own)
            self._wire.append(wire)
            received = buf.receive_buffers(len(routes.sources) + (routes.relay is not None), len(buf.piece_sum),
                                           wire.dtype)
            self._incoming[group] = [recv[:buf.size(piece)] for recv, piece in zip(received, routes.pieces)]
            for peer, recv in zip(routes.sources, self._incoming[group]):
                self._receive(recv, peer)
            for peer in routes.dests:
                self._send(wire, peer)

    def _relay_inside_host(self) -> None:
        """Round 3, on the relaying host only: pass the peer host's piece on to its carrier, and receive this
        carrier's from the neighbour that got it."""
        if self.routes.relay is None:
            return
        owner, relayer = self.routes.relay
        for group, buf in enumerate(self.buffers):
            (received,) = self._incoming[group]
            mine = buf.received[1][:buf.size(self.comms.local_index)]
            self._receive(mine, relayer)
            self._send(received, owner)
            self._incoming[group] = [mine]

    def _receive(self, buffer: torch.Tensor, peer: int) -> None:
        """Post a receive from ``peer`` (any tag: a peer at another step is named, not left waiting)."""
        self._receives.append(len(self._requests))
        self._requests.append(self._exchange.comm.Irecv(_as_bytes(buffer), source=peer, tag=_mpi().ANY_TAG))
        self._request_peers.append(peer)

    def _send(self, buffer: torch.Tensor, peer: int) -> None:
        self._requests.append(self._exchange.comm.Isend(_as_bytes(buffer), dest=peer, tag=self.step % _TAGS))
        self._request_peers.append(peer)

    def _gather_inside_host(self) -> None:
        """Round 4: carrier ``l`` computes piece ``l`` of the mean; every learner of the host gathers them all."""
        MPI = _mpi()
        c = self.comms
        self._sends, self._wire = [], []
        peers = " and ".join(c.describe(h) for h in self.hosts[1:])
        label = f"the gather inside {c.describe(c.host_index)}" + (f" after its exchange with {peers}" if peers else "")
        for own, incoming, buf in zip(self._own, self._incoming, self.buffers):
            if c.local_index < c.shards:
                lo, hi = buf.piece(c.local_index)
                total = own
                if not self.allreduce_across:
                    for recv in incoming:
                        peer = self.compression.decompress(recv, buf.accum)
                        if total is own and self.local == 1:  # own is the parameters' storage: sum elsewhere
                            total = torch.add(own, peer, out=buf.piece_sum[:hi - lo])
                        else:
                            total.add_(peer)
                if total.dtype == buf.result.dtype:
                    torch.div(total, self.count, out=buf.result[lo:hi])
                else:
                    buf.result[lo:hi].copy_(total / self.count)
            if self.local > 1:
                size = buf.result.element_size()
                counts = buf.counts(self.local)
                displacements = [buf.bounds[min(k, c.shards)] * size for k in range(self.local)]
                self._requests.append(c.host.Iallgatherv(
                    MPI.IN_PLACE, [_as_typed(buf.result.view(torch.uint8)), [n * size for n in counts],
                                   displacements, MPI.BYTE]))
                self._request_peers.append(label)
        self._own, self._incoming = [], []

    def sources(self) -> List[int]:
        """The learners whose weights this average mixes."""
        return sorted(r for h in self.hosts for r in self.comms.layout.hosts[h])

    def results(self) -> List[torch.Tensor]:
        """Each flat group's mean over the hosts' learners (valid after :meth:`wait`)."""
        return [buf.result for buf in self.buffers]


def host_buffers(groups: Sequence[FlatGroup], shards: int) -> List[_Buffers]:
    """Work buffers of each flat group for :class:`HostAverage`."""
    return [_Buffers(group, shards) for group in groups]
