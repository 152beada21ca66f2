r"""The noise quantities of the paper's Sec. 2, as pure functions and as a training callback.

Notation: ``n`` learners ``j``, weights ``w_j``, their mean ``w_a``, learning rate ``alpha``, the average
applied gradient ``g_a = n^-1 sum_j g_j``, the full-loss gradient ``g = grad L(w_a)``, ``dW_j = w_j - w_a``.

* :func:`effective_learning_rate` and :func:`noise_strength`: Eq. 3.
* :func:`landscape_noise` (definition) and :func:`landscape_noise_hessian` (Hessian expansion): Eq. 4.
* :func:`consensus_distance`, :func:`layer_consensus_distance`: ``n^-1 sum_j |w_j - w_a|^2``.
* :func:`hessian_vector_product`: ``H v`` by double backward, never forming ``H``.

The functions take flat vectors (see :func:`flatten`) and reduce in float64. Those that sum over
learners also accept the learners one rank holds plus ``num_learners``: summing their results over ranks
(``hvd.allreduce(op=hvd.Sum)``) gives the total. :class:`NoiseDiagnostics` computes them during training.
"""

import contextlib
import functools
import math
import numbers
import os
import warnings
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import horovod.torch as hvd

from horovod_dpsgd.callbacks import Callback, StepContext

__all__ = ["flatten", "effective_learning_rate", "noise_strength", "landscape_noise", "landscape_noise_hessian",
           "consensus_distance", "layer_consensus_distance", "hessian_vector_product", "batches_hvp",
           "NoiseDiagnostics", "TAGS"]

Vectors = Union[torch.Tensor, Sequence[torch.Tensor]]

#: TensorBoard tag of each key of :attr:`NoiseDiagnostics.last` (``consensus/<layer>`` keys are tags already).
TAGS = {"alpha_e": "noise/alpha_e", "alpha_e_over_alpha": "noise/alpha_e_over_alpha", "delta": "noise/delta",
        "delta2": "noise/delta2", "delta2_hessian": "noise/delta2_hessian", "consensus_distance": "consensus/distance",
        "norm_ga": "grad/norm_ga", "norm_g": "grad/norm_g", "loss": "diag/loss", "lr": "diag/lr"}


