"""NoiseDiagnostics: measures the paper's noise quantities during training and logs them to TensorBoard.

The quantities themselves are functions of flat vectors in :mod:`horovod_dpsgd.diagnostics.quantities`; this
callback gathers the vectors they need across learners (with Horovod) every ``every`` steps: in
``on_before_mixing`` everything that needs the step's starting point ``w_j(t)``, ``w_a(t)`` and the gradients, in
``on_step_end`` the displacement of the mean ``dW_a = w_a(t) - w_a(t + 1)``, after every callback's update.
"""

import dataclasses
import functools
import math
import numbers
import os
import warnings
from typing import Any, Callable, Dict, List, Mapping, Optional, Protocol, Sequence, Tuple, Union

import torch
import horovod.torch as hvd

from horovod_dpsgd.callbacks import Callback, StepContext
from horovod_dpsgd.diagnostics import measure
from horovod_dpsgd.diagnostics.quantities import eq3, gram, landscape_noise

__all__ = ["NoiseDiagnostics", "TAGS", "Collectives"]

#: TensorBoard tag of each key of :attr:`NoiseDiagnostics.last` (``consensus/<layer>`` keys are tags already).
TAGS = {"alpha_e": "noise/alpha_e", "alpha_e_over_alpha": "noise/alpha_e_over_alpha", "delta": "noise/delta",
        "delta2": "noise/delta2", "delta2_hessian": "noise/delta2_hessian", "norm_dw": "noise/norm_dw",
        "grad_alpha_e_over_alpha": "grad/alpha_e_over_alpha", "grad_delta": "grad/delta",
        "consensus_distance": "consensus/distance", "norm_ga": "grad/norm_ga", "norm_g": "grad/norm_g",
        "loss": "diag/loss", "lr": "diag/lr"}

Batches = Sequence[Tuple[Any, Any]]


def _average_(tensors: List[torch.Tensor], name: str) -> None:
    """Average ``tensors`` over ranks in place, in one Horovod group (a seam the tests replace with a fake)."""
    hvd.grouped_allreduce_(tensors, op=hvd.Average, name=f"horovod_dpsgd.diagnostics.{name}")


def _allgather_object(obj: Any, name: str) -> List[Any]:
    """``obj`` of every rank, in rank order (a seam the tests replace with a fake)."""
    return hvd.allgather_object(obj, name=f"horovod_dpsgd.diagnostics.{name}")


class Collectives(Protocol):
    """How the learners' measurements are combined: over MPI ranks with Horovod (the default), or among the
    learners of a simulated run (:class:`horovod_dpsgd.sim.NoiseDiagnostics`)."""

    def average_(self, tensors: List[torch.Tensor], name: str) -> None:
        """Average ``tensors`` over learners, in place."""

    def allgather_object(self, obj: Any, name: str) -> List[Any]:
        """``obj`` of every learner, in learner order."""


class _Horovod:
    """The default :class:`Collectives`: Horovod's, through the module's seams."""

    def average_(self, tensors: List[torch.Tensor], name: str) -> None:
        _average_(tensors, name)

    def allgather_object(self, obj: Any, name: str) -> List[Any]:
        return _allgather_object(obj, name)


@dataclasses.dataclass
class _Started:
    """What ``on_before_mixing`` of step ``t`` measured, for ``on_step_end`` to complete."""

    lr: float
    #: The work vectors: ``g``, ``diff``, ``g_j`` and ``d`` (``w_j(t)``, then ``w_j(t) - w_j(t+1)``).
    vectors: Dict[str, torch.Tensor]
    #: The part of the work buffer averaged over learners.
    averaged: torch.Tensor
    #: Per-learner scalars averaged over learners: consensus total and per layer, loss, Eq. 4's Hessian form.
    sums: torch.Tensor
    layers: List[str]
    with_diff: bool


