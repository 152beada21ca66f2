"""Communication topologies: who each learner averages with, and with what weights.

A topology is data. For a world of ``size`` learners it yields, at every step ``t``, a
symmetric doubly stochastic *mixing matrix* ``W(t)``. Row ``j`` of ``W(t)`` holds the weights
with which learner ``j`` averages its own and its neighbours' weights into the starting
weight of paper Eq. 2::

    w_s,j(t) = sum_k W_jk(t) w_k(t)

Static topologies (ring, exponential graph, random graph, full averaging, a user's matrix)
have one ``W``; dynamic ones (a random peer per step) draw ``W(t)`` from a seed shared by all
ranks, so every rank computes the same matching without talking to the others.

Example::

    >>> from horovod_dpsgd import topology
    >>> print(topology.ring(4))                      # doctest: +SKIP
    >>> topology.from_name("random_peer", size=4, seed=0).plan(rank=0, step=3)  # doctest: +SKIP
"""

import abc
from typing import Iterable, NamedTuple, Optional, Sequence, Tuple, Union

import numpy as np

from horovod_dpsgd.errors import TopologyError

__all__ = [
    "MixingPlan",
    "Topology",
    "StaticTopology",
    "RandomPeer",
    "ring",
    "exponential",
    "random_graph",
    "full",
    "from_mixing_matrix",
    "from_graph",
    "from_name",
    "metropolis_hastings_weights",
    "validate_mixing_matrix",
    "spectral_gap",
    "TOPOLOGY_NAMES",
]

_ATOL = 1e-8


class MixingPlan(NamedTuple):
    """One learner's share of a mixing step: its own weight and its peers' weights.

    ``collective`` is True when every learner averages with every other one with equal
    weights (full averaging), which the exchange carries out as one allreduce.
    """

    self_weight: float
    peers: Tuple[int, ...]
    peer_weights: Tuple[float, ...]
    collective: bool = False


def spectral_gap(matrix: np.ndarray) -> float:
    """``1 - max(|lambda_2|, |lambda_n|)`` of a symmetric mixing matrix.

    The gap sets how fast repeated mixing contracts the learners towards their mean: after
    ``t`` steps the consensus distance shrinks by at least ``(1 - gap)^(2t)``.
    """
    w = np.asarray(matrix, dtype=np.float64)
    if w.shape[0] == 1:
        return 1.0
    eig = np.sort(np.abs(np.linalg.eigvalsh(w)))[::-1]
    return float(1.0 - eig[1])


def _is_connected(adjacency: np.ndarray) -> bool:
    n = adjacency.shape[0]
    seen = {0}
    frontier = [0]
    while frontier:
        node = frontier.pop()
        for nxt in np.flatnonzero(adjacency[node]):
            if int(nxt) not in seen:
                seen.add(int(nxt))
                frontier.append(int(nxt))
    return len(seen) == n


def validate_mixing_matrix(matrix: np.ndarray, size: Optional[int] = None) -> np.ndarray:
    """Check that ``matrix`` is a valid mixing matrix and return it as float64.

    Valid means: square, ``size x size`` (if given), non-negative, symmetric, every row
    summing to one (hence doubly stochastic), and its graph connected. Raises
    :class:`TopologyError` naming the first violated property otherwise.
    """
    w = np.asarray(matrix, dtype=np.float64)
    if w.ndim != 2 or w.shape[0] != w.shape[1]:
        raise TopologyError(f"a mixing matrix must be square; got shape {w.shape}")
    if size is not None and w.shape[0] != size:
        raise TopologyError(
            f"the mixing matrix is {w.shape[0]}x{w.shape[0]} but the job has {size} ranks; "
            f"give a {size}x{size} matrix or launch with -np {w.shape[0]}")
    if not np.all(np.isfinite(w)):
        raise TopologyError("the mixing matrix contains NaN or infinite entries")
    if np.any(w < -_ATOL):
        raise TopologyError("the mixing matrix has negative entries; all weights must be >= 0")
    if not np.allclose(w, w.T, atol=1e-6):
        i, j = np.unravel_index(np.argmax(np.abs(w - w.T)), w.shape)
        raise TopologyError(
            f"the mixing matrix is not symmetric: W[{i},{j}]={w[i, j]:g} but W[{j},{i}]={w[j, i]:g}; "
            "use metropolis_hastings_weights(adjacency) to build symmetric weights from a graph")
    rows = w.sum(axis=1)
    if not np.allclose(rows, 1.0, atol=1e-6):
        bad = int(np.argmax(np.abs(rows - 1.0)))
        raise TopologyError(
            f"the mixing matrix is not doubly stochastic: row {bad} sums to {rows[bad]:g}, not 1; "
            "use metropolis_hastings_weights(adjacency) to build valid weights from a graph")
    if not _is_connected(w > _ATOL):
        raise TopologyError(
            "the mixing matrix's graph is not connected, so the learners would never reach "
            "consensus; add edges between the components")
    return w


