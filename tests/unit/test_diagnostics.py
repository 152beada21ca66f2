"""The noise quantities (paper Eq. 3 and Eq. 4) against closed forms, and the NoiseDiagnostics callback.

The quantities are checked on quadratic losses L_A(w) = 1/2 w^T A w, whose gradients (A w) and Hessians (A)
are known exactly. The callback runs n learners as threads of this process, with an in-process allreduce in
place of Horovod's; one test runs it under real Horovod (one process, SSGD) and reads the event file back.
"""

import itertools
import math
import threading
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import horovod.torch as hvd
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import horovod_dpsgd
from horovod_dpsgd.diagnostics import callback as diagnostics, measure, quantities as noise
from horovod_dpsgd.callbacks import StepContext
from horovod_dpsgd.diagnostics import NoiseDiagnostics
from horovod_dpsgd.diagnostics.quantities import (consensus_distance, effective_learning_rate, hessian_vector_product, landscape_noise,
                                 landscape_noise_hessian, layer_consensus_distance, noise_strength)

LR = 0.3
N = 3  # learners


def rand(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def sym(n, seed):
    a = rand(n, n, seed=seed)
    return (a + a.T) / 2


W = [rand(3, seed=j) for j in range(N)]                # learner weights w_j
A = [sym(3, seed=10 + j) for j in range(N)]            # Hessians of the learners' minibatch losses
PROBE = [(sym(3, seed=20), None), (sym(3, seed=21), None)]
H_PROBE = (PROBE[0][0] + PROBE[1][0]) / 2              # Hessian of the probe loss


def closed_forms(after: int = 0):
    """Every logged quantity of one DPSGD step, from the definitions, in numpy, after ``after`` plain SGD updates
    w_j <- w_j - alpha A_j w_j (no mixing) of the learners' initial weights W."""
    a = [x.numpy() for x in A]
    w = [x.numpy() for x in W]
    for _ in range(after):
        w = [wj - LR * aj @ wj for aj, wj in zip(a, w)]
    w_a = np.mean(w, 0)
    g_a = np.mean([aj @ wj for aj, wj in zip(a, w)], 0)
    g = H_PROBE.numpy() @ w_a
    alpha_e = LR * (g_a @ g) / (g @ g)
    d = np.mean([aj @ (wj - w_a) for aj, wj in zip(a, w)], 0)
    delta = LR ** 2 * (g_a @ g_a) - alpha_e ** 2 * (g @ g)
    return {   # plain SGD, no perturbation: the displacement of w_a is alpha g_a, so both forms of Eq. 3 agree
        "alpha_e": alpha_e, "alpha_e_over_alpha": alpha_e / LR, "lr": LR, "delta": delta,
        "grad_alpha_e_over_alpha": alpha_e / LR, "grad_delta": delta, "norm_dw": LR * np.linalg.norm(g_a),
        "delta2": LR ** 2 * (d @ d),
        "delta2_hessian": LR ** 2 / N ** 2 * sum(np.sum((H_PROBE.numpy() @ (wj - w_a)) ** 2) for wj in w),
        "consensus_distance": np.mean([np.sum((wj - w_a) ** 2) for wj in w]),
        "consensus/first": np.mean([np.sum((wj - w_a)[:2] ** 2) for wj in w]),
        "consensus/second": np.mean([np.sum((wj - w_a)[2:] ** 2) for wj in w]),
        "norm_ga": np.linalg.norm(g_a), "norm_g": np.linalg.norm(g),
        "loss": np.mean([0.5 * wj @ aj @ wj for aj, wj in zip(a, w)]),
    }


# ---------------------------------------------------------------- pure functions

def test_effective_learning_rate_and_noise_strength_by_hand():
    g, g_a = torch.tensor([2.0, 0.0]), torch.tensor([3.0, 4.0])
    assert effective_learning_rate(LR, g_a, g) == pytest.approx(1.5 * LR, rel=1e-12)
    assert noise_strength(LR, g_a, g) == pytest.approx(16 * LR ** 2, rel=1e-12)  # (0, 4) is orthogonal to g
    assert math.isnan(effective_learning_rate(LR, g_a, torch.zeros(2)))
    assert noise_strength(LR, g_a, torch.zeros(2)) == pytest.approx(25 * LR ** 2)


@pytest.mark.parametrize("chunk", [7, 1 << 16])
def test_gram_and_squared_norms_reduce_in_float64_chunk_by_chunk(monkeypatch, chunk):
    monkeypatch.setattr(noise, "_CHUNK", chunk)
    rng = np.random.default_rng(0)
    vs = [rng.standard_normal(103).astype(np.float32) for _ in range(3)]
    expected = np.array([[np.dot(a.astype(np.float64), b.astype(np.float64)) for b in vs] for a in vs])
    np.testing.assert_allclose(noise.gram([torch.from_numpy(v) for v in vs]).numpy(), expected, rtol=1e-14)
    combo = 0.5 * vs[0].astype(np.float64) - 2.0 * vs[1].astype(np.float64)
    assert noise._sq_norm([(0.5, torch.from_numpy(vs[0])), (-2.0, torch.from_numpy(vs[1]))]) == \
        pytest.approx(np.dot(combo, combo), rel=1e-14)


def test_eq3_on_a_quadratic():
    expected = closed_forms()
    w_a = torch.stack(W).mean(0)
    g_a = torch.stack([a @ w for a, w in zip(A, W)]).mean(0)
    g = H_PROBE @ w_a
    alpha_e, delta = effective_learning_rate(LR, g_a, g), noise_strength(LR, g_a, g)
    assert alpha_e == pytest.approx(expected["alpha_e"], rel=1e-6)
    assert delta == pytest.approx(expected["delta"], rel=1e-6)
    assert LR ** 2 * float(g_a @ g_a) == pytest.approx(alpha_e ** 2 * float(g @ g) + delta, rel=1e-12)


def test_eq4_definition_on_a_quadratic():
    w_a = torch.stack(W).mean(0)
    own = [a @ w for a, w in zip(A, W)]
    at_mean = [a @ w_a for a in A]
    expected = closed_forms()["delta2"]
    assert landscape_noise(LR, own, at_mean) == pytest.approx(expected, rel=1e-6)
    mean_difference = torch.stack([o - m for o, m in zip(own, at_mean)]).mean(0)
    assert landscape_noise(LR, mean_difference) == pytest.approx(expected, rel=1e-6)
    with pytest.raises(ValueError, match="per learner"):
        landscape_noise(LR, own, at_mean[:2])


def test_eq4_definition_vanishes_when_all_learners_share_one_quadratic():
    # sum_j dW_j = 0, so n^-1 sum_j A dW_j = 0: only minibatch-dependent curvature contributes to Delta^(2).
    w_a = torch.stack(W).mean(0)
    a = A[0]
    assert landscape_noise(LR, [a @ w for w in W], [a @ w_a] * N) < 1e-28
    assert landscape_noise_hessian(LR, lambda v: a @ v, [w - w_a for w in W]) > 1e-3


def test_eq4_hessian_form_equals_the_explicit_sum_over_H_H_C():
    w_a = torch.stack(W).mean(0)
    deltas = [w - w_a for w in W]
    h = H_PROBE.numpy()
    c = sum(np.outer(d, d) for d in (x.numpy() for x in deltas)) / N ** 2     # C_ll' = n^-2 sum_j dW_jl dW_jl'
    explicit = LR ** 2 * np.einsum("kl,km,lm->", h, h, c)
    assert landscape_noise_hessian(LR, lambda v: H_PROBE @ v, deltas) == pytest.approx(explicit, rel=1e-6)
    assert explicit == pytest.approx(closed_forms()["delta2_hessian"], rel=1e-6)
    # Per-rank partial sums (this rank's dW_j, num_learners=n) add up to the total.
    parts = sum(landscape_noise_hessian(LR, lambda v: H_PROBE @ v, [d], num_learners=N) for d in deltas)
    assert parts == pytest.approx(explicit, rel=1e-12)


def test_eq4_hessian_form_is_the_minibatch_average_of_the_definition():
    """Eq. 4's "~": averaged over independent minibatches, the definition's cross-learner terms leave
    n^-2 sum_j dW_j^T (<H_mu^2> - H^2) dW_j. A two-sample data set with Hessians 0 and 2H (batch size 1,
    mean H, <H_mu^2> = 2 H^2) makes that exactly the paper's alpha^2 sum H H C; for a quadratic the Taylor
    expansion is exact, so both forms agree to rounding."""
    h = sym(3, seed=30)
    w_a = torch.stack(W).mean(0)
    samples = [torch.zeros(3, 3, dtype=torch.float64), 2 * h]
    definitions = [landscape_noise(LR, [s @ w for s, w in zip(draw, W)], [s @ w_a for s in draw])
                   for draw in itertools.product(samples, repeat=N)]        # every assignment of samples
    hessian_form = landscape_noise_hessian(LR, lambda v: h @ v, [w - w_a for w in W])
    assert np.mean(definitions) == pytest.approx(hessian_form, rel=1e-9)


def test_hessian_vector_product_by_double_backward():
    w = torch.nn.Parameter(rand(4, seed=40))
    a = sym(4, seed=41)
    v = rand(4, seed=42)
    hv = hessian_vector_product(lambda: (w ** 4).sum() / 4 + 0.5 * w @ a @ w, [w], v)
    assert torch.allclose(hv, 3 * w.detach() ** 2 * v + a @ v, rtol=1e-12, atol=1e-12)
    assert w.grad is None
    deltas = [x - torch.stack(W).mean(0) for x in W]
    p = torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))
    autograd_form = landscape_noise_hessian(
        LR, lambda u: hessian_vector_product(lambda: 0.5 * p @ H_PROBE @ p, [p], u), deltas)
    assert autograd_form == pytest.approx(closed_forms()["delta2_hessian"], rel=1e-6)


