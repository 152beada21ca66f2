"""NoiseDiagnostics: measures the paper's noise quantities during training and logs them to TensorBoard.

The quantities themselves are functions of flat vectors in :mod:`horovod_dpsgd.diagnostics.quantities`; this callback
gathers the vectors they need across learners (with Horovod) every ``every`` steps.
"""

import functools
import hashlib
import math
import numbers
import os
import warnings
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
import horovod.torch as hvd

from horovod_dpsgd.callbacks import Callback, StepContext
from horovod_dpsgd.diagnostics.quantities import (_grads, _rng_states, _seed, _seeded, _sq_norm, _to, _views, batches_hvp, eq3, flatten,
                                 gram, landscape_noise, landscape_noise_hessian)

__all__ = ["NoiseDiagnostics", "TAGS"]

#: TensorBoard tag of each key of :attr:`NoiseDiagnostics.last` (``consensus/<layer>`` keys are tags already).
TAGS = {"alpha_e": "noise/alpha_e", "alpha_e_over_alpha": "noise/alpha_e_over_alpha", "delta": "noise/delta",
        "delta2": "noise/delta2", "delta2_hessian": "noise/delta2_hessian", "consensus_distance": "consensus/distance",
        "norm_ga": "grad/norm_ga", "norm_g": "grad/norm_g", "loss": "diag/loss", "lr": "diag/lr"}


def _average_(tensors: List[torch.Tensor], name: str) -> None:
    """Average ``tensors`` over ranks in place, in one Horovod group (a seam the tests replace with a fake)."""
    hvd.grouped_allreduce_(tensors, op=hvd.Average, name=f"horovod_dpsgd.diagnostics.{name}")


def _allgather_object(obj: Any, name: str) -> List[Any]:
    """``obj`` of every rank, in rank order (a seam the tests replace with a fake)."""
    return hvd.allgather_object(obj, name=f"horovod_dpsgd.diagnostics.{name}")


def _digest(batches: Sequence[Tuple[Any, Any]]) -> Optional[str]:
    """A digest of the batches' tensors (dtypes, shapes and bytes); ``None`` if they hold anything else."""
    digest = hashlib.sha256()
    for batch in batches:
        for part in batch:
            if part is None:
                digest.update(b"None")
            elif isinstance(part, torch.Tensor):
                t = part.detach().cpu().contiguous()
                digest.update(f"{t.dtype}{tuple(t.shape)}".encode())
                digest.update(t.reshape(-1).view(torch.uint8).numpy())
            else:
                return None
    return digest.hexdigest()


