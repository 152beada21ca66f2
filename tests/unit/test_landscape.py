"""Loss contours and Hessian heat maps (paper Fig. 3 and Fig. 4) on losses with known geometry."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.tensorboard import SummaryWriter

from horovod_dpsgd.experiments import landscape
from horovod_dpsgd.experiments.landscape import (LandscapeGrid, filter_normalized_direction, hessian_extremes,
                                     hessian_ratio_map, loss_contour, save_contour, save_heatmap)


class Quadratic2D(torch.nn.Module):
    """L(w) = 1/2 w^T A w for w = weight (shape 2 x 1, so filter normalization treats each entry as a filter)."""

    def __init__(self, a, w=(0.0, 0.0)):
        super().__init__()
        self.a = torch.as_tensor(a, dtype=torch.float64)
        self.weight = torch.nn.Parameter(torch.tensor(w, dtype=torch.float64).reshape(2, 1))

    def forward(self, x):
        w = self.weight.reshape(-1)
        return 0.5 * w @ self.a @ w


def output_loss(output, target):
    return output


DATA = [(None, None)]
AXES = ([torch.tensor([[1.0], [0.0]], dtype=torch.float64)], [torch.tensor([[0.0], [1.0]], dtype=torch.float64)])


def mlp():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(5, 6), torch.nn.ReLU(), torch.nn.Linear(6, 3))


def test_filter_normalized_direction():
    model = mlp()
    d = filter_normalized_direction(model, torch.Generator().manual_seed(3))
    weights = [p.detach() for p in model.parameters()]
    assert [t.shape for t in d] == [w.shape for w in weights]
    for t, w in zip(d, weights):
        if w.dim() == 1:
            assert torch.count_nonzero(t) == 0      # biases are not perturbed
        else:
            assert torch.allclose(t.norm(dim=1), w.norm(dim=1), rtol=1e-5)   # each row: the weight row's norm
    again = filter_normalized_direction(model, torch.Generator().manual_seed(3))
    assert all(torch.equal(a, b) for a, b in zip(d, again))


def test_contour_of_a_quadratic_is_an_ellipse_with_the_expected_axis_ratio():
    a = np.array([[1.0, 0.0], [0.0, 4.0]])          # level sets: ellipses with semi-axes ratio sqrt(4 / 1) = 2
    model = Quadratic2D(a, w=(0.3, -0.2))
    before = model.weight.detach().clone()
    grid = loss_contour(model, output_loss, DATA, steps=21, span=0.5, directions=AXES)
    assert torch.equal(model.weight, before)
    alpha, beta = np.meshgrid(grid.alphas, grid.betas, indexing="ij")
    w = np.array([0.3, -0.2])
    exact = 0.5 * np.einsum("...i,ij,...j->...", np.stack([alpha + w[0], beta + w[1]], -1), a,
                            np.stack([alpha + w[0], beta + w[1]], -1))
    assert np.allclose(grid.values, exact, rtol=1e-12)
    # Fit L = c + b.x + 1/2 x^T Q x on the grid; the level sets are ellipses iff Q > 0, axis ratio sqrt(q2 / q1).
    x, y = alpha.ravel(), beta.ravel()
    design = np.stack([np.ones_like(x), x, y, x * x / 2, y * y / 2, x * y], 1)
    coef = np.linalg.lstsq(design, grid.values.ravel(), rcond=None)[0]
    q = np.linalg.eigvalsh(np.array([[coef[3], coef[5]], [coef[5], coef[4]]]))
    assert q.min() > 0
    assert np.sqrt(q.max() / q.min()) == pytest.approx(2.0, rel=1e-9)


def test_contour_with_random_directions_restores_the_model_and_splits_over_ranks(monkeypatch):
    model = mlp()
    model.train()
    model[0].eval()
    data = [(torch.randn(8, 5), torch.randint(0, 3, (8,))) for _ in range(2)]
    before = [p.detach().clone() for p in model.parameters()]
    whole = loss_contour(model, F.cross_entropy, data, steps=5, span=0.2, seed=7)
    assert whole.values.shape == (5, 5) and np.isfinite(whole.values).all()
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    assert model.training and not model[0].training and model[2].training
    with torch.no_grad():
        center = np.mean([F.cross_entropy(model(x), y).item() for x, y in data])
    assert whole.values[2, 2] == pytest.approx(center, rel=1e-6)
    assert np.array_equal(whole.values, loss_contour(model, F.cross_entropy, data, steps=5, span=0.2, seed=7).values)
    # Two ranks: each computes every other point; the allreduce (here: identity) sums the partial grids.
    monkeypatch.setattr(landscape, "_allreduce_sum", lambda t, name: t)
    parts = [loss_contour(model, F.cross_entropy, data, steps=5, span=0.2, seed=7, rank=r, size=2).values
             for r in range(2)]
    assert np.count_nonzero(parts[0]) == 13 and np.count_nonzero(parts[1]) == 12
    assert np.allclose(parts[0] + parts[1], whole.values, rtol=0, atol=0)


def test_hessian_extremes_equal_the_eigenvalues_of_a_quadratic():
    torch.manual_seed(1)
    m = torch.randn(6, 6, dtype=torch.float64)
    a = (m + m.T) / 2                                 # indefinite
    w = torch.nn.Parameter(torch.randn(6, dtype=torch.float64))
    lam_max, lam_min = hessian_extremes(lambda: 0.5 * w @ a @ w, [w], iters=6, tol=1e-10)
    eig = np.linalg.eigvalsh(a.numpy())
    assert lam_max == pytest.approx(eig[-1], abs=1e-6)
    assert lam_min == pytest.approx(eig[0], abs=1e-6)
    assert w.grad is None


def test_hessian_extremes_of_a_larger_spectrum_converge_before_n_iterations():
    eig = np.concatenate([[-2.0], np.linspace(0.0, 1.0, 298), [10.0]])
    q = np.linalg.qr(np.random.default_rng(0).standard_normal((300, 300)))[0]
    a = torch.from_numpy(q @ np.diag(eig) @ q.T)
    w = torch.nn.Parameter(torch.zeros(300, dtype=torch.float64))
    lam_max, lam_min = hessian_extremes(lambda: 0.5 * w @ a @ w, [w], iters=60, tol=1e-8)
    assert lam_max == pytest.approx(10.0, abs=1e-6) and lam_min == pytest.approx(-2.0, abs=1e-6)


@pytest.mark.parametrize("a, ratio", [([[1.0, 0.0], [0.0, -1.0]], 1.0),     # saddle 1/2 (x^2 - y^2)
                                      ([[1.0, 0.0], [0.0, 4.0]], 0.25)])    # bowl: lambda_min / lambda_max
def test_hessian_ratio_map(a, ratio):
    model = Quadratic2D(a, w=(0.5, 0.25))
    grid = hessian_ratio_map(model, output_loss, DATA, steps=4, span=0.1, iters=2)
    assert grid.values.shape == (4, 4) and grid.kind == "hessian_ratio"
    assert np.allclose(grid.values, ratio, atol=1e-9)
    assert np.allclose(grid.extras["lambda_max"], max(np.linalg.eigvalsh(a)), atol=1e-9)
    assert np.allclose(grid.extras["lambda_min"], min(np.linalg.eigvalsh(a)), atol=1e-9)


def test_invalid_grids_are_rejected():
    model = Quadratic2D(np.eye(2))
    with pytest.raises(ValueError, match="steps"):
        loss_contour(model, output_loss, DATA, steps=1)
    with pytest.raises(ValueError, match="span"):
        loss_contour(model, output_loss, DATA, span=0)
    with pytest.raises(ValueError, match="rank"):
        loss_contour(model, output_loss, DATA, rank=2, size=2)
    with pytest.raises(ValueError, match="data"):
        hessian_ratio_map(model, output_loss, [])
    with pytest.raises(ValueError, match="direction"):
        loss_contour(model, output_loss, DATA, directions=([torch.zeros(2)], [torch.zeros(2)]))
    with pytest.raises(ValueError, match="iters"):
        hessian_extremes(lambda: model(None), [model.weight], iters=0)


def test_save_contour_and_heatmap_write_png_npz_and_a_tensorboard_image(tmp_path):
    contour = loss_contour(Quadratic2D([[1.0, 0.0], [0.0, 4.0]]), output_loss, DATA, steps=9, span=1.0,
                           directions=AXES)
    heat = LandscapeGrid(np.linspace(-0.1, 0.1, 4), np.linspace(-0.1, 0.1, 4), np.full((4, 4), 0.5),
                         "hessian_ratio", {"lambda_min": np.full((4, 4), -1.0)})
    writer = SummaryWriter(str(tmp_path / "tb"))
    files = save_contour(contour, tmp_path / "out" / "contour.png", writer=writer, step=3)
    files.update({f"heat_{k}": v for k, v in save_heatmap(heat, tmp_path / "out" / "heat", writer=writer).items()})
    writer.close()
    for path in files.values():
        assert path.exists() and path.stat().st_size > 0
    assert files["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    raw = np.load(files["npz"])
    assert np.array_equal(raw["values"], contour.values) and str(raw["kind"]) == "loss"
    assert np.array_equal(np.load(files["heat_npz"])["lambda_min"], heat.extras["lambda_min"])
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    assert set(events.Tags()["images"]) == {"landscape/contour", "landscape/hessian_ratio"}
    assert [e.step for e in events.Images("landscape/contour")] == [3]
