r"""Loss-landscape pictures of the paper's Sec. 4.1: 2-D loss contours (Fig. 3) and Hessian heat maps (Fig. 4).

Both perturb a trained model along two random directions ``d1``, ``d2``, filter-normalized as in Li et al.
(2018), "Visualizing the loss landscape of neural nets": ``w(a, b) = w + a d1 + b d2`` for ``a, b`` on a
``K x K`` grid over ``[-span, span]`` (the paper: ``span = 0.1``, ``K = 50`` for contours, ``K = 4`` for the
ratio ``|lambda_min| / |lambda_max|`` of the Hessian's extreme eigenvalues).

Every rank must hold the same weights (e.g. ``horovod_dpsgd.checkpoint.average_model(model)``) and pass
the same ``data`` and ``seed``: with ``rank, size = hvd.rank(), hvd.size()`` rank ``r`` computes grid
points ``r, r + size, ...`` and an allreduce gives every rank the whole grid.

    grid = loss_contour(model, F.cross_entropy, test_batches, steps=50, rank=hvd.rank(), size=hvd.size())
    if hvd.rank() == 0:
        save_contour(grid, "runs/contour", writer=writer)
"""

import contextlib
import dataclasses
import math
import numbers
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
import horovod.torch as hvd

from horovod_dpsgd.diagnostics.quantities import batches_hvp, hessian_vector_product

__all__ = ["LandscapeGrid", "filter_normalized_direction", "loss_contour", "hessian_extremes", "hessian_ratio_map",
           "save_contour", "save_heatmap"]

Batches = Sequence[Tuple[Any, Any]]
Directions = Tuple[Sequence[torch.Tensor], Sequence[torch.Tensor]]


@dataclasses.dataclass
class LandscapeGrid:
    """Values on a grid of perturbations ``w + a d1 + b d2``: ``values[i, j]`` is at ``(alphas[i], betas[j])``."""

    alphas: np.ndarray
    betas: np.ndarray
    values: np.ndarray
    #: ``"loss"`` or ``"hessian_ratio"``.
    kind: str
    #: More grids of the same shape (``lambda_min``, ``lambda_max`` of a Hessian map).
    extras: Dict[str, np.ndarray] = dataclasses.field(default_factory=dict)


def _weights(model: torch.nn.Module) -> List[torch.Tensor]:
    weights = [p for p in model.parameters() if p.requires_grad]
    if not weights:
        raise ValueError("the model has no trainable parameters (requires_grad=True) to perturb")
    return weights


def filter_normalized_direction(model: torch.nn.Module, generator: torch.Generator) -> List[torch.Tensor]:
    """A random Gaussian direction over the trainable parameters, filter-normalized (Li et al. 2018).

    Each filter ``d[i]`` (a conv output channel, a linear layer's row) is rescaled to the norm of the weight's
    filter ``w[i]``, so the perturbation is scale-invariant; 1-D parameters (biases, BatchNorm/LayerNorm
    weights) get zero, as in Li et al.'s ``ignore='biasbn'``. ``generator`` (a CPU ``torch.Generator``) makes
    the direction reproducible and the same on every rank.
    """
    direction = []
    for w in _weights(model):
        d = torch.randn(w.shape, generator=generator, dtype=w.dtype).to(w.device)
        if w.dim() <= 1:
            d.zero_()
        else:
            w_norm = w.detach().reshape(w.shape[0], -1).norm(dim=1)
            d_norm = d.reshape(d.shape[0], -1).norm(dim=1)
            d.mul_((w_norm / (d_norm + 1e-10)).view(-1, *([1] * (w.dim() - 1))))
        direction.append(d)
    return direction


def _check_grid(steps: int, span: float, rank: int, size: int) -> None:
    if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps < 2:
        raise ValueError(f"steps must be an integer >= 2 (grid points per axis), got {steps!r}")
    if not (isinstance(span, (int, float)) and math.isfinite(span) and span > 0):
        raise ValueError(f"span must be a finite number > 0 (the grid covers [-span, span]), got {span!r}")
    if not (0 <= rank < size):
        raise ValueError(f"rank must be in [0, size), got rank={rank}, size={size}; pass hvd.rank(), hvd.size()")