class NoiseDiagnostics(Callback):
    """Measures Eq. 3 and Eq. 4 every ``every`` steps and logs them to TensorBoard from rank 0.

    Runs in ``on_before_mixing``, where the parameters are this learner's ``w_j(t)`` and ``.grad`` holds the
    gradient it applies (in SSGD already averaged over learners). It runs on the steps that bring
    ``optimizer.step_count`` to a multiple of ``every``, and logs at that step count; other steps do nothing.

    ``g = grad L(w_a)`` is estimated on ``probe``, fixed held-out batches, not on the training minibatches:
    in SSGD ``g_a`` *is* the gradient of the union of this step's minibatches at ``w_a``, so estimating ``g``
    from them gives ``g = g_a``, hence ``alpha_e = alpha`` and ``Delta = 0`` by construction. Pass the same
    probe on every rank, or a shard per rank (``g`` is then the average over ranks). With the same probe
    everywhere (found out once, from a digest of its tensors), the learners split its batches among them,
    and a probe of one batch is computed by every learner and not averaged: no work is done twice.

    ``Delta^(2)`` needs each learner's current minibatch: call :meth:`observe` every iteration after
    ``loss.backward()``. This learner recomputes ``grad L_mu_j`` at ``w_j`` and at ``w_a`` under the same
    random seed (same dropout masks), so the difference reflects the weights only, whatever the gradient
    accumulation (``reuse_grad=True`` takes the one at ``w_j`` from ``.grad`` instead). The parameters point
    at ``w_a`` for that, then at ``w_j`` again, and the module buffers (e.g. BatchNorm statistics) are
    restored bit for bit; ``.grad`` is never written. The work vectors (about four model-sized ones) are
    kept between diagnostic steps. See docs/diagnostics.md for the tags and the cost.

    Args:
        model: the module whose parameters the optimizer trains.
        loss_fn: ``loss_fn(model(inputs), targets) -> scalar``, e.g. ``torch.nn.functional.cross_entropy``.
        probe: a non-empty list of ``(inputs, targets)`` batches estimating ``g = grad L(w_a)``.
        every: steps between diagnostics (a positive integer).
        log_dir: a TensorBoard directory, a ``SummaryWriter``, or ``None`` (values only in :attr:`last`).
        hessian: also compute Eq. 4's Hessian form ``noise/delta2_hessian`` (Hessian of the probe loss at ``w_a``).
        reuse_grad: take ``grad L_mu_j(w_j)`` from ``.grad`` instead of recomputing it: one forward/backward
            pass less per diagnostic step. Valid when ``.grad`` is one backward pass of exactly
            ``loss_fn(model(inputs), targets)`` on the observed batch (the training loss is ``loss_fn``, with
            no extra terms) and the model draws no random numbers. A step where :meth:`observe` ran more than
            once (gradient accumulation), ``.grad`` changed after it (e.g. clipping), or the model drew random
            numbers (dropout) recomputes instead, with a warning.
    """

    def __init__(self, model: torch.nn.Module, loss_fn: Callable[[Any, Any], torch.Tensor],
                 probe: Sequence[Tuple[Any, Any]], every: int = 50, log_dir: Any = None, hessian: bool = False,
                 reuse_grad: bool = False):
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not callable(loss_fn):
            raise TypeError("loss_fn must be callable as loss_fn(model(inputs), targets)")
        if isinstance(every, bool) or not isinstance(every, numbers.Integral) or every < 1:
            raise ValueError(f"NoiseDiagnostics every must be a positive integer number of steps, got {every!r}; "
                             "use every=50 to measure every 50th step")
        probe = list(probe)
        if not probe or any(not isinstance(b, (tuple, list)) or len(b) != 2 for b in probe):
            raise ValueError("probe must be a non-empty list of (inputs, targets) batches held out from training, "
                             "e.g. [next(iter(test_loader))]")
        if log_dir is not None and not hasattr(log_dir, "add_scalar") and not isinstance(log_dir, (str, os.PathLike)):
            raise TypeError(f"log_dir must be a directory, a SummaryWriter or None, got {type(log_dir).__name__}")
        self.model, self.loss_fn, self.probe = model, loss_fn, probe
        self.every, self.hessian, self.reuse_grad = int(every), bool(hessian), bool(reuse_grad)
        self._log_dir, self._writer, self._owns_writer = log_dir, None, False
        self._batch: Optional[Tuple[Any, Any, Any]] = None
        self._observed = 0  # observe() calls since the last step
        self._grad_versions: Dict[int, Tuple[torch.Tensor, int]] = {}  # id(param) -> (.grad, its version)
        self._stochastic = False  # the model drew random numbers: .grad cannot be reused
        self._work: Dict[str, Optional[torch.Tensor]] = {}
        self._probe_shared: Optional[bool] = None  # every rank passed the same probe
        self._warned: set = set()
        #: The values of the last diagnostic step, keyed as :data:`TAGS` plus ``"step"`` (the ``t`` measured).
        self.last: Dict[str, float] = {}
        #: Number of diagnostic steps run so far.
        self.count = 0

    def observe(self, inputs: Any, targets: Any, loss: Any = None) -> None:
        """Record this iteration's minibatch and loss (references only; call after ``loss.backward()``)."""
        self._batch = (inputs, targets, loss)
        self._observed += 1
        if self.reuse_grad:
            self._grad_versions = {id(p): (p.grad, p.grad._version) for p in self.model.parameters()
                                   if p.grad is not None}

    def on_before_mixing(self, ctx: StepContext) -> None:
        observed, self._observed = self._observed, 0
        if (ctx.step + 1) % self.every:
            return
        self.last = self._measure(ctx, reuse=self.reuse_grad and self._grad_reusable(ctx, observed))
        self.count += 1
        if ctx.rank == 0:
            self._log(self.last, ctx.step + 1)

    def close(self) -> None:
        """Flush the TensorBoard events; closes the writer if this callback created it."""
        if self._writer is not None:
            self._writer.flush()
            if self._owns_writer:
                self._writer.close()
                self._writer = None

    def _layers(self, params: Sequence[torch.Tensor]) -> Dict[str, List[int]]:
        """Indices of ``params`` by layer: a module's adjacent parameters, or a parameter on its own."""
        names = {id(p): n for n, p in self.model.named_parameters()}
        layers: Dict[str, List[int]] = {}
        for i, p in enumerate(params):
            name = names.get(id(p), f"param{i}")
            layer = name.rsplit(".", 1)[0] if "." in name else name
            if layers.get(layer) and layers[layer][-1] != i - 1:  # not adjacent: name each parameter instead
                layer = name
            layers.setdefault(layer, []).append(i)
        return layers

    def _workspace(self, name: str, numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """A work vector kept between diagnostic steps: fresh memory would be paid for (page faults) each time."""
        buf = self._work.get(name)
        if buf is None or buf.numel() != numel or buf.dtype != dtype or buf.device != device:
            self._work[name] = None  # free the old one first
            buf = self._work[name] = torch.empty(numel, dtype=dtype, device=device)
        return buf

    def _probe_share(self, rank: int, n: int) -> Tuple[List[Tuple[int, Tuple[Any, Any]]], float, bool]:
        """The probe batches (with their indices) this learner computes ``g`` on, the factor that makes its
        share of ``g`` from their gradient sum, and whether ``g`` is then averaged over learners."""
        batches = list(enumerate(self.probe))
        if self._probe_shared is None:  # decided once, by every rank at the same (first) diagnostic step
            digests = _allgather_object(_digest(self.probe), "probe") if n > 1 else ["one learner"]
            self._probe_shared = None not in digests and len(set(digests)) == 1
        if not self._probe_shared:
            return batches, 1.0 / len(batches), True
        if len(batches) == 1:
            return batches, 1.0, False
        return batches[rank::n], n / len(batches), True

    def _grads_at(self, params, x, y, seed: int) -> Tuple[List[torch.Tensor], bool]:
        """``grad loss_fn`` on ``(x, y)`` at the parameters' current values, drawing random numbers from ``seed``;
        and whether the pass drew any."""
        device = params[0].device
        with torch.enable_grad(), _seeded(seed, device):
            state = _rng_states(device)
            grads = _grads(self.loss_fn(self.model(_to(x, device)), _to(y, device)), params)
            drew = any(not torch.equal(a, b) for a, b in zip(state, _rng_states(device)))
        return grads, drew

    def _warn_once(self, message: str) -> None:
        if message not in self._warned:
            self._warned.add(message)
            warnings.warn(message, RuntimeWarning)

    def _grad_changed(self, p: torch.Tensor) -> bool:
        recorded = self._grad_versions.get(id(p))
        if p.grad is None:
            return recorded is not None
        return recorded is None or recorded[0] is not p.grad or recorded[1] != p.grad._version

    def _grad_reusable(self, ctx: StepContext, observed: int) -> bool:
        """Whether ``.grad`` is still the one backward pass on the batch :meth:`observe` recorded."""
        if self._stochastic or ctx.algorithm == "ssgd":
            return False
        reason = None
        if observed != 1 or getattr(ctx.optimizer, "backward_passes_per_step", 1) > 1:
            reason = (f"observe() ran {observed} times in this step (once after loss.backward() is needed; "
                      "gradient accumulation cannot reuse .grad)")
        elif any(self._grad_changed(p) for p in ctx.parameters()):
            reason = ".grad changed after observe() (e.g. gradient clipping)"
        if reason is not None and ctx.rank == 0:
            self._warn_once(f"NoiseDiagnostics(reuse_grad=True): {reason}, so the gradient at w_j is recomputed")
        return reason is None

    @torch.no_grad()
    def _measure(self, ctx: StepContext, reuse: bool = False) -> Dict[str, float]:
        params, lr, n, dpsgd = list(ctx.parameters()), ctx.lr, ctx.size, ctx.algorithm != "ssgd"
        dtype = functools.reduce(torch.promote_types, (p.dtype for p in params), torch.float32)
        numel = sum(p.numel() for p in params)
        batch, self._batch = self._batch, None
        device = params[0].device
        grads = [torch.zeros_like(p) if p.grad is None else p.grad for p in params]
        with_diff, w_a_views, sq = False, [], [0.0] * len(params)  # SSGD: the replicas hold w_a
        if dpsgd:
            # This learner's w_j and whether it has a minibatch, averaged in place into w_a and the share that has.
            w_a = self._workspace("weights", numel + 1, dtype, device)
            have = torch.tensor([0.0 if batch is None else 1.0], dtype=dtype, device=device)
            torch._foreach_copy_(_views(w_a, [*params, have]), [*params, have])
            _average_([w_a], "weights")
            with_diff, w_a = bool(w_a[-1] > 1 - 0.5 / n), w_a[:numel]
            w_a_views = _views(w_a, params)
            sq = [_sq_norm([(1.0, p), (-1.0, v)]) / n for p, v in zip(params, w_a_views)]  # this learner's share
        # [g, this learner's grad L_mu_j(w_j) - grad L_mu_j(w_a), g_j], filled in place, then averaged over
        # learners into [g, their mean, g_a] (``ours``). SSGD's .grad already is g_a. A g that every learner
        # computes alike is kept out of the average, after the averaged vectors.
        probe, scale, average_g = self._probe_share(ctx.rank, n)
        names = ["g"] * average_g + ["diff"] * with_diff + ["g_a"] * dpsgd + ["g"] * (not average_g)
        work = self._workspace("gradients", (1 + 2 * dpsgd) * numel, dtype, device)
        vec = dict(zip(names, work.split(numel)))
        ours = work[:(len(names) - (not average_g)) * numel]
        g_views = _views(vec["g"], params)
        diff_views = _views(vec["diff"], params) if with_diff else []
        if dpsgd:
            torch._foreach_copy_(_views(vec["g_a"], params), grads)
        g_a = vec["g_a"] if dpsgd else flatten(grads, dtype)
        # Per-learner parts of sums over learners: |w_j - w_a|^2 of each layer, the loss, Eq. 4's Hessian form.
        per_layer = {name: sum(sq[i] for i in members) for name, members in self._layers(params).items()}
        loss = math.nan if batch is None or batch[2] is None else float(
            batch[2].detach() if isinstance(batch[2], torch.Tensor) else batch[2]) / n
        delta2_part = 0.0
        deltas = [flatten(params, torch.float64) - w_a.double()] if self.hessian and dpsgd else []
        seed = _seed(ctx.step, ctx.rank)  # the same for both passes on this learner's minibatch
        own_data = [p.data for p in params]
        buffers = [(b, b.detach().clone()) for b in self.model.buffers()]
        try:
            if with_diff:
                torch._foreach_copy_(diff_views, grads if reuse else self._grads_at(params, batch[0], batch[1], seed)[0])
            if dpsgd:  # evaluate at w_a: point the parameters at it (restored below, bit for bit)
                for p, v in zip(params, w_a_views):
                    p.data = v if p.is_contiguous() and p.dtype == v.dtype else torch.empty_like(p).copy_(v)
            for i, (b, (x, y)) in enumerate(probe):
                probe_grads, _ = self._grads_at(params, x, y, _seed(ctx.step, -1, b))
                if i:
                    torch._foreach_add_(g_views, probe_grads)
                else:
                    torch._foreach_copy_(g_views, probe_grads)
            if not probe:
                vec["g"].zero_()
            elif scale != 1.0:
                vec["g"].mul_(scale)
            if with_diff:
                at_mean, drew = self._grads_at(params, batch[0], batch[1], seed)
                torch._foreach_sub_(diff_views, at_mean)
                if reuse and drew:  # .grad came from other random numbers: recompute at w_j with this seed
                    self._stochastic = True
                    if ctx.rank == 0:
                        self._warn_once("NoiseDiagnostics(reuse_grad=True): the model draws random numbers (e.g. "
                                        "dropout), so the gradient at w_j is recomputed; drop reuse_grad")
                    for p, data in zip(params, own_data):
                        p.data = data
                    torch._foreach_copy_(diff_views, self._grads_at(params, batch[0], batch[1], seed)[0])
                    torch._foreach_sub_(diff_views, at_mean)
            if self.hessian and dpsgd:
                hvp = batches_hvp(self.model, self.loss_fn, self.probe, params, seed=_seed(ctx.step, -2))
                delta2_part = landscape_noise_hessian(lr, hvp, deltas, num_learners=n)
        finally:
            for p, data in zip(params, own_data):
                p.data = data
            for b, value in buffers:
                b.copy_(value)
        # The layers partition the parameters: their consensus distances add up to the total.
        sums = torch.tensor([sum(per_layer.values()), *per_layer.values(), loss, delta2_part], dtype=torch.float64)
        _average_([ours, sums] if ours.numel() else [sums], "gradients")
        sums = (sums * n).tolist()
        g, diff = vec["g"], vec.get("diff")
        dots = gram([g_a, g])
        alpha_e, delta = eq3(lr, dots)
        values = {"step": ctx.step, "lr": lr, "alpha_e": alpha_e,
                  "alpha_e_over_alpha": alpha_e / lr if lr else math.nan, "delta": delta,
                  "norm_ga": math.sqrt(dots[0, 0]), "norm_g": math.sqrt(dots[1, 1]), "consensus_distance": sums[0]}
        values.update({f"consensus/{name}": v for name, v in zip(per_layer, sums[1:])})
        if with_diff or not dpsgd:
            values["delta2"] = landscape_noise(lr, diff) if dpsgd else 0.0  # SSGD: w_j = w_a
        elif ctx.rank == 0:
            self._warn_once("NoiseDiagnostics had no minibatch, so noise/delta2 is not logged: call "
                            "diagnostics.observe(inputs, targets, loss) after loss.backward() each iteration")
        if not math.isnan(sums[-2]):
            values["loss"] = sums[-2]
        if self.hessian:
            values["delta2_hessian"] = sums[-1]
        return values

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