def test_consensus_distance_total_per_layer_and_per_rank():
    expected = closed_forms()
    assert consensus_distance(W) == pytest.approx(expected["consensus_distance"], rel=1e-12)
    layers = layer_consensus_distance(W, {"first": slice(0, 2), "second": slice(2, 3)})
    assert layers == {"first": pytest.approx(expected["consensus/first"], rel=1e-12),
                      "second": pytest.approx(expected["consensus/second"], rel=1e-12)}
    w_a = torch.stack(W).mean(0)
    assert sum(consensus_distance([w], w_a, num_learners=N) for w in W) == pytest.approx(
        expected["consensus_distance"], rel=1e-12)
    assert consensus_distance([W[0]] * 4) == 0.0
    with pytest.raises(ValueError, match="mean=w_a"):
        consensus_distance([W[0]], num_learners=N)


# ---------------------------------------------------------------- the callback, n learners as threads

class Quadratic(torch.nn.Module):
    """L_A(w) = 1/2 w^T A w, w = (first.weight, second.weight); a batch's inputs are its Hessian A."""

    def __init__(self, w):
        super().__init__()
        self.first, self.second = torch.nn.Module(), torch.nn.Module()
        self.first.weight = torch.nn.Parameter(w[:2].clone())
        self.second.weight = torch.nn.Parameter(w[2:].clone())
        self.calls = 0

    def forward(self, a):
        self.calls += 1
        w = torch.cat([self.first.weight, self.second.weight])
        return 0.5 * w @ a @ w