class NoiseDiagnostics(Callback):
    """Measures Eq. 3 and Eq. 4 every ``every`` steps and logs them to TensorBoard from rank 0.

    Eq. 3 is measured on the displacement of the learners' mean, ``dW_a = w_a(t) - w_a(t + 1)``: what the
    step did to ``w_a``, whatever did it (the wrapped optimizer's update with momentum or weight decay, the
    mixing, weights perturbed by other callbacks such as :class:`~horovod_dpsgd.GaussianNoise`). With plain SGD
    and no perturbation, ``dW_a = alpha g_a``, the paper's form. The gradient term alone, ``alpha g_a``, is
    logged too (``grad/*``).

    ``g = grad L(w_a)`` is the gradient of the *training* loss, estimated on ``probe``: batches of training data
    that the measured step did not use (a fixed sample of the training set, or a callable ``step -> batches``
    that draws them per step). Estimating ``g`` on the step's own minibatches would make ``g = g_a`` in SSGD:
    ``alpha_e = alpha`` and ``Delta = 0`` by construction. Pass the same probe on every rank, or a shard per rank
    (``g`` is then the average over ranks). With the same probe everywhere (found out from a digest of its
    tensors), the learners split its batches among them, and a probe of one batch is computed by every learner
    and not averaged: no work is done twice.

    ``Delta^(2)`` needs each learner's current minibatch: call :meth:`observe` every iteration after
    ``loss.backward()``. This learner recomputes ``grad L_mu_j`` at ``w_j`` and at ``w_a`` under the same random
    seed (same dropout masks), so the difference reflects the weights only (``reuse_grad=True`` takes the one at
    ``w_j`` from ``.grad`` instead). The parameters point at ``w_a`` for that, then at ``w_j`` again, and the
    module buffers (e.g. BatchNorm statistics) are restored bit for bit; ``.grad`` is never written.

    The values describe the update ``t -> t + 1`` and are logged at ``t + 1``, the optimizer's ``step_count``
    after it (the x axis of ``horovod-dpsgd train``'s ``train/loss``), on the steps where that is a multiple of
    ``every``; :attr:`last` holds them, with ``last["step"] = t + 1``. Other steps compute nothing.

    Args:
        model: the module whose parameters the optimizer trains.
        loss_fn: ``loss_fn(model(inputs), targets) -> scalar``, e.g. ``torch.nn.functional.cross_entropy``.
        probe: a non-empty list of ``(inputs, targets)`` training batches estimating ``g``, or a callable
            ``step -> list`` of them.
        every: steps between diagnostics (a positive integer).
        log_dir: a TensorBoard directory, a ``SummaryWriter``, or ``None`` (values only in :attr:`last`).
        hessian: also compute Eq. 4's Hessian form ``noise/delta2_hessian`` (Hessian of the probe loss at ``w_a``).
        reuse_grad: take ``grad L_mu_j(w_j)`` from ``.grad`` instead of recomputing it: one forward/backward pass
            less per diagnostic step. Valid when ``.grad`` is one backward pass of exactly
            ``loss_fn(model(inputs), targets)`` on the observed batch and the model draws no random numbers. A
            step where :meth:`observe` ran more than once, ``.grad`` changed after it (e.g. clipping), or the
            model drew random numbers (dropout) recomputes instead, with a warning.
        collectives: how learners' values are averaged (:class:`Collectives`); default Horovod's.
    """

    def __init__(self, model: torch.nn.Module, loss_fn: Callable[[Any, Any], torch.Tensor],
                 probe: Union[Batches, Callable[[int], Batches]], every: int = 50, log_dir: Any = None,
                 hessian: bool = False, reuse_grad: bool = False, collectives: Optional[Collectives] = None):
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not callable(loss_fn):
            raise TypeError("loss_fn must be callable as loss_fn(model(inputs), targets)")
        if isinstance(every, bool) or not isinstance(every, numbers.Integral) or every < 1:
            raise ValueError(f"NoiseDiagnostics every must be a positive integer number of steps, got {every!r}; "
                             "use every=50 to measure every 50th step")
        if not callable(probe):
            probe = measure.checked_probe(probe)
        if log_dir is not None and not hasattr(log_dir, "add_scalar") and not isinstance(log_dir, (str, os.PathLike)):
            raise TypeError(f"log_dir must be a directory, a SummaryWriter or None, got {type(log_dir).__name__}")
        self.model, self.loss_fn, self.probe = model, loss_fn, probe
        self.every, self.hessian, self.reuse_grad = int(every), bool(hessian), bool(reuse_grad)
        self._log_dir, self._writer, self._owns_writer = log_dir, None, False
        self._collectives = _Horovod() if collectives is None else collectives
        self._probe = measure.Probe(probe, self._collectives.allgather_object)
        self._batch = measure.ObservedBatch()
        self._work = measure.Workspace()
        self._started: Optional[_Started] = None
        self._warned: set = set()
        #: The values of the last diagnostic step, keyed as :data:`TAGS` plus ``"step"`` (``t + 1``).
        self.last: Dict[str, float] = {}
        #: Number of diagnostic steps run so far.
        self.count = 0

    def observe(self, inputs: Any, targets: Any, loss: Any = None) -> None:
        """Record this iteration's minibatch and loss (references only; call after ``loss.backward()``)."""
        self._batch.record(inputs, targets, loss, self.model if self.reuse_grad else None)

    def on_before_mixing(self, ctx: StepContext) -> None:
        batch, observed = self._batch.take()
        if (ctx.step + 1) % self.every:
            return
        reuse = self.reuse_grad and self._reusable(ctx, batch, observed)
        self._started = self._start(ctx, batch, reuse)

    def on_step_end(self, ctx: StepContext) -> None:
        started, self._started = self._started, None
        if started is None:
            return
        self.last = self._finish(ctx, started)
        self.count += 1
        if ctx.rank == 0:
            self._log(self.last, self.last["step"])

    def close(self) -> None:
        """Flush the TensorBoard events; closes the writer if this callback created it."""
        if self._writer is not None:
            self._writer.flush()
            if self._owns_writer:
                self._writer.close()
                self._writer = None

    # -- the measurement, step by step ------------------------------------------------------------------

    @torch.no_grad()
    def _start(self, ctx: StepContext, batch: Optional[measure.Batch], reuse: bool) -> _Started:
        """At ``w_j(t)``: the mean ``w_a(t)``, ``g`` at it, Eq. 4's gradient difference, per-learner sums."""
        params, n, dpsgd = list(ctx.parameters()), ctx.size, ctx.algorithm != "ssgd"
        dtype = functools.reduce(torch.promote_types, (p.dtype for p in params), torch.float32)
        w_a, with_diff = measure.mean_weights(params, batch is not None, n, self._work, dtype,
                                              self._collectives.average_) \
            if dpsgd else (None, False)
        probe, scale, average_g = self._probe.share(ctx.step, ctx.rank, n)
        vectors, averaged = self._work.vectors(params, dtype, average_g=average_g, with_diff=with_diff, dpsgd=dpsgd)
        measure.copy_into(vectors["d"], params)                       # w_j(t), for the displacement
        measure.copy_into(vectors["g_j"], [measure.grad_or_zero(p) for p in params])
        layers = measure.layers(self.model, params)
        sums = [*measure.consensus_parts(params, w_a, layers, n), measure.loss_part(batch, n)]
        hessian_part = 0.0
        passes = measure.Passes(self.model, self.loss_fn, params)
        with passes.restoring():
            if with_diff:  # grad L_mu_j(w_j), then minus grad L_mu_j(w_a) below
                own = [measure.grad_or_zero(p) for p in params] if reuse else \
                    passes.grads(batch, measure.seed(ctx.step, ctx.rank))[0]
                measure.copy_into(vectors["diff"], own)
            if dpsgd:
                passes.point_at(w_a)
            passes.probe_gradient(vectors["g"], probe, scale, ctx.step)
            if with_diff:
                self._subtract_at_mean(ctx, passes, batch, vectors["diff"], reuse, w_a)
            if self.hessian and dpsgd:
                hessian_part = passes.eq4_hessian_part(ctx.lr, self.probe_batches(ctx.step), w_a, n, ctx.step)
        sums.append(hessian_part)
        return _Started(ctx.lr, vectors, averaged, torch.tensor(sums, dtype=torch.float64),
                        list(layers), with_diff)

    def _subtract_at_mean(self, ctx: StepContext, passes: "measure.Passes", batch: measure.Batch,
                          diff: torch.Tensor, reuse: bool, w_a: torch.Tensor) -> None:
        """``diff -= grad L_mu_j(w_a)``; redo the part at ``w_j`` if ``.grad`` came from other random numbers."""
        seed = measure.seed(ctx.step, ctx.rank)
        at_mean, drew = passes.grads(batch, seed)
        measure.subtract_from(diff, at_mean)
        if reuse and drew:
            self._batch.stochastic = True
            self._warn_once(ctx, "NoiseDiagnostics(reuse_grad=True): the model draws random numbers (e.g. dropout), "
                                 "so the gradient at w_j is recomputed; drop reuse_grad")
            passes.point_at_own()
            measure.copy_into(diff, passes.grads(batch, seed)[0])
            measure.subtract_from(diff, at_mean)
            passes.point_at(w_a)

    @torch.no_grad()
    def _finish(self, ctx: StepContext, s: _Started) -> Dict[str, float]:
        """At ``w_j(t + 1)``: the displacement, the averages over learners, and the quantities of Eq. 3-4."""
        params, n, dpsgd = list(ctx.parameters()), ctx.size, ctx.algorithm != "ssgd"
        measure.subtract_from(s.vectors["d"], params)                 # d_j = w_j(t) - w_j(t + 1)
        self._collectives.average_([s.averaged, s.sums] if s.averaged.numel() else [s.sums], "gradients")
        sums = (s.sums * n).tolist()
        d, g, g_a = s.vectors["d"], s.vectors["g"], s.vectors["g_j"]  # averaged: dW_a, g, g_a
        dots = gram([d, g_a, g])
        alpha_e, delta = eq3(1.0, dots[[0, 2]][:, [0, 2]])             # Eq. 3 on dW_a
        grad_alpha_e, grad_delta = eq3(s.lr, dots[[1, 2]][:, [1, 2]])  # Eq. 3 on alpha g_a alone
        values = {"step": ctx.step + 1, "lr": s.lr, "alpha_e": alpha_e,
                  "alpha_e_over_alpha": alpha_e / s.lr if s.lr else math.nan, "delta": delta,
                  "grad_alpha_e_over_alpha": grad_alpha_e / s.lr if s.lr else math.nan, "grad_delta": grad_delta,
                  "norm_dw": math.sqrt(dots[0, 0]), "norm_ga": math.sqrt(dots[1, 1]),
                  "norm_g": math.sqrt(dots[2, 2]), "consensus_distance": sums[0]}
        values.update({f"consensus/{name}": v for name, v in zip(s.layers, sums[1:])})
        if s.with_diff or not dpsgd:
            values["delta2"] = landscape_noise(s.lr, s.vectors["diff"]) if dpsgd else 0.0  # SSGD: w_j = w_a
        else:
            self._warn_once(ctx, "NoiseDiagnostics had no minibatch, so noise/delta2 is not logged: call "
                                 "diagnostics.observe(inputs, targets, loss) after loss.backward() each iteration")
        if not math.isnan(sums[-2]):
            values["loss"] = sums[-2]
        if self.hessian:
            values["delta2_hessian"] = sums[-1]
        return values

    def probe_batches(self, step: int) -> Batches:
        """The probe's batches at ``step``."""
        return self._probe.batches(step)

    # -- bookkeeping -----------------------------------------------------------------------------------

    def _reusable(self, ctx: StepContext, batch: Optional[measure.Batch], observed: int) -> bool:
        """Whether ``.grad`` is still the one backward pass on the batch :meth:`observe` recorded."""
        if self._batch.stochastic or ctx.algorithm == "ssgd" or batch is None:
            return False
        reason = None
        if observed != 1 or getattr(ctx.optimizer, "backward_passes_per_step", 1) > 1:
            reason = (f"observe() ran {observed} times in this step (once after loss.backward() is needed; "
                      "gradient accumulation cannot reuse .grad)")
        elif self._batch.grad_changed(ctx.parameters()):
            reason = ".grad changed after observe() (e.g. gradient clipping)"
        if reason is not None:
            self._warn_once(ctx, f"NoiseDiagnostics(reuse_grad=True): {reason}, so the gradient at w_j is recomputed")
        return reason is None

    def _warn_once(self, ctx: StepContext, message: str) -> None:
        if ctx.rank == 0 and message not in self._warned:
            self._warned.add(message)
            warnings.warn(message, RuntimeWarning)

    def _log(self, values: Mapping[str, float], global_step: int) -> None:
        if self._writer is None and self._log_dir is not None:
            if hasattr(self._log_dir, "add_scalar"):
                self._writer = self._log_dir
            else:
                from torch.utils.tensorboard import SummaryWriter
                self._writer, self._owns_writer = SummaryWriter(os.fspath(self._log_dir)), True
        if self._writer is None:
            return
        for key, value in values.items():
            if key != "step":
                self._writer.add_scalar(TAGS.get(key, key), value, global_step)
        self._writer.flush()

