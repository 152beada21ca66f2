r"""How weights and gradients move between stacked learners: one product with the mixing matrix.

The MPI plugin moves learner ``j``'s weights to its neighbours and mixes them in place
(:class:`~horovod_dpsgd.comm.averaging.NeighbourAverager`); here all learners are rows of the same tensors, so
the first term of paper Eq. 2 for every learner at once is one matrix product with the step's mixing matrix:

.. math::
    W_s(t) = W(t)\, X(t), \qquad X(t) = [w_1(t); \dots; w_n(t)] \in \mathbb{R}^{n \times P}

:class:`StackedAverager` implements DPSGD's ``Averager`` protocol with it, :class:`StackedGradientMean` SSGD's
``GradientAverager`` (paper Eq. 1: ``g_a = n^-1 sum_k g_k`` in every learner's row).
"""

import warnings
import weakref
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from horovod_dpsgd import topology as topologies
from horovod_dpsgd.errors import NonFiniteError, ParameterMismatchError

__all__ = ["MixingMatrix", "StackedAverager", "StackedGradientMean", "StackedScreen"]

#: How a mixing matrix is applied (docs/simulator.md has the measurements behind the thresholds): below
#: ``SPARSE_MIN_LEARNERS`` learners as a dense product; above, a matrix whose rows have at most
#: ``NEIGHBOURS_MAX`` non-zero entries learner by learner (gather the neighbours' rows, one matrix-vector product),
#: one with at most ``SPARSE_MAX_DENSITY`` of its entries non-zero as a CSR product, any other dense.
SPARSE_MIN_LEARNERS, NEIGHBOURS_MAX, SPARSE_MAX_DENSITY = 16, 8, 0.25


def _rows(t: torch.Tensor) -> Optional[torch.Tensor]:
    """``t``'s memory as an ``(n, m)`` matrix, row ``j`` holding learner ``j``'s elements (in memory order), or
    ``None`` when a learner's elements are not one contiguous block."""
    n = t.shape[0]
    m = t.numel() // n if n else 0
    inner = sorted((st, s) for s, st in zip(t.shape[1:], t.stride()[1:]) if s != 1)
    expected = 1
    for stride, size in inner:
        if stride != expected:
            return None
        expected *= size
    if n > 1 and t.stride(0) != m:
        return None
    return t.as_strided((n, m), (m, 1))