def quadratic_loss(output, target):
    return output


class FakeWorld:
    """``n`` learners as threads; ``average_`` averages in place what all of them contribute."""

    def __init__(self, n):
        self.n, self.slots, self.names, self.averaged = n, [None] * n, [], []
        self.barrier = threading.Barrier(n, timeout=60)
        self.local = threading.local()

    def install(self, monkeypatch):
        monkeypatch.setattr(diagnostics, "_average_", self.average_)
        monkeypatch.setattr(diagnostics, "_allgather_object", self.allgather_object)
        return self

    def average_(self, tensors, name):
        rank = getattr(self.local, "rank", 0)
        self.slots[rank] = [t.clone() for t in tensors]
        if rank == 0:
            self.names.append(name)
            self.averaged.append(sum(t.numel() for t in tensors))
        self.barrier.wait()
        for i, t in enumerate(tensors):
            t.copy_(torch.stack([slot[i] for slot in self.slots]).sum(0) / self.n)
        self.barrier.wait()

    def allgather_object(self, obj, name):
        self.slots[getattr(self.local, "rank", 0)] = obj
        self.barrier.wait()
        gathered = list(self.slots)
        self.barrier.wait()
        return gathered

    def run(self, fn):
        results, errors = [None] * self.n, []

        def target(rank):
            self.local.rank = rank
            try:
                results[rank] = fn(rank)
            except BaseException as exc:  # noqa: B902 - re-raised in the main thread
                errors.append(exc)
                self.barrier.abort()

        threads = [threading.Thread(target=target, args=(r,)) for r in range(self.n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        if errors:
            raise errors[0]
        return results


@pytest.fixture
def world(monkeypatch):
    return FakeWorld(N).install(monkeypatch)


def learner_steps(rank, steps, every, log_dir=None, hessian=True, observe=True, reuse_grad=False, probe=PROBE):
    model = Quadratic(W[rank])
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    diag = NoiseDiagnostics(model, quadratic_loss, probe, every=every, log_dir=log_dir, hessian=hessian,
                            reuse_grad=reuse_grad)
    for step in range(steps):
        opt.zero_grad()
        loss = quadratic_loss(model(A[rank]), None)
        loss.backward()
        if observe:
            diag.observe(A[rank], None, loss)
        before = [(p.detach().clone(), p.grad.clone()) for p in model.parameters()]
        ctx = StepContext(opt, step, rank, N, "dpsgd")
        diag.on_before_mixing(ctx)
        for p, (w, g) in zip(model.parameters(), before):   # w_j and .grad restored bit for bit
            assert torch.equal(p, w) and torch.equal(p.grad, g)
        opt.step()   # no mixing here: mixing with a doubly stochastic W(t) leaves w_a where it is
        diag.on_step_end(ctx)
    diag.close()
    return diag


def test_callback_logs_the_closed_forms_on_every_learner(world, tmp_path):
    diags = world.run(lambda r: learner_steps(r, steps=2, every=2, log_dir=tmp_path if r == 0 else None))
    expected = closed_forms(after=1)
    for diag in diags:
        assert diag.count == 1 and diag.last["step"] == 2
        assert set(diag.last) == set(expected) | {"step"}
        for key, value in expected.items():
            assert diag.last[key] == pytest.approx(value, rel=1e-9), key
    # TensorBoard, from rank 0 only, at the step count after the measured update.
    events = EventAccumulator(str(tmp_path))
    events.Reload()
    assert set(events.Tags()["scalars"]) == {diagnostics.TAGS.get(k, k) for k in expected}
    for key, value in expected.items():
        (event,) = events.Scalars(diagnostics.TAGS.get(key, key))
        assert event.step == 2
        assert event.value == pytest.approx(value, rel=1e-6), key
    assert len(list(tmp_path.iterdir())) == 1


def test_nothing_is_computed_on_other_steps(world):
    loss_calls = [0] * N

    def run(rank):
        def counting_loss(output, target):
            loss_calls[rank] += 1
            return output

        model = Quadratic(W[rank])
        opt = torch.optim.SGD(model.parameters(), lr=LR)
        diag = NoiseDiagnostics(model, counting_loss, PROBE, every=4)
        for step in range(3):
            # Opaque objects: observe() may only keep references to them.
            diag.observe(object(), object(), object())
            ctx = StepContext(opt, step, rank, N, "dpsgd")
            diag.on_before_mixing(ctx)
            diag.on_step_end(ctx)
        assert model.calls == 0 and loss_calls[rank] == 0 and diag.count == 0 and diag.last == {}
        loss = model(A[rank])
        loss.backward()
        diag.observe(A[rank], None, loss)
        ctx = StepContext(opt, 3, rank, N, "dpsgd")
        diag.on_before_mixing(ctx)
        diag.on_step_end(ctx)
        return model.calls, diag.count

    assert world.names == []
    results = world.run(run)
    assert world.names == ["weights", "gradients"]
    # Step 3: 1 (the test's own forward) + 2 on the minibatch (at w_j and w_a) + this learner's share of the
    # probe: every learner has the same 2 batches, so learners 0 and 1 compute one each and learner 2 none.
    assert results == [(4, 1), (4, 1), (3, 1)]
    assert loss_calls == [3, 3, 2]


# The probe's Hessian is H_PROBE in each case: split among learners, one batch, or a different one per learner.
PROBES = {"same, split among learners": lambda rank: PROBE,
          "same, one batch": lambda rank: [(H_PROBE, None)],
          "one per learner": lambda rank: [(H_PROBE + (rank - 1) * sym(3, seed=30), None)]}


@pytest.mark.parametrize("probe", PROBES)
def test_probe_work_is_split_or_not_repeated_and_gives_the_closed_forms(monkeypatch, probe):
    world = FakeWorld(N).install(monkeypatch)
    diags = world.run(lambda r: learner_steps(r, steps=1, every=1, hessian=False, probe=PROBES[probe](r)))
    expected = closed_forms()
    for diag in diags:
        for key in set(expected) - {"delta2_hessian"}:
            assert diag.last[key] == pytest.approx(expected[key], rel=1e-9), key
    # Forward passes: 1 (the step's own) + 2 on the minibatch + the probe batches this learner computes.
    probe_passes = [diag.model.calls - 3 for diag in diags]
    # Averaged: g (unless every learner computes it alike), the gradient difference, g_j and the displacement.
    numel, sums = 3, 1 + 2 + 2   # parameters; consensus total, per layer (2), loss, Eq. 4's Hessian part
    if probe == "same, split among learners":
        assert probe_passes == [1, 1, 0] and world.averaged[-1] == 4 * numel + sums   # g averaged
    elif probe == "same, one batch":
        assert probe_passes == [1, 1, 1] and world.averaged[-1] == 3 * numel + sums   # g not averaged
    else:
        assert probe_passes == [1, 1, 1] and world.averaged[-1] == 4 * numel + sums


def test_missing_observe_skips_delta2_with_a_warning(world):
    with pytest.warns(RuntimeWarning, match="observe"):
        diags = world.run(lambda r: learner_steps(r, steps=1, every=1, hessian=False, observe=False))
    assert "delta2" not in diags[0].last and "loss" not in diags[0].last
    assert diags[0].last["alpha_e"] == pytest.approx(closed_forms()["alpha_e"], rel=1e-9)


def test_dropout_and_batchnorm_leave_no_trace(monkeypatch):
    # One learner: w_j = w_a, so Delta^(2) is exactly 0 only if both passes draw the same dropout masks.
    FakeWorld(1).install(monkeypatch)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.BatchNorm1d(16), torch.nn.ReLU(),
                                torch.nn.Dropout(0.5), torch.nn.Linear(16, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    probe = [(torch.randn(8, 4), torch.randint(0, 3, (8,)))]
    diag = NoiseDiagnostics(model, F.cross_entropy, probe, every=1, hessian=True)
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    diag.observe(x, y, loss)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    grads = [p.grad.clone() for p in model.parameters()]
    rng = torch.get_rng_state()
    ctx = StepContext(opt, 0, 0, 1, "dpsgd")
    diag.on_before_mixing(ctx)
    diag.on_step_end(ctx)
    assert diag.last["delta2"] == 0.0 and diag.last["delta2_hessian"] == 0.0
    assert diag.last["consensus_distance"] == 0.0
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())   # weights, BN statistics
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads))
    assert torch.equal(torch.get_rng_state(), rng) and model.training