def _directions(model: torch.nn.Module, seed: int, directions: Optional[Directions]) -> Directions:
    weights = _weights(model)
    if directions is None:
        generator = torch.Generator().manual_seed(seed)
        return filter_normalized_direction(model, generator), filter_normalized_direction(model, generator)
    d1, d2 = (list(d) for d in directions)
    for d in (d1, d2):
        if len(d) != len(weights) or any(t.shape != w.shape for t, w in zip(d, weights)):
            raise ValueError("each direction must be a list of tensors shaped like the model's trainable "
                             "parameters, in model.parameters() order")
    return [t.to(w) for t, w in zip(d1, weights)], [t.to(w) for t, w in zip(d2, weights)]


@contextlib.contextmanager
def _perturbed(model: torch.nn.Module, d1, d2) -> Iterator[Callable[[float, float], None]]:
    """Yield ``move(a, b)`` that sets the weights to ``w + a d1 + b d2``; restore weights and modes after."""
    weights = _weights(model)
    origin = [w.detach().clone() for w in weights]
    modes = [(m, m.training) for m in model.modules()]

    @torch.no_grad()
    def move(a: float, b: float) -> None:
        torch._foreach_copy_(weights, origin)
        torch._foreach_add_(weights, list(d1), alpha=a)
        torch._foreach_add_(weights, list(d2), alpha=b)

    model.eval()  # deterministic (no dropout), BatchNorm uses its running statistics
    try:
        yield move
    finally:
        with torch.no_grad():
            torch._foreach_copy_(weights, origin)
        for m, training in modes:
            m.training = training


def _grid(steps: int, span: float, rank: int, size: int, channels: int,
          point: Callable[[float, float], Sequence[float]], name: str) -> Tuple[np.ndarray, np.ndarray]:
    """Evaluate ``point(a, b)`` on this rank's share of the grid and gather the whole grid on every rank."""
    coords = np.linspace(-span, span, steps)
    out = np.zeros((channels, steps, steps))
    for index in range(rank, steps * steps, size):
        i, j = divmod(index, steps)
        out[:, i, j] = point(float(coords[i]), float(coords[j]))
    if size > 1:
        out = _allreduce_sum(torch.from_numpy(out), f"horovod_dpsgd.experiments.landscape.{name}").numpy()
    return coords, out


def _allreduce_sum(tensor: torch.Tensor, name: str) -> torch.Tensor:
    return hvd.allreduce(tensor, op=hvd.Sum, name=name)


def _to(x: Any, device: torch.device) -> Any:
    return x.to(device) if isinstance(x, torch.Tensor) else x


def loss_contour(model: torch.nn.Module, loss_fn: Callable[[Any, Any], torch.Tensor], data: Batches,
                 steps: int = 50, span: float = 0.1, seed: int = 0, rank: int = 0, size: int = 1,
                 directions: Optional[Directions] = None) -> LandscapeGrid:
    """The loss (mean of ``loss_fn`` over the ``data`` batches, model in eval mode) on a ``steps x steps`` grid.

    Paper Fig. 3. ``directions`` overrides the two random filter-normalized directions drawn from ``seed``
    (two lists of tensors shaped like the trainable parameters). The model's weights and train/eval
    modes are restored afterwards. With ``size > 1`` every rank must call it (see the module docstring).
    """
    _check_grid(steps, span, rank, size)
    data = list(data)
    if not data:
        raise ValueError("data must be a non-empty list of (inputs, targets) batches")
    d1, d2 = _directions(model, seed, directions)
    device = _weights(model)[0].device
    with _perturbed(model, d1, d2) as move, torch.no_grad():
        def point(a: float, b: float) -> List[float]:
            move(a, b)
            return [sum(float(loss_fn(model(_to(x, device)), _to(y, device))) for x, y in data) / len(data)]
        coords, out = _grid(steps, span, rank, size, 1, point, "contour")
    return LandscapeGrid(coords, coords.copy(), out[0], "loss")


