"""Topologies that know which learners share a host: :class:`HostLayout` and :class:`Hierarchical`.

Inside a host, learners talk over shared memory, where bytes are nearly free; between hosts every byte
crosses the host's network link. A topology that ignores this (a random peer, a ring) sends one model
per learner over the link, ``L`` models per host with ``L`` learners on it. :class:`Hierarchical` averages
inside each host and sends one model's worth per host and step across.
"""

from typing import Optional, Sequence, Tuple

import numpy as np

from horovod_dpsgd.errors import TopologyError
from horovod_dpsgd.topology.base import MixingPlan, Topology
from horovod_dpsgd.topology.dynamic import OnePeerExponential, RandomPeer, matching_probability, random_matching

__all__ = ["HostLayout", "Hierarchical", "default_topology", "averages_by_host", "cross_host_bytes"]


class HostLayout:
    """Which learners share a host: ``hosts[h]`` holds the ranks on host ``h`` (ascending), hosts ordered by
    their lowest rank. ``names`` are the hosts' names, for messages.

    Under horovodrun the optimizer detects it (:func:`horovod_dpsgd.comm.hosts.detect_layout`: MPI's
    shared-memory split, the layout behind ``hvd.local_size()`` and ``hvd.cross_size()``); give one
    explicitly to try a host-aware topology on one machine (``HostLayout.parse("2x2")``).
    """

    __slots__ = ("hosts", "names", "_host_of")

    def __init__(self, hosts: Sequence[Sequence[int]], names: Optional[Sequence[str]] = None):
        hosts = [tuple(sorted(int(r) for r in h)) for h in hosts]
        names = list(names) if names is not None else [f"host {h}" for h in range(len(hosts))]
        if len(names) != len(hosts):
            raise TopologyError(f"{len(names)} host names for {len(hosts)} hosts")
        if not hosts or any(not h for h in hosts):
            raise TopologyError("a host layout needs at least one host, and every host at least one rank")
        ranks = sorted(r for h in hosts for r in h)
        if ranks != list(range(len(ranks))):
            raise TopologyError(f"the hosts must hold the ranks 0..{len(ranks) - 1} once each; got {ranks}")
        order = sorted(range(len(hosts)), key=lambda h: hosts[h][0])
        self.hosts: Tuple[Tuple[int, ...], ...] = tuple(hosts[h] for h in order)
        self.names: Tuple[str, ...] = tuple(names[h] for h in order)
        self._host_of = {r: h for h, ranks in enumerate(self.hosts) for r in ranks}

    @classmethod
    def uniform(cls, num_hosts: int, per_host: int) -> "HostLayout":
        """``num_hosts`` hosts of ``per_host`` consecutive ranks (horovodrun's ``-H h1:L,h2:L,...``)."""
        return cls.from_sizes([per_host] * num_hosts)

    @classmethod
    def from_sizes(cls, sizes: Sequence[int]) -> "HostLayout":
        """Hosts of ``sizes[h]`` consecutive ranks each."""
        if any(s < 1 for s in sizes):
            raise TopologyError(f"every host needs at least one rank; got sizes {list(sizes)}")
        starts = np.cumsum([0, *sizes])
        return cls([range(a, b) for a, b in zip(starts[:-1], starts[1:])])

    @classmethod
    def parse(cls, spec: str) -> "HostLayout":
        """``"HxL"`` (``H`` hosts of ``L`` consecutive ranks) or ``"L1,L2,..."`` (hosts of these sizes)."""
        text = spec.strip().lower()
        try:
            if "x" in text:
                num_hosts, per_host = (int(v) for v in text.split("x"))
                return cls.uniform(num_hosts, per_host)
            return cls.from_sizes([int(v) for v in text.split(",")])
        except ValueError:
            raise TopologyError(f"bad host layout {spec!r}: give HxL (H hosts of L ranks, e.g. 2x4) or the "
                                "ranks per host, e.g. 4,4,2") from None

    @classmethod
    def from_host_names(cls, names: Sequence[str]) -> "HostLayout":
        """The layout of ranks whose host is ``names[rank]``."""
        hosts = {}
        for rank, name in enumerate(names):
            hosts.setdefault(name, []).append(rank)
        return cls(list(hosts.values()), list(hosts))

    @property
    def size(self) -> int:
        return len(self._host_of)

    @property
    def num_hosts(self) -> int:
        return len(self.hosts)

    @property
    def local_sizes(self) -> Tuple[int, ...]:
        return tuple(len(h) for h in self.hosts)

    def host_of(self, rank: int) -> int:
        return self._host_of[rank]

    def local_index(self, rank: int) -> int:
        """``rank``'s index among its host's ranks (Horovod's ``local_rank`` for consecutive ranks)."""
        return self.hosts[self._host_of[rank]].index(rank)

    def describe(self) -> str:
        sizes = self.local_sizes
        if len(set(sizes)) == 1:
            return f"{len(sizes)} host{'s' * (len(sizes) > 1)} x {sizes[0]} process{'es' * (sizes[0] > 1)}"
        return f"{len(sizes)} hosts of {', '.join(map(str, sizes))} processes"

    def where(self, rank: int) -> str:
        """``"rank 3 (host h2)"``, for messages."""
        return f"rank {rank} ({self.names[self._host_of[rank]]})"

    def __eq__(self, other) -> bool:
        return isinstance(other, HostLayout) and self.hosts == other.hosts

    def __hash__(self) -> int:
        return hash(self.hosts)

    def __repr__(self) -> str:
        return f"HostLayout({[list(h) for h in self.hosts]}, names={list(self.names)})"