def test_reuse_grad_gives_the_same_values_with_one_pass_less(world, monkeypatch):
    # The fake world's learners are threads sharing one random generator (real ranks are processes), so
    # the check that the model drew no random numbers is left out here; the tests below cover it.
    monkeypatch.setattr(measure, "_rng_states", lambda device: [])

    def run(rank, reuse):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            diag = learner_steps(rank, steps=2, every=2, hessian=False, reuse_grad=reuse)
        return diag.last, diag.model.calls

    recomputed, reused = world.run(lambda r: run(r, False)), world.run(lambda r: run(r, True))
    for (values, calls), (values_reused, calls_reused) in zip(recomputed, reused):
        assert values_reused == pytest.approx(values, rel=1e-12)
        assert calls_reused == calls - 1


def one_learner_step(model, monkeypatch, clip=False, **kw):
    """Delta^(2) of one learner (w_j = w_a): exactly 0 when the gradient at w_j pairs with the one at w_a."""
    FakeWorld(1).install(monkeypatch)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    diag = NoiseDiagnostics(model, F.cross_entropy, [(torch.randn(8, 4), torch.randint(0, 3, (8,)))], every=1, **kw)
    for step in range(2):
        x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        diag.observe(x, y, loss)
        if clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1e-3)
        ctx = StepContext(opt, step, 0, 1, "dpsgd")
        diag.on_before_mixing(ctx)
        diag.on_step_end(ctx)
        assert diag.last["delta2"] == 0.0
    return diag