def metropolis_hastings_weights(adjacency: np.ndarray) -> np.ndarray:
    """Symmetric doubly stochastic weights for an undirected graph (Metropolis-Hastings).

    ``W_jk = 1 / (1 + max(d_j, d_k))`` for each edge, ``W_jj = 1 - sum_k W_jk``. On a
    regular graph of degree ``d`` this is the uniform ``1 / (d + 1)``.
    """
    a = np.asarray(adjacency) != 0
    if a.ndim != 2 or a.shape[0] != a.shape[1]:
        raise TopologyError(f"an adjacency matrix must be square; got shape {a.shape}")
    a = a & ~np.eye(a.shape[0], dtype=bool)
    if not np.array_equal(a, a.T):
        raise TopologyError("the graph must be undirected: adjacency[j, k] must equal adjacency[k, j]")
    deg = a.sum(axis=1)
    n = a.shape[0]
    w = np.zeros((n, n))
    rows, cols = np.nonzero(a)
    w[rows, cols] = 1.0 / (1.0 + np.maximum(deg[rows], deg[cols]))
    w[np.arange(n), np.arange(n)] = 1.0 - w.sum(axis=1)
    return w


class Topology(abc.ABC):
    """A sequence of mixing matrices over ``size`` learners."""

    #: Number of learners.
    size: int
    #: True when the mixing matrix changes from step to step.
    dynamic: bool = False
    name: str = "topology"

    @abc.abstractmethod
    def plan(self, rank: int, step: int) -> MixingPlan:
        """Who learner ``rank`` averages with at ``step``, and with what weights."""

    @abc.abstractmethod
    def mixing_matrix(self, step: int = 0) -> np.ndarray:
        """The full ``size x size`` mixing matrix ``W(step)``."""

    def expected_mixing_matrix(self) -> np.ndarray:
        """``E[W(t)]`` over steps; the matrix itself for a static topology."""
        return self.mixing_matrix(0)

    def spectral_gap(self) -> float:
        """Spectral gap of :meth:`expected_mixing_matrix` (1 = full averaging, 0 = no mixing)."""
        return spectral_gap(self.expected_mixing_matrix())

    def check_size(self, size: int) -> None:
        """Raise :class:`TopologyError` unless this topology was built for ``size`` ranks."""
        if self.size != size:
            raise TopologyError(
                f"the {self.name} topology was built for {self.size} ranks but the job has {size}; "
                f"build it with size={size} (or pass the topology by name and let the optimizer size it)")

    def __str__(self) -> str:
        w = self.expected_mixing_matrix()
        lines = [f"{self.name}: {self.size} learners, {'dynamic' if self.dynamic else 'static'}, "
                 f"spectral gap {self.spectral_gap():.4f}"]
        if not self.dynamic:
            for j in range(self.size):
                p = self.plan(j, 0)
                peers = ", ".join(f"{k} ({wk:.3g})" for k, wk in zip(p.peers, p.peer_weights))
                lines.append(f"  rank {j}: self {p.self_weight:.3g}; peers {peers or '-'}")
        else:
            lines.append("  expected mixing matrix:")
        with np.printoptions(precision=3, suppress=True, linewidth=120):
            lines.append("  W = " + str(w).replace("\n", "\n      "))
        return "\n".join(lines)


