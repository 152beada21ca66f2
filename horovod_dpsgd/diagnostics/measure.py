"""The steps of a diagnostic measurement, for :class:`~horovod_dpsgd.diagnostics.NoiseDiagnostics`.

Vectors are flat, in the order of the optimizer's trainable parameters, and kept in a :class:`Workspace`
between diagnostic steps. Model passes (:class:`Passes`) evaluate gradients at the learner's own weights or
at the mean, and leave the parameters, ``.grad``, the module buffers and the random state as they found them.
"""

import contextlib
import hashlib
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import torch

from horovod_dpsgd.diagnostics.quantities import (_grads, _rng_states, _seed, _seeded, _sq_norm, _to, _views,
                                                  batches_hvp, flatten, landscape_noise_hessian)

#: ``(inputs, targets, loss)`` of the minibatch a learner trained on.
Batch = Tuple[Any, Any, Any]

seed = _seed


def grad_or_zero(p: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(p) if p.grad is None else p.grad


def copy_into(flat: torch.Tensor, tensors: Sequence[torch.Tensor]) -> None:
    torch._foreach_copy_(_views(flat, tensors), list(tensors))


def subtract_from(flat: torch.Tensor, tensors: Sequence[torch.Tensor]) -> None:
    torch._foreach_sub_(_views(flat, tensors), list(tensors))


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


def checked_probe(probe: Sequence[Tuple[Any, Any]]) -> List[Tuple[Any, Any]]:
    """``probe`` as a list, or a ValueError saying what a probe is."""
    probe = list(probe)
    if not probe or any(not isinstance(b, (tuple, list)) or len(b) != 2 for b in probe):
        raise ValueError("probe must be a non-empty list of (inputs, targets) batches of training data, e.g. a "
                         "fixed sample of the training set, or a callable step -> such a list")
    return probe


class ObservedBatch:
    """The minibatch :meth:`NoiseDiagnostics.observe` recorded, and what ``reuse_grad`` needs to trust ``.grad``."""

    __slots__ = ("batch", "observed", "grad_versions", "stochastic")

    def __init__(self) -> None:
        self.batch: Optional[Batch] = None
        self.observed = 0  # observe() calls since the last step
        self.grad_versions: Dict[int, Tuple[torch.Tensor, int]] = {}  # id(param) -> (.grad, its version)
        self.stochastic = False  # the model drew random numbers: .grad cannot be reused

    def record(self, inputs: Any, targets: Any, loss: Any, model: Optional[torch.nn.Module]) -> None:
        self.batch = (inputs, targets, loss)
        self.observed += 1
        if model is not None:
            self.grad_versions = {id(p): (p.grad, p.grad._version) for p in model.parameters() if p.grad is not None}

    def take(self) -> Tuple[Optional[Batch], int]:
        """The recorded batch and how many times observe() ran since the last step; resets both."""
        batch, observed = self.batch, self.observed
        self.batch, self.observed = None, 0
        return batch, observed

    def grad_changed(self, params: Iterable[torch.Tensor]) -> bool:
        for p in params:
            recorded = self.grad_versions.get(id(p))
            if p.grad is None:
                if recorded is not None:
                    return True
            elif recorded is None or recorded[0] is not p.grad or recorded[1] != p.grad._version:
                return True
        return False


class Probe:
    """The batches that estimate ``g = grad L(w_a)``, and this learner's share of the work on them."""

    def __init__(self, probe, allgather_object: Callable[[Any, str], List[Any]]):
        self._probe = probe
        self._allgather = allgather_object
        self._shared: Optional[bool] = None  # every rank passed the same (fixed) probe

    def batches(self, step: int) -> List[Tuple[Any, Any]]:
        return checked_probe(self._probe(step)) if callable(self._probe) else self._probe

    def share(self, step: int, rank: int, n: int) -> Tuple[List[Tuple[int, Tuple[Any, Any]]], float, bool]:
        """The probe batches (with their indices) this learner computes ``g`` on, the factor that makes its share
        of ``g`` from their gradient sum, and whether ``g`` is then averaged over learners. Collective the first
        time (and every time for a probe drawn per step): the ranks compare digests of their probes."""
        batches = list(enumerate(self.batches(step)))
        shared = self._shared
        if shared is None or callable(self._probe):
            digests = self._allgather(_digest([b for _, b in batches]), "probe") if n > 1 else ["one learner"]
            shared = None not in digests and len(set(digests)) == 1
            if not callable(self._probe):
                self._shared = shared
        if not shared:
            return batches, 1.0 / len(batches), True
        if len(batches) == 1:
            return batches, 1.0, False
        return batches[rank::n], n / len(batches), True


class Workspace:
    """Work vectors kept between diagnostic steps: fresh memory would be paid for (page faults) each time."""

    def __init__(self) -> None:
        self._buffers: Dict[str, Optional[torch.Tensor]] = {}

    def get(self, name: str, numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        buf = self._buffers.get(name)
        if buf is None or buf.numel() != numel or buf.dtype != dtype or buf.device != device:
            self._buffers[name] = None  # free the old one first
            buf = self._buffers[name] = torch.empty(numel, dtype=dtype, device=device)
        return buf

    def vectors(self, params: Sequence[torch.Tensor], dtype: torch.dtype, *, average_g: bool, with_diff: bool,
                dpsgd: bool) -> Tuple[Dict[str, torch.Tensor], torch.Tensor]:
        """Flat vectors ``g``, ``diff`` (with a minibatch), ``g_j``, ``d``, and the leading block of them that is
        averaged over learners: in SSGD ``g_j`` (already ``g_a``) and ``d`` are the same on every learner, and a
        ``g`` that every learner computes alike is kept out of the average too."""
        averaged = ["g"] * average_g + ["diff"] * with_diff + ["g_j", "d"] * dpsgd
        local = ["g"] * (not average_g) + ["g_j", "d"] * (not dpsgd)
        numel = sum(p.numel() for p in params)
        work = self.get("vectors", (len(averaged) + len(local)) * numel, dtype, params[0].device)
        return dict(zip(averaged + local, work.split(numel))), work[:len(averaged) * numel]


def mean_weights(params: Sequence[torch.Tensor], have_batch: bool, n: int, work: Workspace, dtype: torch.dtype,
                 average_: Callable[[List[torch.Tensor], str], None]) -> Tuple[torch.Tensor, bool]:
    """``w_a``, the learners' mean weights (collective), and whether every learner has a minibatch for Eq. 4."""
    numel = sum(p.numel() for p in params)
    w_a = work.get("weights", numel + 1, dtype, params[0].device)
    have = torch.tensor([1.0 if have_batch else 0.0], dtype=dtype, device=w_a.device)
    torch._foreach_copy_(_views(w_a, [*params, have]), [*params, have])
    average_([w_a], "weights")
    return w_a[:numel], bool(w_a[-1] > 1 - 0.5 / n)


def layers(model: torch.nn.Module, params: Sequence[torch.Tensor]) -> Dict[str, List[int]]:
    """Indices of ``params`` by layer: a module's adjacent parameters, or a parameter on its own."""
    names = {id(p): n for n, p in model.named_parameters()}
    grouped: Dict[str, List[int]] = {}
    for i, p in enumerate(params):
        name = names.get(id(p), f"param{i}")
        layer = name.rsplit(".", 1)[0] if "." in name else name
        if grouped.get(layer) and grouped[layer][-1] != i - 1:  # not adjacent: name each parameter instead
            layer = name
        grouped.setdefault(layer, []).append(i)
    return grouped


def consensus_parts(params: Sequence[torch.Tensor], w_a: Optional[torch.Tensor], layer_indices: Dict[str, List[int]],
                    n: int) -> List[float]:
    """This learner's share ``|w_j - w_a|^2 / n`` of the consensus distance: the total, then per layer."""
    if w_a is None:  # SSGD: every learner holds w_a
        return [0.0] * (1 + len(layer_indices))
    sq = [_sq_norm([(1.0, p), (-1.0, v)]) / n for p, v in zip(params, _views(w_a, params))]
    per_layer = [sum(sq[i] for i in members) for members in layer_indices.values()]
    return [sum(per_layer), *per_layer]  # the layers partition the parameters


def loss_part(batch: Optional[Batch], n: int) -> float:
    if batch is None or batch[2] is None:
        return float("nan")
    loss = batch[2]
    return float(loss.detach() if isinstance(loss, torch.Tensor) else loss) / n


class Passes:
    """Forward/backward passes of the model at the learner's own weights or at the mean."""

    def __init__(self, model: torch.nn.Module, loss_fn, params: Sequence[torch.Tensor]):
        self.model, self.loss_fn, self.params = model, loss_fn, list(params)
        self.device = self.params[0].device
        self._own = [p.data for p in self.params]

    @contextlib.contextmanager
    def restoring(self) -> Iterator[None]:
        """Restore the parameters' data and the module buffers (e.g. BatchNorm statistics) bit for bit."""
        buffers = [(b, b.detach().clone()) for b in self.model.buffers()]
        try:
            yield
        finally:
            self.point_at_own()
            for b, value in buffers:
                b.copy_(value)

    def point_at(self, flat: torch.Tensor) -> None:
        """Make the parameters hold ``flat`` (views where possible)."""
        for p, v in zip(self.params, _views(flat, self.params)):
            p.data = v if p.is_contiguous() and p.dtype == v.dtype else torch.empty_like(p).copy_(v)

    def point_at_own(self) -> None:
        for p, data in zip(self.params, self._own):
            p.data = data

    def grads(self, batch: Tuple[Any, Any, Any], seed: int) -> Tuple[List[torch.Tensor], bool]:
        """``grad loss_fn`` on ``batch`` at the parameters' current values, drawing random numbers from ``seed``;
        and whether the pass drew any."""
        with torch.enable_grad(), _seeded(seed, self.device):
            state = _rng_states(self.device)
            grads = _grads(self.loss_fn(self.model(_to(batch[0], self.device)), _to(batch[1], self.device)),
                           self.params)
            drew = any(not torch.equal(a, b) for a, b in zip(state, _rng_states(self.device)))
        return grads, drew

    def probe_gradient(self, g: torch.Tensor, share: Sequence[Tuple[int, Tuple[Any, Any]]], scale: float,
                       step: int) -> None:
        """``g = scale * sum`` of the probe gradients of this learner's share, at the current parameters."""
        g.zero_()
        views = _views(g, self.params)
        for b, (x, y) in share:
            torch._foreach_add_(views, self.grads((x, y, None), _seed(step, -1, b))[0])
        if scale != 1.0:
            g.mul_(scale)

    def eq4_hessian_part(self, lr: float, probe: Sequence[Tuple[Any, Any]], w_a: torch.Tensor, n: int,
                         step: int) -> float:
        """This learner's term of Eq. 4's Hessian form, ``alpha^2 n^-2 |H dW_j|^2``, with ``H`` the probe loss's
        Hessian at the current parameters (``w_a``)."""
        delta = flatten(self._own, torch.float64) - w_a.double()
        hvp = batches_hvp(self.model, self.loss_fn, probe, self.params, seed=_seed(step, -2))
        return landscape_noise_hessian(lr, hvp, [delta], num_learners=n)