def test_reuse_grad_recomputes_when_the_model_draws_random_numbers(monkeypatch):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Dropout(0.5), torch.nn.Linear(16, 3))
    with pytest.warns(RuntimeWarning, match="random numbers") as record:
        one_learner_step(model, monkeypatch, reuse_grad=True)
    assert len(record) == 1


def test_reuse_grad_recomputes_when_grad_changed_after_observe(monkeypatch):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
    with pytest.warns(RuntimeWarning, match="changed after observe"):
        one_learner_step(model, monkeypatch, clip=True, reuse_grad=True)


@pytest.mark.parametrize("every", [0, -5, 2.5, "10", True, None])
def test_invalid_every_is_rejected(every):
    with pytest.raises(ValueError, match="every"):
        NoiseDiagnostics(Quadratic(W[0]), quadratic_loss, PROBE, every=every)


def test_invalid_arguments_are_rejected():
    with pytest.raises(ValueError, match="probe"):
        NoiseDiagnostics(Quadratic(W[0]), quadratic_loss, [])
    with pytest.raises(ValueError, match="probe"):
        NoiseDiagnostics(Quadratic(W[0]), quadratic_loss, [torch.zeros(3)])
    with pytest.raises(TypeError, match="Module"):
        NoiseDiagnostics(lambda x: x, quadratic_loss, PROBE)
    with pytest.raises(TypeError, match="log_dir"):
        NoiseDiagnostics(Quadratic(W[0]), quadratic_loss, PROBE, log_dir=3)