def flatten(tensors: Sequence[torch.Tensor], dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """The tensors concatenated into one detached 1-D vector (in ``dtype`` if given)."""
    return torch.cat([t.detach().reshape(-1).to(dtype or t.dtype) for t in tensors])


def _f64(v: torch.Tensor) -> torch.Tensor:
    return v.detach().reshape(-1).to(torch.float64)


def _dot(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.numel() != b.numel():
        raise ValueError(f"vectors of different sizes ({a.numel()} and {b.numel()}): pass flat vectors over "
                         "the same parameters, e.g. horovod_dpsgd.diagnostics.flatten(model.parameters())")
    return float(torch.dot(a, b))


def _learners(vectors: Vectors) -> List[torch.Tensor]:
    vs = [vectors] if isinstance(vectors, torch.Tensor) else list(vectors)
    if not vs:
        raise ValueError("no learner vectors given; pass one flat vector per learner")
    return [_f64(v) for v in vs]


def _mean(vectors: Vectors) -> torch.Tensor:
    vs = _learners(vectors)
    return vs[0] if len(vs) == 1 else torch.stack(vs).mean(0)


def effective_learning_rate(lr: float, g_a: torch.Tensor, g: torch.Tensor) -> float:
    """Eq. 3: ``alpha_e = alpha g_a . g / |g|^2``, the step length of ``alpha g_a`` along ``g``.

    ``g_a`` is the learners' average applied gradient and ``g = grad L(w_a)``. NaN when ``g = 0``
    (no direction to project on).
    """
    g_a, g = _f64(g_a), _f64(g)
    gg = _dot(g, g)
    return math.nan if gg == 0.0 else lr * _dot(g_a, g) / gg


def noise_strength(lr: float, g_a: torch.Tensor, g: torch.Tensor) -> float:
    """Eq. 3: ``Delta = |eta|^2`` with ``eta = -alpha g_a + alpha_e g``.

    This is the relation ``alpha^2 |g_a|^2 = alpha_e^2 |g|^2 + Delta`` solved for ``Delta``, computed as the
    squared norm of the part of ``alpha g_a`` orthogonal to ``g`` (no cancellation when ``Delta`` is small).
    With ``g = 0`` all of ``alpha g_a`` is noise.
    """
    g_a, g = _f64(g_a), _f64(g)
    alpha_e = effective_learning_rate(lr, g_a, g)
    eta = -lr * g_a if math.isnan(alpha_e) else -lr * g_a + alpha_e * g
    return _dot(eta, eta)


def landscape_noise(lr: float, grads_at_own: Vectors, grads_at_mean: Optional[Vectors] = None) -> float:
    """Eq. 4 (definition): ``Delta^(2) = alpha^2 |n^-1 sum_j [grad L_mu_j(w_j) - grad L_mu_j(w_a)]|^2``.

    Args:
        grads_at_own: per-learner gradients ``grad L_mu_j(w_j)`` (a sequence of flat vectors), or their mean.
        grads_at_mean: the same minibatches' gradients at ``w_a``, in the same form; or ``None``, when
            ``grads_at_own`` already is the mean difference ``n^-1 sum_j [grad L_mu_j(w_j) - grad L_mu_j(w_a)]``.
    """
    diff = _mean(grads_at_own)
    if grads_at_mean is not None:
        if not isinstance(grads_at_own, torch.Tensor) and not isinstance(grads_at_mean, torch.Tensor) \
                and len(grads_at_own) != len(grads_at_mean):
            raise ValueError(f"{len(grads_at_own)} gradients at own weights but {len(grads_at_mean)} at the mean; "
                             "pass one of each per learner")
        mean = _mean(grads_at_mean)
        if mean.numel() != diff.numel():
            raise ValueError(f"gradients of different sizes ({diff.numel()} and {mean.numel()})")
        diff = diff - mean
    return lr ** 2 * _dot(diff, diff)


def landscape_noise_hessian(lr: float, hvp: Callable[[torch.Tensor], torch.Tensor], deltas: Vectors,
                            num_learners: Optional[int] = None) -> float:
    r"""Eq. 4 (right-hand side): ``alpha^2 sum_{k,l,l'} H_kl H_kl' C_ll'``, ``C_ll' = n^-2 sum_j dW_j,l dW_j,l'``.

    ``H`` is symmetric, so ``sum_k H_kl H_kl' = (H^2)_ll'`` and ``sum_ll' (H^2)_ll' dW_j,l dW_j,l' = |H dW_j|^2``:
    the sum is ``alpha^2 n^-2 sum_j |H dW_j|^2``, one Hessian-vector product per learner, without forming
    ``H`` (``N x N``) or ``C``.

    Note the paper's covariance has a *single* sum over learners. Taylor-expanding the definition
    (:func:`landscape_noise`) gives ``alpha^2 n^-2 sum_{j,j'} dW_j^T H_mu_j H_mu_j' dW_j'`` with each
    learner's minibatch Hessian ``H_mu_j``; with one shared ``H`` this vanishes, because
    ``sum_j dW_j = 0``. Averaged over independent minibatches it equals
    ``alpha^2 n^-2 sum_j dW_j^T (<H_mu^2> - H^2) dW_j``, and Eq. 4 has ``H^2`` in place of the minibatch
    variance ``<H_mu^2> - H^2``: a landscape-curvature estimate of ``<Delta^(2)>``, exact when that variance
    equals ``H^2``, not a per-step identity.

    Args:
        hvp: ``v -> H v`` on flat float64 vectors, e.g. from :func:`hessian_vector_product`.
        deltas: ``dW_j = w_j - w_a`` of the learners held here (flat vectors).
        num_learners: ``n``; default ``len(deltas)``. Give ``hvd.size()`` with this rank's own ``dW_j`` and
            sum the results over ranks.
    """
    ds = _learners(deltas)
    n = len(ds) if num_learners is None else int(num_learners)
    if n < len(ds):
        raise ValueError(f"num_learners={n} is smaller than the {len(ds)} deltas given")
    total = 0.0
    for d in ds:
        hd = _f64(hvp(d))
        total += _dot(hd, hd)
    return lr ** 2 * total / n ** 2


def consensus_distance(weights: Vectors, mean: Optional[torch.Tensor] = None,
                       num_learners: Optional[int] = None) -> float:
    """``n^-1 sum_j |w_j - w_a|^2``: how far the learners are from their mean (0 in SSGD).

    Args:
        weights: flat ``w_j`` of the learners held here.
        mean: ``w_a``; default the mean of ``weights`` (then they must be all ``n`` learners).
        num_learners: ``n``; default ``len(weights)``. Give ``hvd.size()`` and ``mean=w_a`` with this rank's
            own ``w_j``, and sum the results over ranks.
    """
    ws = _learners(weights)
    n = len(ws) if num_learners is None else int(num_learners)
    if mean is None:
        if n != len(ws):
            raise ValueError("mean=None needs every learner's weights; pass mean=w_a with num_learners")
        w_a = torch.stack(ws).mean(0)
    else:
        w_a = _f64(mean)
    return sum(_dot(w - w_a, w - w_a) for w in ws) / n


def layer_consensus_distance(weights: Vectors, slices: Mapping[str, slice], mean: Optional[torch.Tensor] = None,
                             num_learners: Optional[int] = None) -> Dict[str, float]:
    """:func:`consensus_distance` of each named slice of the flat vectors (e.g. one per layer)."""
    ws = _learners(weights)
    w_a = torch.stack(ws).mean(0) if mean is None else _f64(mean)
    n = len(ws) if num_learners is None else num_learners
    diffs = [w - w_a for w in ws]  # once, then one dot product per slice
    return {name: sum(_dot(d[s], d[s]) for d in diffs) / n for name, s in slices.items()}


def _grads(loss: torch.Tensor, params: Sequence[torch.Tensor], **kw) -> List[torch.Tensor]:
    grads = torch.autograd.grad(loss, params, allow_unused=True, **kw)
    return [torch.zeros_like(p) if g is None else g for g, p in zip(grads, params)]


def hessian_vector_product(loss_fn: Callable[[], torch.Tensor], params: Sequence[torch.Tensor],
                           v: torch.Tensor) -> torch.Tensor:
    """``H v`` for the Hessian of ``loss_fn()`` w.r.t. ``params`` (double backward; ``H`` is never formed).

    ``v`` is flat in the order of ``params``; the result is flat, in ``v``'s dtype. Uses
    ``torch.autograd.grad``, so ``.grad`` and gradient hooks (Horovod's, DPSGD's) are untouched.
    """
    params = list(params)
    with torch.enable_grad():
        grads = _grads(loss_fn(), params, create_graph=True)
        chunks, offset = [], 0
        for p in params:
            chunks.append(v[offset:offset + p.numel()].view_as(p).to(p.dtype))
            offset += p.numel()
        if offset != v.numel():
            raise ValueError(f"v has {v.numel()} elements but the parameters {offset}")
        hv = torch.autograd.grad(grads, params, grad_outputs=chunks, allow_unused=True)
    return flatten([torch.zeros_like(p) if h is None else h for h, p in zip(hv, params)], v.dtype)


def _to(x: Any, device: torch.device) -> Any:
    return x.to(device, non_blocking=True) if isinstance(x, torch.Tensor) else x


@contextlib.contextmanager
def _seeded(seed: int, device: torch.device):
    """Run with the random state seeded (same dropout masks for the same seed), then restore it."""
    cuda = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        torch.default_generator.manual_seed(seed)
        for index in cuda:
            with torch.cuda.device(index):
                torch.cuda.manual_seed(seed)
        yield


def batches_hvp(model: torch.nn.Module, loss_fn: Callable, batches: Sequence[Tuple[Any, Any]],
                params: Sequence[torch.Tensor], seed: int = 0) -> Callable[[torch.Tensor], torch.Tensor]:
    """``v -> H v`` for the mean loss over ``batches`` (one double backward per batch)."""
    device = params[0].device

    def hvp(v: torch.Tensor) -> torch.Tensor:
        total = torch.zeros_like(v)
        for b, (x, y) in enumerate(batches):
            with _seeded(_seed(seed, b), device):
                total += hessian_vector_product(lambda: loss_fn(model(_to(x, device)), _to(y, device)), params, v)
        return total / len(batches)
    return hvp


def _seed(*parts: int) -> int:
    """A non-negative seed from integers, the same in every process (ints hash deterministically)."""
    return hash(parts) & 0x7FFF_FFFF_FFFF_FFFF


def _allreduce(tensor: torch.Tensor, name: str, average: bool) -> torch.Tensor:
    """Horovod allreduce (a seam the tests replace with an in-process fake)."""
    return hvd.allreduce(tensor, op=hvd.Average if average else hvd.Sum, name=f"horovod_dpsgd.diagnostics.{name}")


class NoiseDiagnostics(Callback):
    """Measures Eq. 3 and Eq. 4 every ``every`` steps and logs them to TensorBoard from rank 0.

    Runs in ``on_before_mixing``, where the parameters are this learner's ``w_j(t)`` and ``.grad`` holds the
    gradient it applies (in SSGD already averaged over learners). It runs on the steps that bring
    ``optimizer.step_count`` to a multiple of ``every``, and logs at that step count; other steps do nothing.

    ``g = grad L(w_a)`` is estimated on ``probe``, fixed held-out batches, not on the training minibatches:
    in SSGD ``g_a`` *is* the gradient of the union of this step's minibatches at ``w_a``, so estimating ``g``
    from them gives ``g = g_a``, hence ``alpha_e = alpha`` and ``Delta = 0`` by construction. Pass the same
    probe on every rank (or a shard per rank: ``g`` is averaged over ranks).

    ``Delta^(2)`` needs each learner's current minibatch: call :meth:`observe` every iteration after
    ``loss.backward()``. This learner recomputes ``grad L_mu_j`` at ``w_j`` and at ``w_a`` under the same
    random seed (same dropout masks), so the difference reflects the weights only, whatever the gradient
    accumulation. ``w_a`` is loaded into the model for that, then ``w_j`` and the module buffers (e.g.
    BatchNorm statistics) are restored bit for bit; ``.grad`` is never written. See docs/diagnostics.md
    for the tags and the cost.

    Args:
        model: the module whose parameters the optimizer trains.
        loss_fn: ``loss_fn(model(inputs), targets) -> scalar``, e.g. ``torch.nn.functional.cross_entropy``.
        probe: a non-empty list of ``(inputs, targets)`` batches estimating ``g = grad L(w_a)``.
        every: steps between diagnostics (a positive integer).
        log_dir: a TensorBoard directory, a ``SummaryWriter``, or ``None`` (values only in :attr:`last`).
        hessian: also compute Eq. 4's Hessian form ``noise/delta2_hessian`` (Hessian of the probe loss at ``w_a``).
    """

    def __init__(self, model: torch.nn.Module, loss_fn: Callable[[Any, Any], torch.Tensor],
                 probe: Sequence[Tuple[Any, Any]], every: int = 50, log_dir: Any = None, hessian: bool = False):
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
        self.every, self.hessian = int(every), bool(hessian)
        self._log_dir, self._writer, self._owns_writer = log_dir, None, False
        self._batch: Optional[Tuple[Any, Any, Any]] = None
        self._warned = False
        #: The values of the last diagnostic step, keyed as :data:`TAGS` plus ``"step"`` (the ``t`` measured).
        self.last: Dict[str, float] = {}
        #: Number of diagnostic steps run so far.
        self.count = 0

    def observe(self, inputs: Any, targets: Any, loss: Any = None) -> None:
        """Record this iteration's minibatch and loss (references only; call after ``loss.backward()``)."""
        self._batch = (inputs, targets, loss)

    def on_before_mixing(self, ctx: StepContext) -> None:
        if (ctx.step + 1) % self.every:
            return
        self.last = self._measure(ctx)
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

    def _layers(self, params: Sequence[torch.Tensor]) -> Dict[str, slice]:
        names = {id(p): n for n, p in self.model.named_parameters()}
        spans: Dict[str, List[int]] = {}
        offset = 0
        for i, p in enumerate(params):
            name = names.get(id(p), f"param{i}")
            layer = name.rsplit(".", 1)[0] if "." in name else name
            span = spans.setdefault(layer, [offset, offset])
            if span[1] != offset:  # the layer's parameters are not adjacent: name each parameter instead
                layer = name
                span = spans.setdefault(layer, [offset, offset])
            span[1] = offset = offset + p.numel()
        return {layer: slice(a, b) for layer, (a, b) in spans.items()}

    def _grad(self, params, x, y, seed: int, dtype) -> torch.Tensor:
        device = params[0].device
        with torch.enable_grad(), _seeded(seed, device):
            loss = self.loss_fn(self.model(_to(x, device)), _to(y, device))
            return flatten(_grads(loss, params), dtype)

    @torch.no_grad()
    def _load(self, params, flat: torch.Tensor) -> None:
        offset = 0
        for p in params:
            p.copy_(flat[offset:offset + p.numel()].view_as(p))
            offset += p.numel()

    def _measure(self, ctx: StepContext) -> Dict[str, float]:
        params, lr, n, dpsgd = list(ctx.parameters()), ctx.lr, ctx.size, ctx.algorithm != "ssgd"
        dtype = functools.reduce(torch.promote_types, (p.dtype for p in params), torch.float32)
        numel = sum(p.numel() for p in params)
        batch, self._batch = self._batch, None
        w_j = flatten(params, dtype)
        g_j = flatten([torch.zeros_like(p) if p.grad is None else p.grad for p in params], dtype)
        w_a, g_a, have_all = w_j, g_j, False  # SSGD: the replicas hold w_a and .grad already is g_a
        if dpsgd:
            have = torch.tensor([0.0 if batch is None else 1.0], dtype=dtype, device=w_j.device)
            reduced = _allreduce(torch.cat([w_j, g_j, have]), "weights_grads", average=True)
            w_a, g_a, have_all = reduced[:numel], reduced[numel:2 * numel], bool(reduced[-1] > 1 - 0.5 / n)
        seed = _seed(ctx.step, ctx.rank)  # the same for both passes on this learner's minibatch
        delta2_part, diff_j = None, None
        saved = [p.detach().clone() for p in params] if dpsgd else []
        buffers = [(b, b.detach().clone()) for b in self.model.buffers()]
        try:
            at_own = self._grad(params, batch[0], batch[1], seed, dtype) if have_all else None
            if dpsgd:
                self._load(params, w_a)
            probe = sum(self._grad(params, x, y, _seed(ctx.step, -1, b), dtype)
                        for b, (x, y) in enumerate(self.probe)) / len(self.probe)
            if at_own is not None:
                diff_j = at_own - self._grad(params, batch[0], batch[1], seed, dtype)
            if self.hessian and dpsgd:
                hvp = batches_hvp(self.model, self.loss_fn, self.probe, params, seed=_seed(ctx.step, -2))
                delta2_part = landscape_noise_hessian(lr, hvp, [_f64(w_j) - _f64(w_a)], num_learners=n)
        finally:
            with torch.no_grad():
                for p, w in zip(params, saved):
                    p.copy_(w)
                for b, value in buffers:
                    b.copy_(value)
        reduced = _allreduce(probe if diff_j is None else torch.cat([probe, diff_j]), "probe_grads", average=True)
        g, diff = reduced[:numel], reduced[numel:]
        # Convert each vector to float64 once; the functions below then use them without converting again.
        w_a = _f64(w_a) if w_a is not w_j else None
        w_j, g_a, g, diff = _f64(w_j), _f64(g_a), _f64(g), _f64(diff)
        w_a = w_j if w_a is None else w_a
        layers = self._layers(params)
        per_layer = layer_consensus_distance([w_j], layers, mean=w_a, num_learners=n)
        loss = math.nan if batch is None or batch[2] is None else float(
            batch[2].detach() if isinstance(batch[2], torch.Tensor) else batch[2]) / n
        scalars = [consensus_distance([w_j], w_a, n), *per_layer.values(), loss, 0.0 if delta2_part is None
                   else delta2_part]
        sums = _allreduce(torch.tensor(scalars, dtype=torch.float64), "scalars", average=False).tolist()
        alpha_e = effective_learning_rate(lr, g_a, g)
        values = {"step": ctx.step, "lr": lr, "alpha_e": alpha_e,
                  "alpha_e_over_alpha": alpha_e / lr if lr else math.nan,
                  "delta": noise_strength(lr, g_a, g), "norm_ga": float(_f64(g_a).norm()),
                  "norm_g": float(_f64(g).norm()), "consensus_distance": sums[0]}
        values.update({f"consensus/{name}": v for name, v in zip(per_layer, sums[1:])})
        if have_all or not dpsgd:
            values["delta2"] = landscape_noise(lr, diff) if dpsgd else 0.0  # SSGD: w_j = w_a
        elif ctx.rank == 0 and not self._warned:
            self._warned = True
            warnings.warn(f"NoiseDiagnostics had no minibatch at step {ctx.step}, so noise/delta2 is not logged: "
                          "call diagnostics.observe(inputs, targets, loss) after loss.backward() each iteration",
                          RuntimeWarning)
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