class StaticTopology(Topology):
    """A fixed graph with a validated symmetric doubly stochastic mixing matrix."""

    def __init__(self, matrix: np.ndarray, name: str = "mixing matrix"):
        self._w = validate_mixing_matrix(matrix)
        self.size = self._w.shape[0]
        self.name = name
        collective = bool(np.allclose(self._w, 1.0 / self.size))
        self._plans = []
        for j in range(self.size):
            peers = tuple(int(k) for k in np.flatnonzero(self._w[j] > _ATOL) if k != j)
            self._plans.append(MixingPlan(
                float(self._w[j, j]), peers, tuple(float(self._w[j, k]) for k in peers),
                collective and self.size > 1))

    def plan(self, rank: int, step: int) -> MixingPlan:
        return self._plans[rank]

    def mixing_matrix(self, step: int = 0) -> np.ndarray:
        return self._w.copy()


class RandomPeer(Topology):
    """Each step, a random perfect matching: every learner averages 1:1 with one peer.

    This is the paper's evaluation setting (Sec. 4: "a learner randomly picks a neighbor with
    which to exchange weights in each iteration"). The matching of step ``t`` is drawn from
    ``(seed, t)``, so all ranks agree on it without communication. With an odd world size
    one learner per step has no partner and keeps its own weights.
    """

    dynamic = True
    name = "random peer"

    def __init__(self, size: int, seed: int = 0):
        if size < 1:
            raise TopologyError(f"size must be >= 1, got {size}")
        self.size = size
        self.seed = int(seed)

    def partners(self, step: int) -> np.ndarray:
        """``partner[j]`` of every learner at ``step`` (``j`` itself when unmatched)."""
        perm = np.random.default_rng([self.seed, int(step)]).permutation(self.size)
        partner = np.arange(self.size)
        pairs = perm[: self.size - self.size % 2].reshape(-1, 2)
        partner[pairs[:, 0]] = pairs[:, 1]
        partner[pairs[:, 1]] = pairs[:, 0]
        return partner

    def plan(self, rank: int, step: int) -> MixingPlan:
        peer = int(self.partners(step)[rank])
        if peer == rank:
            return MixingPlan(1.0, (), ())
        return MixingPlan(0.5, (peer,), (0.5,))

    def mixing_matrix(self, step: int = 0) -> np.ndarray:
        partner = self.partners(step)
        w = np.zeros((self.size, self.size))
        idx = np.arange(self.size)
        w[idx, idx] += 0.5
        w[idx, partner] += 0.5
        return w

    def expected_mixing_matrix(self) -> np.ndarray:
        n = self.size
        if n == 1:
            return np.ones((1, 1))
        # A given pair is matched with probability 1/(n-1) (n even) or 1/n (n odd).
        p = 1.0 / (n - 1) if n % 2 == 0 else 1.0 / n
        w = np.full((n, n), 0.5 * p)
        np.fill_diagonal(w, 1.0 - 0.5 * p * (n - 1))
        return w


def ring(size: int, k: int = 1) -> StaticTopology:
    """Ring where each learner averages uniformly with ``k`` neighbours on each side.

    The paper's Sec. 2.2 setting is ``ring(6, k=2)``. Neighbours that coincide on a small
    ring (``2k + 1 > size``) are counted once.
    """
    if k < 1:
        raise TopologyError(f"a ring needs k >= 1 neighbours per side, got k={k}")
    adjacency = np.zeros((size, size), dtype=bool)
    for j in range(size):
        for d in range(1, k + 1):
            adjacency[j, (j + d) % size] = adjacency[j, (j - d) % size] = True
    return StaticTopology(metropolis_hastings_weights(adjacency), name=f"ring (k={k})")


def exponential(size: int) -> StaticTopology:
    """Undirected exponential graph: learner ``j`` is linked to ``j +/- 2^i`` (mod size)."""
    adjacency = np.zeros((size, size), dtype=bool)
    for j in range(size):
        hop = 1
        while hop < size:
            adjacency[j, (j + hop) % size] = adjacency[j, (j - hop) % size] = True
            hop *= 2
    return StaticTopology(metropolis_hastings_weights(adjacency), name="exponential graph")


