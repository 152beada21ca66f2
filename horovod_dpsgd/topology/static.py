"""Static topologies: one mixing matrix ``W`` for every step (ring, exponential graph, random graph, full
averaging, a user's graph or matrix)."""

from typing import Iterable, Optional, Sequence, Tuple, Union

import numpy as np

from horovod_dpsgd.errors import TopologyError
from horovod_dpsgd.topology.base import (MixingPlan, Topology, _strongly_connected, metropolis_hastings_weights,
                                         plan_from_row, validate_mixing_matrix)

__all__ = ["StaticTopology", "ring", "exponential", "random_graph", "full", "from_mixing_matrix", "from_graph"]


class StaticTopology(Topology):
    """A fixed graph with a validated doubly stochastic mixing matrix (symmetric unless ``directed``)."""

    def __init__(self, matrix: np.ndarray, name: str = "mixing matrix", directed: bool = False):
        self._w = validate_mixing_matrix(matrix, directed=directed)
        self.size = self._w.shape[0]
        self.name = name
        self.directed = directed and not np.allclose(self._w, self._w.T, atol=1e-12)
        collective = self.size > 1 and bool(np.allclose(self._w, 1.0 / self.size))
        self._plans = [plan_from_row(self._w, j, directed=self.directed)._replace(collective=collective)
                       for j in range(self.size)]

    def plan(self, rank: int, step: int) -> MixingPlan:
        return self._plans[rank]

    def mixing_matrix(self, step: int = 0) -> np.ndarray:
        return self._w.copy()


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
        if _strongly_connected(adjacency | np.eye(size, dtype=bool)):
            return StaticTopology(metropolis_hastings_weights(adjacency), name=f"random graph (p={p:g})")
    raise TopologyError(
        f"no connected random graph with p={p:g} on {size} nodes in {max_tries} draws; raise p")


def full(size: int) -> StaticTopology:
    """Full averaging: every learner starts from the global mean, ``w_s,j = w_a`` (Sec. 2.1)."""
    return StaticTopology(np.full((size, size), 1.0 / size), name="full averaging")


def from_mixing_matrix(matrix: Union[np.ndarray, Sequence[Sequence[float]]], directed: bool = False) -> StaticTopology:
    """A topology from a user's doubly stochastic mixing matrix (validated).

    The matrix must be symmetric unless ``directed=True``: then learner ``j`` receives from the ``k`` with
    ``W[j, k] > 0`` and sends to the ``i`` with ``W[i, j] > 0``.
    """
    return StaticTopology(np.asarray(matrix, dtype=np.float64), name="user mixing matrix", directed=directed)


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