# ---------------------------------------------------------------- real Horovod, one process, SSGD

def test_ssgd_run_under_horovod_writes_the_documented_tags(tmp_path):
    hvd.init()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    probe = [(torch.randn(16, 4), torch.randint(0, 3, (16,))) for _ in range(2)]
    diag = NoiseDiagnostics(model, F.cross_entropy, probe, every=2, log_dir=str(tmp_path))
    opt = horovod_dpsgd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.5),
                                             named_parameters=model.named_parameters(), algorithm="ssgd",
                                             callbacks=[diag])
    params = list(model.parameters())
    expected = {}
    for step in range(4):
        x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        diag.observe(x, y, loss)
        if step % 2 == 1:   # the same quantities, computed here independently
            g_a = torch.cat([p.grad.reshape(-1) for p in params]).double()
            g = sum(torch.cat([t.reshape(-1) for t in torch.autograd.grad(F.cross_entropy(model(px), py), params)])
                    for px, py in probe).double() / len(probe)
            alpha_e = 0.5 * float(g_a @ g) / float(g @ g)
            delta = 0.25 * float(g_a @ g_a) - alpha_e ** 2 * float(g @ g)
            expected[step + 1] = {"noise/alpha_e": alpha_e, "noise/alpha_e_over_alpha": alpha_e / 0.5,
                                  "grad/alpha_e_over_alpha": alpha_e / 0.5, "grad/delta": delta,
                                  "noise/norm_dw": 0.5 * float(g_a.norm()),
                                  "grad/norm_ga": float(g_a.norm()), "grad/norm_g": float(g.norm()),
                                  "diag/loss": loss.item(), "diag/lr": 0.5, "noise/delta2": 0.0,
                                  "consensus/distance": 0.0, "consensus/0": 0.0, "consensus/2": 0.0,
                                  "noise/delta": delta}
        opt.step()
    diag.close()
    assert diag.count == 2 and diag.last["step"] == 4
    events = EventAccumulator(str(tmp_path))
    events.Reload()
    assert set(events.Tags()["scalars"]) == set(expected[2])
    for tag in expected[2]:
        got = {e.step: e.value for e in events.Scalars(tag)}
        assert sorted(got) == [2, 4]
        for step, values in expected.items():
            # The displacement is w(t) - w(t + 1) in float32, alpha g_a up to rounding.
            assert got[step] == pytest.approx(values[tag], rel=1e-4, abs=1e-9), (tag, step)