class Hierarchical(Topology):
    r"""Average inside each host, and across hosts with one peer host per step.

    Each step, the hosts are paired by a random perfect matching drawn from ``(seed, t)`` (the paper's
    random peer, between hosts), and every learner starts from the average of all learners on its host and
    its peer host:

    .. math::
        W_{jk}(t) = \frac{1}{|h(j)| + |p_t(h(j))|} \text{ if } h(k) \in \{h(j), p_t(h(j))\}, \text{ else } 0

    where ``h(j)`` is learner ``j``'s host and ``p_t`` the matching (with an odd number of hosts, the host
    left out averages over its own learners, weight ``1 / |h(j)|``). ``W(t)`` is symmetric and doubly
    stochastic for any host sizes; with two hosts it is the full average every step.

    The averager carries it out as: a sum inside each host over shared memory (a reduce-scatter), an
    exchange of the host sums with the peer host, and a gather inside the host. The cross-host exchange
    is split into ``shards`` pieces, each sent by its own learner of the host to a learner of the peer host,
    so each host's link carries one model per step in ``shards`` parallel messages, each pair of processes
    in one direction (:func:`horovod_dpsgd.comm.hosts.cross_routes`); ``shards=1`` lets one learner per host
    (its lowest rank) carry all of it.

    Args:
        layout: the hosts (:class:`HostLayout`).
        seed: seed of the host matching; the same on every rank.
        shards: learners per host that carry the cross-host transfer (default: every learner of the
            smallest host).
        every: hosts are matched (and their links carry the host sums) at steps ``t`` with
            ``(t + 1) mod every = 0`` only; at the other steps each host averages over its own learners
            (``W(t)`` block diagonal, nothing crosses a link). ``every=1`` (default) crosses every step.
    """

    def __init__(self, layout: HostLayout, seed: int = 0, shards: Optional[int] = None, every: int = 1):
        smallest = min(layout.local_sizes)
        shards = smallest if shards is None else int(shards)
        if not 1 <= shards <= smallest:
            raise TopologyError(f"shards must be between 1 and {smallest} (the ranks on the smallest host); "
                                f"got {shards}")
        if int(every) < 1:
            raise TopologyError(f"every (steps between two exchanges across hosts) must be >= 1, got {every}")
        self.layout, self.size, self.seed, self.shards, self.every = layout, layout.size, int(seed), shards, int(every)
        self.dynamic = layout.num_hosts > 2 or (self.every > 1 and layout.num_hosts > 1)
        self.period = None if layout.num_hosts > 2 else (self.every if layout.num_hosts > 1 else 1)
        leader = ", one sender per host" if shards == 1 and max(layout.local_sizes) > 1 else ""
        across = f", across hosts every {self.every} steps" if self.every > 1 else ""
        self.name = f"hierarchical ({layout.describe()}{leader}{across})"

    def crosses(self, step: int) -> bool:
        """True at the steps whose hosts are matched (their links carry the host sums)."""
        return (step + 1) % self.every == 0

    def host_partners(self, step: int) -> np.ndarray:
        """``partner[h]`` of every host at ``step`` (``h`` itself when unmatched)."""
        if not self.crosses(step):
            return np.arange(self.layout.num_hosts)
        return random_matching(self.layout.num_hosts, self.seed, step)

    def hosts_of_step(self, rank: int, step: int) -> Tuple[int, ...]:
        """The hosts learner ``rank`` averages over at ``step``: its own, then its peer host (if any)."""
        h = self.layout.host_of(rank)
        peer = int(self.host_partners(step)[h])
        return (h,) if peer == h else (h, peer)

    def plan(self, rank: int, step: int) -> MixingPlan:
        hosts = self.hosts_of_step(rank, step)
        ranks = sorted(r for h in hosts for r in self.layout.hosts[h])
        weight = 1.0 / len(ranks)
        peers = tuple(r for r in ranks if r != rank)
        return MixingPlan(weight, peers, (weight,) * len(peers), hosts=hosts)

    def mixing_matrix(self, step: int = 0) -> np.ndarray:
        w = np.zeros((self.size, self.size))
        for h, peer in enumerate(self.host_partners(step)):
            ranks = list(self.layout.hosts[h]) + (list(self.layout.hosts[peer]) if peer != h else [])
            w[np.ix_(self.layout.hosts[h], ranks)] = 1.0 / len(ranks)
        return w

    def expected_mixing_matrix(self) -> np.ndarray:
        if self.period is not None:
            return super().expected_mixing_matrix()
        if self.every > 1:  # the matching is drawn independently of the step's phase
            alone = Hierarchical(self.layout, self.seed, self.shards, every=self.size + 1).mixing_matrix(0)
            crossing = Hierarchical(self.layout, self.seed, self.shards).expected_mixing_matrix()
            return ((self.every - 1) * alone + crossing) / self.every
        hosts, sizes = self.layout.hosts, self.layout.local_sizes
        num = len(hosts)
        p = matching_probability(num)
        alone = 0.0 if num % 2 == 0 else 1.0 / num
        w = np.zeros((self.size, self.size))
        for a in range(num):
            for b in range(num):
                value = sum(p / (sizes[a] + sizes[c]) for c in range(num) if c != a) + alone / sizes[a] \
                    if a == b else p / (sizes[a] + sizes[b])
                w[np.ix_(hosts[a], hosts[b])] = value
        return w

    def describe_plan(self, rank: int, step: int) -> str:
        hosts = " + ".join(self.layout.names[h] for h in self.hosts_of_step(rank, step))
        return super().describe_plan(rank, step) + f"  [{hosts}]"

    def __str__(self) -> str:
        lines = super().__str__().split("\n")
        hosts = [f"  {name}: ranks {', '.join(map(str, ranks))}"
                 for name, ranks in zip(self.layout.names, self.layout.hosts)]
        return "\n".join(lines[:1] + hosts + lines[1:])