class MixingMatrix:
    """``W(t)`` of one step, applied to stacked rows: ``rows <- W(t) rows``, in place.

    ``kind`` says how: ``"mean"`` (full averaging, every entry ``1/n``), ``"dense"`` (a matrix product),
    ``"sparse"`` (a CSR product) or ``"neighbours"`` (row ``j`` of the result is the product of the rows of
    ``j``'s neighbours with their weights). Build it with :meth:`of`.
    """

    __slots__ = ("kind", "matrix", "neighbours", "_cast")

    def __init__(self, kind: str, matrix: Optional[torch.Tensor] = None,
                 neighbours: Sequence[Tuple[torch.Tensor, torch.Tensor]] = ()):
        self.kind, self.matrix, self.neighbours = kind, matrix, list(neighbours)
        self._cast: Dict[Tuple[torch.dtype, torch.device], object] = {}

    @classmethod
    def of(cls, w: np.ndarray) -> "MixingMatrix":
        n = w.shape[0]
        if np.allclose(w, 1.0 / n, rtol=0, atol=1e-12):
            return cls("mean")
        dense = torch.from_numpy(np.ascontiguousarray(w))
        nonzero = w != 0
        if n < SPARSE_MIN_LEARNERS:
            return cls("dense", dense)
        if nonzero.sum(1).max() <= NEIGHBOURS_MAX:
            return cls.by_neighbours(w)
        if nonzero.sum() <= SPARSE_MAX_DENSITY * n * n:
            with warnings.catch_warnings():  # "Sparse CSR tensor support is in beta state"
                warnings.simplefilter("ignore", UserWarning)
                return cls("sparse", dense.to_sparse_csr())
        return cls("dense", dense)

    @classmethod
    def by_neighbours(cls, w: np.ndarray) -> "MixingMatrix":
        """``W`` applied row by row from the non-zero entries only: a learner's row never touches the rows it
        gives no weight (whatever they hold, NaN included, whereas a product adds ``0 * NaN = NaN``)."""
        nonzero = w != 0
        return cls("neighbours", neighbours=[(torch.from_numpy(np.flatnonzero(row)), torch.from_numpy(w[j, row]))
                                             for j, row in enumerate(nonzero)])

    def _like(self, rows: torch.Tensor):
        """The matrix (or the neighbours' indices and weights) in ``rows``' dtype and on its device."""
        key = (rows.dtype, rows.device)
        if key not in self._cast:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                self._cast[key] = [(i.to(rows.device), v.to(device=rows.device, dtype=rows.dtype))
                                   for i, v in self.neighbours] if self.kind == "neighbours" else \
                    self.matrix.to(device=rows.device, dtype=rows.dtype)
        return self._cast[key]

    @torch.no_grad()
    def apply_(self, rows: torch.Tensor) -> None:
        """``rows <- W rows`` for an ``(n, m)`` matrix of stacked learners' elements."""
        if self.kind == "mean":
            rows.copy_(rows.mean(0, keepdim=True).expand_as(rows))
        elif self.kind == "neighbours":
            mixed = torch.empty_like(rows)
            for j, (index, weights) in enumerate(self._like(rows)):
                torch.mv(rows.index_select(0, index).t(), weights, out=mixed[j])
            rows.copy_(mixed)
        elif self.kind == "sparse":
            rows.copy_(torch.sparse.mm(self._like(rows), rows))
        else:
            rows.copy_(torch.mm(self._like(rows), rows))


def _check_stacked(params: Sequence[torch.Tensor], n: int) -> None:
    for i, p in enumerate(params):
        if p.dim() == 0 or p.shape[0] != n:
            raise ParameterMismatchError(f"parameter #{i} has shape {tuple(p.shape)}, not ({n}, ...): the simulator "
                                         "trains the stacked parameters of horovod_dpsgd.sim.Learners")
        if not p.is_floating_point():
            raise ParameterMismatchError(f"parameter #{i} has dtype {p.dtype}; DPSGD averages weights and needs "
                                         "floating-point parameters: give it requires_grad=False")