def random_graph(size: int, p: float = 0.5, seed: int = 0, max_tries: int = 1000) -> StaticTopology:
    """A connected Erdos-Renyi graph G(size, p) with Metropolis-Hastings weights.

    Graphs are drawn from ``seed`` until one is connected, so all ranks build the same one.
    """
    if not 0.0 < p <= 1.0:
        raise TopologyError(f"edge probability p must be in (0, 1], got {p}")
    rng = np.random.default_rng(seed)
    for _ in range(max_tries):
        upper = np.triu(rng.random((size, size)) < p, 1)
        adjacency = upper | upper.T
        if _is_connected(adjacency | np.eye(size, dtype=bool)):
            return StaticTopology(metropolis_hastings_weights(adjacency), name=f"random graph (p={p:g})")
    raise TopologyError(
        f"no connected random graph with p={p:g} on {size} nodes in {max_tries} draws; raise p")


def full(size: int) -> StaticTopology:
    """Full averaging: every learner starts from the global mean, ``w_s,j = w_a`` (Sec. 2.1)."""
    return StaticTopology(np.full((size, size), 1.0 / size), name="full averaging")


def from_mixing_matrix(matrix: Union[np.ndarray, Sequence[Sequence[float]]]) -> StaticTopology:
    """A topology from a user's symmetric doubly stochastic mixing matrix (validated)."""
    return StaticTopology(np.asarray(matrix, dtype=np.float64), name="user mixing matrix")


def from_graph(graph: Union[np.ndarray, Iterable[Tuple[int, int]]], size: Optional[int] = None) -> StaticTopology:
    """A topology from an undirected graph: an adjacency matrix or an edge list.

    Weights are Metropolis-Hastings (:func:`metropolis_hastings_weights`). For an edge list
    give ``size`` (the number of learners), or it is taken as the largest node index + 1.
    """
    if isinstance(graph, np.ndarray) and graph.ndim == 2 and graph.shape[0] == graph.shape[1] \
            and graph.shape[0] > 2:
        adjacency = graph != 0
    else:
        edges = [(int(a), int(b)) for a, b in graph]
        n = size if size is not None else 1 + max(max(e) for e in edges)
        adjacency = np.zeros((n, n), dtype=bool)
        for a, b in edges:
            if not (0 <= a < n and 0 <= b < n):
                raise TopologyError(f"edge ({a}, {b}) names a rank outside 0..{n - 1}")
            adjacency[a, b] = adjacency[b, a] = True
    adjacency = adjacency | adjacency.T
    return StaticTopology(metropolis_hastings_weights(adjacency), name="user graph")


#: Names accepted by :func:`from_name` (and the ``--topology`` option of the CLI).
TOPOLOGY_NAMES = ("ring", "random_peer", "random_graph", "exponential", "full")


def from_name(spec: Union[str, Topology, np.ndarray], size: int, seed: int = 0) -> Topology:
    """Build a topology for ``size`` ranks from a name, a matrix, or return a Topology as is.

    Names: ``ring`` or ``ring:K`` (K neighbours per side), ``random_peer``, ``random_graph``
    or ``random_graph:P`` (edge probability), ``exponential``, ``full``.
    """
    if isinstance(spec, Topology):
        spec.check_size(size)
        return spec
    if isinstance(spec, np.ndarray) or (isinstance(spec, (list, tuple)) and spec and
                                        isinstance(spec[0], (list, tuple, np.ndarray))):
        return from_mixing_matrix(validate_mixing_matrix(spec, size))
    if not isinstance(spec, str):
        raise TopologyError(f"topology must be a name, a Topology or a mixing matrix; got {type(spec).__name__}")
    name, _, arg = spec.partition(":")
    name = name.strip().lower().replace("-", "_")
    try:
        if name == "ring":
            return ring(size, int(arg) if arg else 1)
        if name in ("random_peer", "random_matching"):
            return RandomPeer(size, seed)
        if name == "random_graph":
            return random_graph(size, float(arg) if arg else 0.5, seed)
        if name in ("exponential", "exp"):
            return exponential(size)
        if name == "full":
            return full(size)
    except ValueError as exc:
        if isinstance(exc, TopologyError):
            raise
        raise TopologyError(f"bad argument {arg!r} in topology {spec!r}: {exc}") from None
    raise TopologyError(f"unknown topology {spec!r}; choose one of {', '.join(TOPOLOGY_NAMES)} "
                        "(ring and random_graph take an argument, e.g. 'ring:2', 'random_graph:0.3'), "
                        "or pass a mixing matrix or a Topology")

