r"""The noise quantities of the paper's Sec. 2, as functions of flat vectors.

Notation: ``n`` learners ``j``, weights ``w_j``, their mean ``w_a``, learning rate ``alpha``, the average
applied gradient ``g_a = n^-1 sum_j g_j``, the full-loss gradient ``g = grad L(w_a)``, ``dW_j = w_j - w_a``,
the displacement of the mean in a step ``dW_a = w_a(t) - w_a(t+1)``.

* :func:`eq3` (``alpha_e`` and ``Delta`` of a step from dot products, see :func:`gram`), and on vectors
  :func:`effective_learning_rate`, :func:`noise_strength`: Eq. 3.
* :func:`landscape_noise` (definition) and :func:`landscape_noise_hessian` (Hessian expansion): Eq. 4.
* :func:`consensus_distance`, :func:`layer_consensus_distance`: ``n^-1 sum_j |w_j - w_a|^2``.
* :func:`hessian_vector_product`: ``H v`` by double backward, never forming ``H``.

The functions take flat vectors (see :func:`flatten`) and reduce in float64, chunk by chunk, without a
float64 copy of the vectors. Those that sum over learners also accept the learners one rank holds plus
``num_learners``: summing their results over ranks (``hvd.allreduce(op=hvd.Sum)``) gives the total. :class:`horovod_dpsgd.diagnostics.NoiseDiagnostics`
computes them during training.
"""

import contextlib
import math
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch

__all__ = ["flatten", "gram", "eq3", "effective_learning_rate", "noise_strength", "landscape_noise",
           "landscape_noise_hessian", "consensus_distance", "layer_consensus_distance", "hessian_vector_product",
           "batches_hvp"]

Vectors = Union[torch.Tensor, Sequence[torch.Tensor]]