class StackedScreen:
    """The MPI plugin's non-finite weights check (:mod:`horovod_dpsgd.comm.screen`) for stacked learners.

    Before a step's mix, one reduction per parameter and one host synchronisation find the learners whose weights
    are not all finite. Then, as over MPI:

    * ``"raise"``: :class:`~horovod_dpsgd.NonFiniteError` if some learner ``j`` would mix in the non-finite weights
      of another learner ``k`` (``W_jk(t) != 0``), naming both and the step. (A learner that mixes with no one that
      step, e.g. the unmatched learner of a random peer step, raises nothing, as over MPI.)
    * ``"skip"``: ``W(t)``'s entries of non-finite learners are set to zero and every row renormalised,
      ``w_s,j = sum_{k finite} W_jk w_k / sum_{k finite} W_jk``; a row with nothing finite left keeps its weights.
      ``rejected_by_learner[j]`` counts, per source, the mixes learner ``j`` left it out of (what MPI rank ``j``'s
      ``rejected_weights`` counts); the first time a source is left out a :class:`RuntimeWarning` names it.
    """

    __slots__ = ("policy", "rejected_by_learner")

    def __init__(self, policy: str, n: int):
        if policy not in ("raise", "skip"):
            raise ValueError(f"a weight screen's policy is 'raise' or 'skip', not {policy!r}")
        self.policy = policy
        self.rejected_by_learner: List[Dict[int, int]] = [{} for _ in range(n)]

    @property
    def rejected(self) -> Dict[int, int]:
        """``{learner: count}``: the mixes each learner's weights were left out of, summed over the learners."""
        total: Dict[int, int] = {}
        for counts in self.rejected_by_learner:
            for k, c in counts.items():
                total[k] = total.get(k, 0) + c
        return total

    @staticmethod
    @torch.no_grad()
    def finite(params: Sequence[torch.Tensor]) -> torch.Tensor:
        """``(n,)`` booleans: whether all of learner ``j``'s weights are finite (one host sync)."""
        sums = torch.stack([p.data.reshape(p.shape[0], -1).sum(1, dtype=torch.promote_types(p.dtype, torch.float32))
                            for p in params]).isfinite().all(0).cpu()
        for j in (~sums).nonzero().flatten().tolist():  # a sum can overflow although every element is finite
            sums[j] = all(bool(p.data[j].isfinite().all()) for p in params)
        return sums

    def mixing(self, w: np.ndarray, ok: torch.Tensor, step: int) -> Optional[np.ndarray]:
        """``W(t)`` with the non-finite learners (``~ok``) left out, or None if it is unchanged."""
        bad = (~ok).nonzero().flatten().tolist()
        if not bad:
            return None
        uses = {j: [k for k in bad if k != j and w[j, k] != 0] for j in range(w.shape[0])}
        if self.policy == "raise":
            receivers = [j for j, ks in uses.items() if ks]
            if not receivers:
                return None
            raise NonFiniteError(
                f"learner{'s' if len(receivers) > 1 else ''} {', '.join(map(str, receivers))}: at step {step} the "
                f"weights of learner{'s' if len(bad) > 1 else ''} {', '.join(map(str, bad))} are NaN or infinite; "
                "mixing would spread them to every learner. Lower the learning rate or add gradient clipping, or "
                "pass nonfinite='skip' to leave non-finite weights out of the mix")
        keep = ok.numpy().astype(w.dtype)
        screened = w * keep[None, :]
        totals = screened.sum(1)
        for j in range(w.shape[0]):
            left_out = uses[j] + ([j] if not ok[j] and w[j, j] != 0 else [])
            for k in left_out:
                if all(k not in counts for counts in self.rejected_by_learner):
                    warnings.warn(f"learner {k}: its NaN or infinite weights were left out of the mix at step {step} "
                                  "(nonfinite='skip'); later occurrences are counted in optimizer.rejected_weights",
                                  RuntimeWarning)
                self.rejected_by_learner[j][k] = self.rejected_by_learner[j].get(k, 0) + 1
            if totals[j] > 0:
                screened[j] /= totals[j]
            else:  # nothing finite to mix: the learner keeps its weights
                screened[j] = 0.0
                screened[j, j] = 1.0
        return screened