class Bowl(torch.nn.Module):
    """L(w) = 1/2 |w|^2 over ``size`` weights (gradient w, Hessian I); a batch's inputs are ignored."""

    def __init__(self, size, seed=0):
        super().__init__()
        self.w = torch.nn.Parameter(rand(size, seed=seed))

    def forward(self, x):
        return 0.5 * self.w @ self.w


@pytest.mark.parametrize("order", ["diagnostics first", "noise first"])
def test_ssgd_star_injected_noise_shows_up_in_delta(order):
    """SSGD* (paper Sec. 2.1): Gaussian noise of std sigma added to the weights after each update. Eq. 3 on the
    displacement of w_a sees it whatever the callbacks' order: Delta = |dW_a|^2 - (dW_a . g)^2 / |g|^2, whose
    noise part is sigma^2 (N - 1) on average (N weights, one direction removed by the projection on g)."""
    hvd.init()
    size, sigma, lr = 20_000, 0.01, 0.1
    model = Bowl(size)
    probe = [(torch.zeros(1), None)]
    diag = NoiseDiagnostics(model, quadratic_loss, probe, every=1)
    noise = horovod_dpsgd.GaussianNoise(sigma, seed=3)
    callbacks = [diag, noise] if order == "diagnostics first" else [noise, diag]
    opt = horovod_dpsgd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=lr), algorithm="ssgd",
                                             named_parameters=model.named_parameters(), callbacks=callbacks)
    before = model.w.detach().clone()
    opt.zero_grad()
    loss = model(None)
    loss.backward()
    diag.observe(None, None, loss)
    opt.step()
    dw = (before - model.w.detach()).double()          # the step's real displacement, noise included
    g = before.double()                                  # grad L(w_a) = w_a
    expected = float(dw @ dw) - float(dw @ g) ** 2 / float(g @ g)
    assert diag.last["delta"] == pytest.approx(expected, rel=1e-6)
    assert diag.last["delta"] == pytest.approx(sigma ** 2 * (size - 1), rel=0.05)
    assert diag.last["grad_delta"] < 1e-9 * diag.last["delta"]   # the gradient term alone is noiseless here
    assert diag.last["alpha_e_over_alpha"] == pytest.approx(1.0, abs=0.05)


def test_ssgd_without_injected_noise_has_no_delta_on_a_deterministic_gradient():
    hvd.init()
    model = Bowl(1000)
    diag = NoiseDiagnostics(model, quadratic_loss, [(torch.zeros(1), None)], every=1)
    opt = horovod_dpsgd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), algorithm="ssgd",
                                             named_parameters=model.named_parameters(), callbacks=[diag])
    model(None).backward()
    opt.step()
    assert diag.last["delta"] < 1e-10 * diag.last["norm_dw"] ** 2
    assert diag.last["alpha_e_over_alpha"] == pytest.approx(1.0, rel=1e-5)