def flatten(tensors: Sequence[torch.Tensor], dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """The tensors concatenated into one detached 1-D vector (in ``dtype`` if given)."""
    return torch.cat([t.detach().reshape(-1).to(dtype or t.dtype) for t in tensors])


def _vec(v: torch.Tensor) -> torch.Tensor:
    return v.detach().reshape(-1)


def _views(flat: torch.Tensor, like: Sequence[torch.Tensor]) -> List[torch.Tensor]:
    """Consecutive views of the flat vector ``flat`` shaped like ``like``."""
    views, offset = [], 0
    for t in like:
        views.append(flat[offset:offset + t.numel()].view_as(t))
        offset += t.numel()
    return views


#: Elements converted to float64 at a time: reductions never make a float64 copy of a whole vector.
_CHUNK = 1 << 16


def _check_sizes(vectors: Sequence[torch.Tensor]) -> int:
    n = vectors[0].numel()
    if any(v.numel() != n for v in vectors):
        raise ValueError(f"vectors of different sizes ({', '.join(str(v.numel()) for v in vectors)}): pass flat "
                         "vectors over the same parameters, e.g. horovod_dpsgd.diagnostics.quantities.flatten(model.parameters())")
    return n


def _chunk_buffers(count: int, n: int, like: torch.Tensor) -> List[torch.Tensor]:
    return [torch.empty(min(n, _CHUNK), dtype=torch.float64, device=like.device) for _ in range(count)]


def _sq_norm(terms: Sequence[Tuple[float, torch.Tensor]]) -> float:
    """``|sum_i c_i v_i|^2`` for ``terms = [(c_i, v_i)]``, in float64, one cache-sized chunk at a time."""
    terms = [(c, _vec(v)) for c, v in terms]
    n = _check_sizes([v for _, v in terms])
    acc, x = _chunk_buffers(2, n, terms[0][1])
    total = torch.zeros((), dtype=torch.float64, device=acc.device)
    for i in range(0, n, _CHUNK):
        m = min(_CHUNK, n - i)
        a = acc[:m].copy_(terms[0][1][i:i + m]).mul_(terms[0][0])
        for c, v in terms[1:]:
            a.add_(x[:m].copy_(v[i:i + m]), alpha=c)
        total += torch.dot(a, a)
    return float(total)


def _learners(vectors: Vectors) -> List[torch.Tensor]:
    vs = [vectors] if isinstance(vectors, torch.Tensor) else list(vectors)
    if not vs:
        raise ValueError("no learner vectors given; pass one flat vector per learner")
    return [_vec(v) for v in vs]


def _mean(vectors: Vectors) -> torch.Tensor:
    vs = _learners(vectors)
    if len(vs) == 1:
        return vs[0]
    _check_sizes(vs)
    return torch.stack([v.to(torch.float64) for v in vs]).mean(0)


def eq3(lr: float, gram: torch.Tensor) -> Tuple[float, float]:
    r"""Eq. 3 from the Gram matrix of ``(v, g)``, for the step ``dW_a = lr * v``: ``(alpha_e, Delta)``.

    The paper projects the displacement of the mean weights, ``dW_a = w_a(t) - w_a(t+1)`` (``alpha g_a`` for
    plain SGD), onto ``g = grad L(w_a)``: ``dW_a = alpha_e g - eta`` with ``alpha_e = dW_a . g / |g|^2`` and the
    noise ``eta`` orthogonal to ``g``, of strength ``Delta = |eta|^2 = |dW_a|^2 - alpha_e^2 |g|^2``. Pass
    ``lr=1`` with the Gram matrix of ``(dW_a, g)``, or ``lr=alpha`` with that of ``(g_a, g)``. With ``g = 0``
    there is no direction to project on: ``alpha_e`` is NaN and all of ``dW_a`` is noise.

    ``gram = [[v.v, v.g], [g.v, g.g]]`` in float64 (see :func:`gram`): ``Delta`` is a difference of its entries,
    exact to about ``1e-15 |dW_a|^2``, so its relative error stays small unless the noise is below 1e-9 of the
    step.
    """
    ga_ga, ga_g, g_g = float(gram[0, 0]), float(gram[0, 1]), float(gram[1, 1])
    if g_g == 0.0:
        return math.nan, lr ** 2 * ga_ga
    alpha_e = lr * ga_g / g_g
    return alpha_e, max(lr ** 2 * ga_ga - alpha_e ** 2 * g_g, 0.0)


def gram(vectors: Sequence[torch.Tensor]) -> torch.Tensor:
    """All dot products ``v_i . v_k`` of flat vectors, as a float64 matrix, in one pass over them."""
    vs = [_vec(v) for v in vectors]
    n = _check_sizes(vs)
    chunk = torch.empty(len(vs), min(n, _CHUNK), dtype=torch.float64, device=vs[0].device)
    total = torch.zeros(len(vs), len(vs), dtype=torch.float64, device=vs[0].device)
    for i in range(0, n, _CHUNK):
        m = min(_CHUNK, n - i)
        x = chunk[:, :m]
        for row, v in zip(x, vs):
            row.copy_(v[i:i + m])
        total += x @ x.T
    return total


def effective_learning_rate(lr: float, g_a: torch.Tensor, g: torch.Tensor) -> float:
    """Eq. 3's ``alpha_e = alpha g_a . g / |g|^2``, the step length of ``alpha g_a`` along ``g`` (see :func:`eq3`).

    ``g_a`` is the learners' average applied gradient and ``g = grad L(w_a)``. NaN when ``g = 0``.
    """
    return eq3(lr, gram([g_a, g]))[0]


def noise_strength(lr: float, g_a: torch.Tensor, g: torch.Tensor) -> float:
    """Eq. 3's ``Delta = |eta|^2``, the part of ``alpha g_a`` orthogonal to ``g`` (see :func:`eq3`)."""
    return eq3(lr, gram([g_a, g]))[1]


def landscape_noise(lr: float, grads_at_own: Vectors, grads_at_mean: Optional[Vectors] = None) -> float:
    """Eq. 4 (definition): ``Delta^(2) = alpha^2 |n^-1 sum_j [grad L_mu_j(w_j) - grad L_mu_j(w_a)]|^2``.

    Args:
        grads_at_own: per-learner gradients ``grad L_mu_j(w_j)`` (a sequence of flat vectors), or their mean.
        grads_at_mean: the same minibatches' gradients at ``w_a``, in the same form; or ``None``, when
            ``grads_at_own`` already is the mean difference ``n^-1 sum_j [grad L_mu_j(w_j) - grad L_mu_j(w_a)]``.
    """
    terms = [(1.0, _mean(grads_at_own))]
    if grads_at_mean is not None:
        if not isinstance(grads_at_own, torch.Tensor) and not isinstance(grads_at_mean, torch.Tensor) \
                and len(grads_at_own) != len(grads_at_mean):
            raise ValueError(f"{len(grads_at_own)} gradients at own weights but {len(grads_at_mean)} at the mean; "
                             "pass one of each per learner")
        terms.append((-1.0, _mean(grads_at_mean)))
    return lr ** 2 * _sq_norm(terms)


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
    total = sum(_sq_norm([(1.0, hvp(d.to(torch.float64)).reshape(-1))]) for d in ds)
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
        w_a = _mean(ws)
    else:
        w_a = _vec(mean)
    return sum(_sq_norm([(1.0, w), (-1.0, w_a)]) for w in ws) / n


def layer_consensus_distance(weights: Vectors, slices: Mapping[str, slice], mean: Optional[torch.Tensor] = None,
                             num_learners: Optional[int] = None) -> Dict[str, float]:
    """:func:`consensus_distance` of each named slice of the flat vectors (e.g. one per layer)."""
    ws = _learners(weights)
    w_a = _mean(ws) if mean is None else _vec(mean)
    n = len(ws) if num_learners is None else num_learners
    _check_sizes([*ws, w_a])
    return {name: sum(_sq_norm([(1.0, w[s]), (-1.0, w_a[s])]) for w in ws) / n for name, s in slices.items()}


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


def _rng_states(device: torch.device) -> List[torch.Tensor]:
    states = [torch.get_rng_state()]
    if device.type == "cuda":
        states.append(torch.cuda.get_rng_state(device))
    return states


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
