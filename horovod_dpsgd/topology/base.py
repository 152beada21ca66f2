"""What every topology is: a sequence of validated doubly stochastic mixing matrices ``W(t)``, and each
learner's row of it as a :class:`MixingPlan`."""

import abc
from typing import NamedTuple, Optional, Tuple

import numpy as np

from horovod_dpsgd.errors import TopologyError

__all__ = ["MixingPlan", "Topology", "validate_mixing_matrix", "metropolis_hastings_weights", "spectral_gap",
           "consensus_contraction"]

ATOL = 1e-8


class MixingPlan(NamedTuple):
    """One learner's row of ``W(t)``: ``w_s,j = self_weight * w_j + sum_i peer_weights[i] * w_{peers[i]}``.

    ``peers`` are the learners whose weights this one receives. It sends its own weights to ``send_to``:
    the same learners for a symmetric ``W`` (``send_to`` is ``None``), the learners whose rows weight it
    (column ``j`` of ``W``) for a directed topology. Two ways of carrying out a plan as one collective:

    * ``collective``: every learner averages with every other one with equal weights (full averaging),
      carried out as one allreduce.
    * ``hosts``: the learner averages uniformly over every rank of these hosts (its own host first; see
      :class:`~horovod_dpsgd.topology.Hierarchical`), carried out by summing inside each host over shared
      memory and exchanging the hosts' sums across them.
    """

    self_weight: float
    peers: Tuple[int, ...]
    peer_weights: Tuple[float, ...]
    collective: bool = False
    send_to: Optional[Tuple[int, ...]] = None
    hosts: Tuple[int, ...] = ()

    @property
    def destinations(self) -> Tuple[int, ...]:
        """The learners this one sends its weights to."""
        return self.peers if self.send_to is None else self.send_to


def spectral_gap(matrix: np.ndarray) -> float:
    """``1 - ||W - J/n||_2`` of a doubly stochastic ``W`` (``J`` all ones): ``1 - max(|lambda_2|, |lambda_n|)``
    for a symmetric one.

    Mixing contracts the learners' disagreement ``w_j - w_a`` by at least the factor ``1 - gap`` per step,
    so the gap sets how fast repeated mixing brings them together. For a directed ``W`` the norm is its
    largest singular value on the space orthogonal to the all-ones vector.
    """
    w = np.asarray(matrix, dtype=np.float64)
    n = w.shape[0]
    if n == 1:
        return 1.0
    return float(1.0 - np.linalg.norm(w - 1.0 / n, ord=2))


def consensus_contraction(matrices) -> float:
    """``||W(T-1) ... W(0) - J/n||_2``: how much ``T`` steps of mixing shrink the learners' disagreement
    (0: they agree exactly, as after a full average or a period of the one-peer exponential graph)."""
    product = None
    for w in matrices:
        product = np.asarray(w, dtype=np.float64) if product is None else np.asarray(w) @ product
    n = product.shape[0]
    return float(np.linalg.norm(product - 1.0 / n, ord=2))


def _strongly_connected(adjacency: np.ndarray) -> bool:
    """Every node reaches every other one along ``adjacency``'s edges (and back)."""
    n = adjacency.shape[0]

    def reached(a):
        seen, frontier = {0}, [0]
        while frontier:
            for nxt in np.flatnonzero(a[frontier.pop()]):
                if int(nxt) not in seen:
                    seen.add(int(nxt))
                    frontier.append(int(nxt))
        return len(seen) == n

    return reached(adjacency) and reached(adjacency.T)


def validate_mixing_matrix(matrix: np.ndarray, size: Optional[int] = None, *, directed: bool = False,
                           connected: bool = True) -> np.ndarray:
    """Check that ``matrix`` is a valid mixing matrix and return it as float64.

    Valid means: square, ``size x size`` (if given), finite, non-negative, every row *and* every column
    summing to one (doubly stochastic: rows make ``w_s,j`` a weighted average, columns keep the learners'
    average ``w_a`` unchanged by mixing), and its graph (strongly) connected, so the learners reach
    consensus. Undirected topologies (the default) must also be symmetric; ``directed=True`` accepts a
    non-symmetric doubly stochastic matrix (e.g. one step of the one-peer exponential graph).
    ``connected=False`` skips the last check, for one step of a schedule whose steps connect the
    learners only together. Raises :class:`TopologyError` naming the first violated property.
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
    if np.any(w < -ATOL):
        raise TopologyError("the mixing matrix has negative entries; all weights must be >= 0")
    if not directed and not np.allclose(w, w.T, atol=1e-6):
        i, j = np.unravel_index(np.argmax(np.abs(w - w.T)), w.shape)
        raise TopologyError(
            f"the mixing matrix is not symmetric: W[{i},{j}]={w[i, j]:g} but W[{j},{i}]={w[j, i]:g}; "
            "use metropolis_hastings_weights(adjacency) to build symmetric weights from a graph, or "
            "from_mixing_matrix(W, directed=True) for a directed doubly stochastic matrix")
    for axis, what in ((1, "row"), (0, "column")):
        sums = w.sum(axis=axis)
        if not np.allclose(sums, 1.0, atol=1e-6):
            bad = int(np.argmax(np.abs(sums - 1.0)))
            raise TopologyError(
                f"the mixing matrix is not doubly stochastic: {what} {bad} sums to {sums[bad]:g}, not 1; "
                "use metropolis_hastings_weights(adjacency) to build valid weights from a graph")
    if connected and not _strongly_connected(w > ATOL):
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


def plan_from_row(w: np.ndarray, j: int, *, directed: bool = False) -> MixingPlan:
    """Learner ``j``'s :class:`MixingPlan` from a validated mixing matrix ``w``."""
    peers = tuple(int(k) for k in np.flatnonzero(w[j] > ATOL) if k != j)
    send_to = tuple(int(k) for k in np.flatnonzero(w[:, j] > ATOL) if k != j) if directed else None
    return MixingPlan(float(w[j, j]), peers, tuple(float(w[j, k]) for k in peers), send_to=send_to)