def _lanczos_extremes(hvp: Callable[[torch.Tensor], torch.Tensor], dim: int, iters: int, tol: float, seed: int,
                      device: torch.device) -> Tuple[float, float]:
    """Extreme Ritz values of ``hvp`` after at most ``iters`` Lanczos steps (full reorthogonalisation)."""
    k_max = min(iters, dim)
    basis = torch.zeros(k_max, dim, dtype=torch.float64, device=device)
    q = torch.randn(dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(device)
    basis[0] = q / q.norm()
    alphas: List[float] = []
    betas: List[float] = []
    for k in range(k_max):
        z = hvp(basis[k]).to(torch.float64)
        alphas.append(float(torch.dot(basis[k], z)))
        for _ in range(2):  # Gram-Schmidt twice keeps the basis orthogonal to working precision
            z -= basis[:k + 1].T @ (basis[:k + 1] @ z)
        beta = float(z.norm())
        theta, s = np.linalg.eigh(np.diag(alphas) + np.diag(betas, 1) + np.diag(betas, -1))
        scale = max(abs(theta[0]), abs(theta[-1]), np.finfo(np.float64).tiny)
        # |H y - theta y| = beta |s_last| for the Ritz pair (theta, y): stop when both ends are converged.
        if k + 1 == k_max or beta * max(abs(s[-1, 0]), abs(s[-1, -1])) <= tol * scale:
            return float(theta[-1]), float(theta[0])
        betas.append(beta)
        basis[k + 1] = z / beta
    raise AssertionError("unreachable")


def hessian_extremes(loss_fn: Callable[[], torch.Tensor], params: Sequence[torch.Tensor], iters: int = 30,
                     tol: float = 1e-3, seed: int = 0) -> Tuple[float, float]:
    """``(lambda_max, lambda_min)``, the largest and smallest eigenvalues of the Hessian of ``loss_fn()``.

    Lanczos iteration on Hessian-vector products, with full reorthogonalisation, stopped when both extreme
    Ritz pairs have residual ``<= tol * max|Ritz value|`` or after ``iters`` products. Lanczos rather than
    power iteration: one Krylov sequence converges to *both* ends of the spectrum, at a rate governed by
    the square root of the relative gap; power iteration finds only the largest-magnitude end, and the
    shifted power iteration for the other end stalls when, as in neural networks, many eigenvalues
    crowd near zero. Full reorthogonalisation prevents spurious copies of converged eigenvalues; it stores
    the ``iters`` basis vectors (``iters * N * 8`` bytes for ``N`` parameters), which is small next to the
    ``iters`` products for the few tens of iterations needed.

    Args:
        loss_fn: a closure returning the scalar loss (recomputed for every product).
        params: the parameters the Hessian is taken with respect to.
        iters: maximum Hessian-vector products (the Krylov dimension); capped at ``N``.
        tol: relative residual at which both ends count as converged.
        seed: seed of the random start vector.
    """
    params = list(params)
    if isinstance(iters, bool) or not isinstance(iters, numbers.Integral) or iters < 1:
        raise ValueError(f"iters must be a positive integer (Hessian-vector products), got {iters!r}")
    dim = sum(p.numel() for p in params)
    return _lanczos_extremes(lambda v: hessian_vector_product(loss_fn, params, v), dim, iters, tol, seed,
                             params[0].device)


def hessian_ratio_map(model: torch.nn.Module, loss_fn: Callable[[Any, Any], torch.Tensor], data: Batches,
                      steps: int = 4, span: float = 0.1, seed: int = 0, iters: int = 30, tol: float = 1e-3,
                      rank: int = 0, size: int = 1, directions: Optional[Directions] = None) -> LandscapeGrid:
    """``|lambda_min| / |lambda_max|`` of the Hessian of the ``data`` loss on a ``steps x steps`` grid (Fig. 4).

    Near 0: locally convex; near 1: a saddle as curved downwards as upwards. The eigenvalues come from
    :func:`hessian_extremes` (model in eval mode, so the operator is deterministic) and are kept in
    ``extras["lambda_min"]`` and ``extras["lambda_max"]``. Directions, restoring and ranks as in
    :func:`loss_contour`.
    """
    _check_grid(steps, span, rank, size)
    data = list(data)
    if not data:
        raise ValueError("data must be a non-empty list of (inputs, targets) batches")
    d1, d2 = _directions(model, seed, directions)
    weights = _weights(model)
    dim = sum(w.numel() for w in weights)
    with _perturbed(model, d1, d2) as move:
        def point(a: float, b: float) -> List[float]:
            move(a, b)
            lam_max, lam_min = _lanczos_extremes(batches_hvp(model, loss_fn, data, weights), dim, iters, tol, seed,
                                                 weights[0].device)
            return [abs(lam_min) / abs(lam_max) if lam_max != 0 else math.nan, lam_min, lam_max]
        coords, out = _grid(steps, span, rank, size, 3, point, "hessian")
    return LandscapeGrid(coords, coords.copy(), out[0], "hessian_ratio",
                         {"lambda_min": out[1], "lambda_max": out[2]})


def _outputs(grid: LandscapeGrid, path) -> Dict[str, Path]:
    base = Path(path)
    if base.suffix in (".png", ".npz"):
        base = base.with_suffix("")
    base.parent.mkdir(parents=True, exist_ok=True)
    files = {"png": base.with_name(base.name + ".png"), "npz": base.with_name(base.name + ".npz")}
    np.savez(files["npz"], alphas=grid.alphas, betas=grid.betas, values=grid.values, kind=grid.kind, **grid.extras)
    return files


def _finish(fig, files: Dict[str, Path], writer, tag: str, step: int) -> Dict[str, Path]:
    fig.savefig(files["png"], dpi=110)
    if writer is not None:
        writer.add_figure(tag, fig, global_step=step)
        writer.flush()
    return files


def _figure(title: Optional[str]):
    from matplotlib.figure import Figure  # Agg rendering, no pyplot state; matplotlib is the "plots" extra

    fig = Figure(figsize=(5, 4.2), layout="constrained")
    ax = fig.add_subplot()
    ax.set_xlabel("alpha (direction 1)")
    ax.set_ylabel("beta (direction 2)")
    if title:
        ax.set_title(title)
    return fig, ax


def save_contour(grid: LandscapeGrid, path, writer=None, tag: str = "landscape/contour", step: int = 0,
                 levels: Any = 30, title: Optional[str] = None) -> Dict[str, Path]:
    """Write ``path.png`` (contour lines), ``path.npz`` (the raw grid) and, given a ``SummaryWriter``, an image.

    ``levels``: the number of contour lines, or their values (the paper spaces them 0.005 apart:
    ``np.arange(grid.values.min(), grid.values.max(), 0.005)``). Returns ``{"png": path, "npz": path}``.
    """
    files = _outputs(grid, path)
    fig, ax = _figure(title or f"{grid.kind} around the model")
    lines = ax.contour(grid.alphas, grid.betas, grid.values.T, levels=levels, cmap="viridis", linewidths=0.8)
    fig.colorbar(lines, ax=ax, label=grid.kind)
    ax.plot([0], [0], "k+", markersize=10)
    ax.set_aspect("equal")
    return _finish(fig, files, writer, tag, step)


def save_heatmap(grid: LandscapeGrid, path, writer=None, tag: str = "landscape/hessian_ratio", step: int = 0,
                 title: Optional[str] = None) -> Dict[str, Path]:
    """Write ``path.png`` (a heat map, each cell labelled), ``path.npz`` and, given a writer, an image.

    Colours span ``[0, 1]`` for a Hessian ratio (cool: convex, warm: saddle). Returns the file paths.
    """
    files = _outputs(grid, path)
    fig, ax = _figure(title or ("|lambda_min| / |lambda_max|" if grid.kind == "hessian_ratio" else grid.kind))
    ha, hb = np.diff(grid.alphas).mean() / 2, np.diff(grid.betas).mean() / 2
    bounds = (0.0, 1.0) if grid.kind == "hessian_ratio" else (np.nanmin(grid.values), np.nanmax(grid.values))
    image = ax.imshow(grid.values.T, origin="lower", cmap="coolwarm", vmin=bounds[0], vmax=bounds[1], aspect="auto",
                      extent=(grid.alphas[0] - ha, grid.alphas[-1] + ha, grid.betas[0] - hb, grid.betas[-1] + hb))
    fig.colorbar(image, ax=ax)
    if grid.values.size <= 100:
        for i, a in enumerate(grid.alphas):
            for j, b in enumerate(grid.betas):
                ax.text(a, b, f"{grid.values[i, j]:.2f}", ha="center", va="center", fontsize=8)
    return _finish(fig, files, writer, tag, step)