class StackedAverager:
    """DPSGD's averager for learners stacked in one process: ``w_s,j(t) = sum_k W_jk(t) w_k(t)`` for all ``j``
    as one product of the topology's ``W(t)`` with the stacked weights (the ``Averager`` protocol of
    :mod:`horovod_dpsgd.algorithms.dpsgd`).

    Args:
        params: the stacked parameters (``shape (n, ...)``) the optimizer trains.
        topology: the learners' topology (the same object the MPI plugin plans with).
        screen: the non-finite weights check (``nonfinite="raise"`` or ``"skip"``), or None (``"ignore"``).
    """

    __slots__ = ("topology", "params", "screen", "_step", "_static")

    def __init__(self, params: Sequence[torch.Tensor], topology: topologies.Topology,
                 screen: Optional[StackedScreen] = None):
        _check_stacked(params, topology.size)
        self.topology, self.params, self.screen = topology, list(params), screen
        self._step: Optional[int] = None
        self._static = None if topology.dynamic else MixingMatrix.of(topology.mixing_matrix(0))

    def agree_on_step(self, step: int, restored: bool) -> int:
        """The learners share one optimizer and hence one step: ``step``."""
        return step

    def matrix(self, step: int) -> MixingMatrix:
        """``W(step)``: the topology's mixing matrix (drawn from ``(seed, step)`` for a random peer)."""
        return self._static if self._static is not None else MixingMatrix.of(self.topology.mixing_matrix(step))

    def start(self, step: int) -> None:
        """Remember the step whose ``W(t)`` :meth:`finish` applies (the weights are final)."""
        self._step = step

    @torch.no_grad()
    def finish(self) -> None:
        """Overwrite every learner's parameters with ``w_s,j(t)``."""
        if self._step is None:
            return
        step, self._step = self._step, None
        if self.topology.size == 1:
            return
        w = self.matrix(step)
        if self.screen is not None:
            screened = self.screen.mixing(self.topology.mixing_matrix(step), self.screen.finite(self.params), step)
            if screened is not None:  # row by row, so that the left-out weights are not even read
                w = MixingMatrix.by_neighbours(screened)
        for p in self.params:
            rows = _rows(p.data)
            if rows is not None:
                w.apply_(rows)
            else:  # a learner's elements are scattered in memory: mix a contiguous copy
                rows = p.data.reshape(p.shape[0], -1).clone()
                w.apply_(rows)
                p.data.copy_(rows.view(p.shape))

    def drain(self) -> None:
        """Forget a started step without mixing."""
        self._step = None


def _count_pass(averager_ref: "weakref.ref[StackedGradientMean]", p: torch.Tensor) -> None:
    averager = averager_ref()
    if averager is not None:
        averager._on_backward(p)


class StackedGradientMean:
    """SSGD's gradient averager for learners stacked in one process: every learner's row of ``.grad`` becomes
    ``g_a = n^-1 sum_k g_k`` (Horovod's ``op=Average``); the ``GradientAverager`` protocol of
    :mod:`horovod_dpsgd.algorithms.ssgd`.

    Like Horovod, a parameter without a gradient gets a zero one, and more backward passes than
    ``backward_passes_per_step`` before the step raise.
    """

    __slots__ = ("params", "backward_passes_per_step", "_passes", "__weakref__")

    def __init__(self, param_groups: List[dict], *, n: int, backward_passes_per_step: int = 1):
        if backward_passes_per_step < 1:
            raise ValueError("backward_passes_per_step must be > 0")
        self.params = [p for group in param_groups for p in group["params"] if p.requires_grad]
        _check_stacked(self.params, n)
        self.backward_passes_per_step = backward_passes_per_step
        self._passes: Dict[torch.Tensor, int] = dict.fromkeys(self.params, 0)
        ref = weakref.ref(self)
        handles = [p.register_post_accumulate_grad_hook(lambda p, ref=ref: _count_pass(ref, p)) for p in self.params]
        weakref.finalize(self, lambda: [h.remove() for h in handles]).atexit = False

    def _on_backward(self, p: torch.Tensor) -> None:
        self._passes[p] += 1
        if self._passes[p] > self.backward_passes_per_step:
            raise AssertionError("Gradients were computed more than backward_passes_per_step times before call "
                                 "to step(). Increase backward_passes_per_step to accumulate gradients locally.")

    @torch.no_grad()
    def agree_on_step(self, step: int, restored: bool) -> int:
        """The learners share one optimizer and hence one step: ``step``."""
        return step

    @torch.no_grad()
    def synchronize(self) -> None:
        for p in self.params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            else:
                p.grad.copy_(p.grad.mean(0, keepdim=True).expand_as(p.grad))
        self._passes = dict.fromkeys(self.params, 0)

    def pending(self) -> bool:
        return False

    def set_backward_passes_per_step(self, passes: int) -> None:
        self.backward_passes_per_step = passes
        self._passes = dict.fromkeys(self.params, 0)

    def drop(self) -> None:
        self._passes = dict.fromkeys(self.params, 0)