def default_topology(size: int, seed: int = 0, layout: Optional[HostLayout] = None) -> Topology:
    """The topology of the one-line swap (``topology="auto"``), chosen from the host layout.

    * one host (or no layout): the paper's :class:`RandomPeer`.
    * two hosts with several learners on some of them: :class:`Hierarchical` crossing every second step
      (``every=2``). A random peer would send one model per learner across each host's link, more than
      Horovod's allreduce; each crossing step of the hierarchical topology is the full average, one model per
      host across the link, as many bytes as Horovod's allreduce, and crossing every second step, averaging
      inside each host in between, halves them.
    * any other layout of several hosts (more than two, or one learner per host): the one-peer exponential
      graph (:class:`OnePeerExponential`): one round of one-way messages per step and nothing summed inside
      the hosts; with consecutive ranks per host its hops shorter than a host stay inside it. It moves more
      bytes across the links than :class:`Hierarchical` (one model per host and step), but its step was the
      shorter one across emulated hosts, where the sum and gather inside each host cost the cores that
      compute, and shorter than the random peer's, whose exchange runs both ways on each connection.

    The measurements behind this are in docs/performance.md, "Across hosts".
    """
    if layout is not None and layout.size != size:
        raise TopologyError(f"the host layout has {layout.size} ranks but the job has {size}")
    if layout is None or layout.num_hosts == 1:
        return RandomPeer(size, seed)
    if layout.num_hosts == 2 and max(layout.local_sizes) > 1:
        return Hierarchical(layout, seed, every=AUTO_EVERY_TWO_HOSTS)
    return OnePeerExponential(size)