class Topology(abc.ABC):
    """A sequence of mixing matrices ``W(t)`` over ``size`` learners.

    Subclasses set ``size`` and ``name`` and define :meth:`plan` and :meth:`mixing_matrix`; the class
    attributes below say what kind of sequence it is.
    """

    #: Number of learners.
    size: int
    #: True when the mixing matrix changes from step to step.
    dynamic: bool = False
    #: True when ``W(t)`` may be non-symmetric (still doubly stochastic): plans then carry ``send_to``.
    directed: bool = False
    #: ``W(t + period) = W(t)`` for every ``t``; ``None`` for random schedules.
    period: Optional[int] = 1
    #: The host layout the topology was built for (:class:`~horovod_dpsgd.topology.HostLayout`), if any.
    layout = None
    #: Learners per host that carry the cross-host transfer of host averages (``None``: all of them).
    shards: Optional[int] = None
    name: str = "topology"

    @abc.abstractmethod
    def plan(self, rank: int, step: int) -> MixingPlan:
        """Who learner ``rank`` averages with at ``step``, and with what weights."""

    @abc.abstractmethod
    def mixing_matrix(self, step: int = 0) -> np.ndarray:
        """The full ``size x size`` mixing matrix ``W(step)``."""

    def expected_mixing_matrix(self) -> np.ndarray:
        """``E[W(t)]`` over steps: the mean over one period, the matrix itself for a static topology."""
        if self.period is None:  # pragma: no cover - random schedules define it in closed form
            raise NotImplementedError
        return np.mean([self.mixing_matrix(t) for t in range(self.period)], axis=0)

    def spectral_gap(self) -> float:
        """Spectral gap of :meth:`expected_mixing_matrix` (1 = full averaging, 0 = no mixing)."""
        return spectral_gap(self.expected_mixing_matrix())

    def check_size(self, size: int) -> None:
        """Raise :class:`TopologyError` unless this topology was built for ``size`` ranks."""
        if self.size != size:
            raise TopologyError(
                f"the {self.name} topology was built for {self.size} ranks but the job has {size}; "
                f"build it with size={size} (or pass the topology by name and let the optimizer size it)")

    def validate(self, steps: Optional[int] = None) -> None:
        """Check ``W(t)`` over ``steps`` steps (one period by default): each doubly stochastic (and symmetric
        unless directed), the plans equal to its rows, and their graphs connecting all learners together."""
        steps = steps or self.period or 1
        union = np.zeros((self.size, self.size), dtype=bool)
        for t in range(steps):
            w = validate_mixing_matrix(self.mixing_matrix(t), self.size, directed=self.directed, connected=False)
            for j in range(self.size):
                p = self.plan(j, t)
                row = np.zeros(self.size)
                row[j] = p.self_weight
                np.add.at(row, list(p.peers), p.peer_weights)
                if not np.allclose(row, w[j], atol=1e-9) or sorted(p.destinations) != [
                        int(k) for k in np.flatnonzero(w[:, j] > ATOL) if k != j]:
                    raise TopologyError(f"{self.name}: rank {j}'s plan at step {t} differs from row {j} of W({t})")
            union |= w > ATOL
        if not _strongly_connected(union):
            raise TopologyError(f"{self.name}: the graphs of {steps} steps do not connect all learners")

    def describe_plan(self, rank: int, step: int) -> str:
        p = self.plan(rank, step)
        peers = ", ".join(f"{k} ({wk:.3g})" for k, wk in zip(p.peers, p.peer_weights))
        line = f"  rank {rank}: self {p.self_weight:.3g}; peers {peers or '-'}"
        if p.send_to is not None and tuple(sorted(p.send_to)) != tuple(sorted(p.peers)):
            line += f"; sends to {', '.join(map(str, p.send_to)) or '-'}"
        return line

    def __str__(self) -> str:
        kind = "dynamic" if self.dynamic else "static"
        if self.directed:
            kind += ", directed"
        lines = [f"{self.name}: {self.size} learners, {kind}, spectral gap {self.spectral_gap():.4f}"]
        if self.dynamic and self.period and self.period > 1 and self.size > 1:
            contraction = consensus_contraction(self.mixing_matrix(t) for t in range(self.period))
            lines[0] += (f"; one period ({self.period} steps) multiplies disagreement by at most "
                         f"{contraction if contraction > 1e-12 else 0:.3g}")
        if not self.dynamic:
            lines += [self.describe_plan(j, 0) for j in range(self.size)]
        else:
            lines.append("  expected mixing matrix:")
        with np.printoptions(precision=3, suppress=True, linewidth=120):
            lines.append("  W = " + str(self.expected_mixing_matrix()).replace("\n", "\n      "))
        return "\n".join(lines)