#: ``every`` of the default hierarchical topology on two hosts (see :func:`default_topology`)
AUTO_EVERY_TWO_HOSTS = 2


def averages_by_host(topology: Topology, layout: HostLayout) -> Optional[HostLayout]:
    """The layout over which the averager carries out host averages of ``topology`` on a job laid out as
    ``layout``: the topology's own (hierarchical topologies), or the job's when several hosts run several
    learners each (then full averaging goes host by host too); ``None``: plans are point-to-point, and full
    averaging is one MPI allreduce."""
    if topology.layout is not None:
        return topology.layout
    if layout.num_hosts > 1 and max(layout.local_sizes) > 1:
        return layout
    return None


def cross_host_bytes(topology: Topology, layout: HostLayout, step: int, nbytes: float,
                     wire: float = 1.0) -> np.ndarray:
    """Bytes each host of ``layout`` sends to other hosts at ``step``, for a model of ``nbytes`` bytes sent in
    ``wire`` of its size (0.5 with fp16 compression), as the averager carries out ``topology``'s plans.

    A point-to-point plan sends the model to each destination on another host. A host average (see
    :class:`Hierarchical`) sends, from each of a host's ``shards`` carriers, its piece of the host's sum to
    the carrier of the same piece on each peer host: the model's bytes once per peer host. An MPI allreduce
    (full averaging with one learner per host; with more than two hosts, the carriers' sum of their piece)
    is counted as a ring allreduce, ``2 (m - 1) / m`` of its bytes for ``m`` participants: an estimate, as
    MPI picks its own algorithm (fp16 compression does not apply to allreduces).
    """
    by_host = averages_by_host(topology, layout)
    shards = (topology.shards or min(by_host.local_sizes)) if by_host is not None else 1
    sent = np.zeros(layout.num_hosts)
    for rank in range(topology.size):
        plan, host = topology.plan(rank, step), layout.host_of(rank)
        if plan.hosts or (plan.collective and by_host is not None):
            index = by_host.local_index(rank)
            if index >= shards:
                continue
            piece = int((index + 1) * nbytes // shards) - int(index * nbytes // shards)
            hosts = len(plan.hosts) if plan.hosts else by_host.num_hosts
            if hosts == by_host.num_hosts > 2:  # the carriers of the piece allreduce it
                sent[host] += 2 * (hosts - 1) / hosts * piece
            else:
                sent[host] += piece * wire * (hosts - 1)
        elif plan.collective:  # one learner per host: an allreduce over all of them
            sent[host] += 2 * (topology.size - 1) / topology.size * nbytes
        else:
            sent[host] += nbytes * wire * sum(layout.host_of(k) != host for k in plan.destinations)
    return sent
