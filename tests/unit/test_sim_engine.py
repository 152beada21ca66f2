"""The simulator (horovod_dpsgd.sim) in one process: stacked learners, the shared algorithms, callbacks, diagnostics.

Agreement with real MPI runs is tests/parallel/test_sim.py, the mixing products tests/unit/test_sim_mixing.py; here
the reference is tests/support/reference.py (Eq. 2 with one model and one optimizer per learner) and closed forms.
"""

import copy

import pytest
import torch
import torch.nn.functional as F

import horovod_dpsgd as hd
from horovod_dpsgd import sim
from reference import dpsgd_reference
from workload import Recorder, batch, make_model


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def batches(n, t, k=0, device="cpu"):
    x, y = (torch.stack(v) for v in zip(*(batch(j, t, k) for j in range(n))))
    return x.to(device), y.to(device)


def loss_fn(model, j, t, k=0):
    x, y = batch(j, t, k)
    return F.cross_entropy(model(x), y)


def flat(params):
    return torch.cat([p.detach().reshape(-1) for p in params])


def rows(learners):
    """Learner j's flat weights in row j (its parameters are views of the stacked ones, not always contiguous)."""
    return torch.stack([flat(learners.learner(j).parameters()) for j in range(learners.n)])


def train(learners, opt, steps, passes=1):
    for t in range(steps):
        opt.zero_grad()
        for k in range(passes):
            x, y = batches(learners.n, t, k, next(learners.parameters()).device)
            learners.losses(F.cross_entropy, learners(x), y).sum().backward()
        opt.step()
    return rows(learners).cpu()


def reference(make_optimizer, topology, n, steps, passes=1):
    models = [make_model() for _ in range(n)]
    return torch.stack(dpsgd_reference(models, [make_optimizer(m.parameters()) for m in models], topology, loss_fn,
                                       steps, passes))


def sgd(momentum=0.9):
    return lambda params: torch.optim.SGD(params, lr=0.1, momentum=momentum, weight_decay=1e-4 if momentum else 0.0)


# -- the stacked model -------------------------------------------------------------------------------------------

def test_each_learner_runs_its_own_weights_on_its_own_batch():
    models = [make_model(seed=j) for j in range(3)]
    learners = sim.Learners(make_model(), 3, init=models)
    x, y = batches(3, 0)
    out = learners(x)
    for j, m in enumerate(models):
        torch.testing.assert_close(out[j], m(x[j]), rtol=1e-6, atol=1e-6)
    learners.losses(F.cross_entropy, out, y).sum().backward()
    for j, m in enumerate(models):
        F.cross_entropy(m(x[j]), y[j]).backward()
        for stacked, own in zip(learners.parameters(), m.parameters()):
            torch.testing.assert_close(stacked.grad[j], own.grad, rtol=1e-6, atol=1e-7)


def test_learner_views_share_the_stacked_storage_and_the_average_is_the_mean():
    learners = sim.Learners(make_model(), 4, init=[make_model(seed=j) for j in range(4)])
    first = next(learners.learner(2).parameters())
    with torch.no_grad():
        first.add_(1.0)
    torch.testing.assert_close(next(learners.parameters())[2], first)
    average = learners.average()
    assert type(average) is type(make_model())
    torch.testing.assert_close(flat(average.parameters()), rows(learners).mean(0))
    assert [n for n, _ in learners.stacked_parameters()] == [n for n, _ in make_model().named_parameters()]


def test_parameters_are_laid_out_as_their_gradients_come_without_a_trace():
    learners = sim.Learners(torch.nn.Sequential(torch.nn.Linear(8, 6), torch.nn.Dropout(0.5)), 4)
    weight = learners.module[0].weight
    before = weight.detach().clone()
    x = torch.randn(4, 5, 8)
    torch.manual_seed(1)
    out = learners(x)  # the first call lays the parameters out (a forward/backward pass with the RNG forked)
    torch.manual_seed(1)
    assert torch.equal(learners(x), out)
    assert weight.grad is None and torch.equal(weight.detach(), before) and not weight.is_contiguous()
    incoming = []
    weight.register_hook(lambda g: incoming.append(g.data_ptr()))
    learners(x).sum().backward()
    assert weight.grad.stride() == weight.stride() and weight.grad.data_ptr() == incoming[0]  # not copied


class BatchNormNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc, self.bn, self.out = torch.nn.Linear(8, 6), torch.nn.BatchNorm1d(6), torch.nn.Linear(6, 3)

    def forward(self, x):
        return self.out(torch.relu(self.bn(self.fc(x))))


def test_buffers_are_per_learner_and_updated_like_each_learners_own():
    learners = sim.Learners(BatchNormNet(), 3)
    models = [BatchNormNet() for _ in range(3)]
    x, _ = batches(3, 0)
    learners(x)
    for j, m in enumerate(models):
        m(x[j])
        torch.testing.assert_close(learners.module.bn.running_mean[j], m.bn.running_mean)
        torch.testing.assert_close(learners.learner(j).bn.running_var, m.bn.running_var)
    assert learners.module.bn.num_batches_tracked.tolist() == [1, 1, 1]


def test_inputs_without_the_learner_dimension_get_a_clear_error():
    learners = sim.Learners(make_model(), 3)
    with pytest.raises(ValueError, match=r"learner dimension first: expected shape \(3, ...\)"):
        learners(torch.zeros(16, 8))
    with pytest.raises(ValueError, match="positive integer"):
        sim.Learners(make_model(), 0)
    with pytest.raises(ValueError, match="same structure"):
        sim.Learners(make_model(), 2, init=[make_model(), make_model(hidden=5)])


# -- the shared algorithms over stacked learners ------------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("topology", ["ring", "ring:2", "random_peer", "exponential", "random_graph", "full"])
@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_dpsgd_equals_the_single_process_reference(topology, momentum, device):
    n = 5
    learners = sim.Learners(make_model(), n).to(device)
    opt = sim.DistributedOptimizer(sgd(momentum)(learners.parameters()), learners, topology=topology, seed=3)
    assert isinstance(opt, torch.optim.SGD) and type(opt).__name__ == "SGD"
    got = train(learners, opt, 6)
    want = reference(sgd(momentum), opt.topology, n, 6)
    assert float((got - want).abs().max()) <= 1e-6
    assert float((got - got[0]).abs().max()) > 1e-4


def test_gradient_accumulation_over_backward_passes():
    learners = sim.Learners(make_model(), 3)
    opt = sim.DistributedOptimizer(sgd()(learners.parameters()), learners, topology="ring",
                                   backward_passes_per_step=2)
    got = train(learners, opt, 4, passes=2)
    torch.testing.assert_close(got, reference(sgd(), opt.topology, 3, 4, passes=2), rtol=0, atol=1e-6)
    x, y = batches(3, 0)
    with pytest.raises(AssertionError, match="more than backward_passes_per_step"):
        for _ in range(3):
            learners.losses(F.cross_entropy, learners(x), y).sum().backward()


@pytest.mark.parametrize("name", ["Adam", "AdamW", "RMSprop", "Adagrad"])
def test_elementwise_optimizers_update_each_learner_as_its_own(name):
    make = lambda params: getattr(torch.optim, name)(params, lr=0.01, weight_decay=1e-3)  # noqa: E731
    learners = sim.Learners(make_model(), 4)
    opt = sim.DistributedOptimizer(make(learners.parameters()), learners, topology="random_peer", seed=1)
    got = train(learners, opt, 5)
    torch.testing.assert_close(got, reference(make, opt.topology, 4, 5), rtol=0, atol=1e-6)


class MySGD(torch.optim.SGD):
    pass


@pytest.mark.parametrize("make", [lambda ps: torch.optim.LBFGS(ps), lambda ps: MySGD(ps, lr=0.1)],
                         ids=["LBFGS", "subclass"])
def test_an_optimizer_not_known_to_be_elementwise_is_refused_unless_promised(make):
    learners = sim.Learners(make_model(), 2)
    with pytest.raises(TypeError, match="elementwise=True"):
        sim.DistributedOptimizer(make(learners.parameters()), learners)
    learners = sim.Learners(make_model(), 2)
    sim.DistributedOptimizer(make(learners.parameters()), learners, elementwise=True)


def test_an_optimizer_on_the_models_own_parameters_is_refused():
    model = make_model()
    with pytest.raises(ValueError, match="learners.parameters()"):
        sim.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), sim.Learners(model, 2))


def test_ssgd_trains_identical_replicas_as_one_model_on_all_learners_batches():
    n = 4
    learners = sim.Learners(make_model(), n)
    opt = sim.DistributedOptimizer(sgd()(learners.parameters()), learners, algorithm="ssgd")
    got = train(learners, opt, 5)
    assert torch.equal(got, got[[0] * n])
    model = make_model()
    single = sgd()(model.parameters())
    for t in range(5):  # n learners with equal batches: g_a is the gradient of the mean loss over all n batches
        single.zero_grad()
        x, y = batches(n, t)
        F.cross_entropy(model(x.flatten(0, 1)), y.flatten()).backward()
        single.step()
    torch.testing.assert_close(got[0], torch.nn.utils.parameters_to_vector(model.parameters()).detach(),
                               rtol=0, atol=1e-6)


# -- callbacks see learner j as MPI rank j ------------------------------------------------------------------------

def test_callbacks_see_each_learners_own_then_mixed_then_updated_weights():
    n, lr, recorder = 4, 0.1, Recorder()
    learners = sim.Learners(make_model(), n, init=[make_model(seed=j) for j in range(n)])
    opt = sim.DistributedOptimizer(torch.optim.SGD(learners.parameters(), lr=lr), learners, topology="ring",
                                   callbacks=[recorder])
    w = torch.from_numpy(opt.topology.mixing_matrix(0)).float()
    for t in range(2):
        opt.zero_grad()
        x, y = batches(n, t)
        learners.losses(F.cross_entropy, learners(x), y).sum().backward()
        before = rows(learners)
        recorder.seen.clear()
        opt.step()
        by_hook = {}
        for hook, step, rank, size, flat, grad in recorder.seen:
            assert (step, size) == (t, n)
            by_hook.setdefault(hook, []).append((rank, flat, grad))
        assert list(by_hook) == ["before_mixing", "after_mixing", "after_update", "step_end"]
        for j in range(n):
            (_, own, g), (_, mixed, _), (_, updated, _), (_, ended, _) = (by_hook[h][j] for h in by_hook)
            assert by_hook["before_mixing"][j][0] == j
            torch.testing.assert_close(own, before[j])
            torch.testing.assert_close(mixed, w[j] @ before, rtol=1e-6, atol=1e-6)
            torch.testing.assert_close(updated, mixed - lr * g)
            torch.testing.assert_close(ended, updated)  # no callback changes the weights after the update


@pytest.mark.parametrize("algorithm", ["dpsgd", "ssgd"])
def test_gaussian_noise_of_learner_j_is_the_noise_of_rank_j(algorithm):
    n, sigma = 3, 0.01
    runs = []
    for noise in (0.0, sigma):
        learners = sim.Learners(make_model(), n)
        opt = sim.DistributedOptimizer(torch.optim.SGD(learners.parameters(), lr=0.1), learners, topology="ring",
                                       algorithm=algorithm, callbacks=[hd.GaussianNoise(noise, seed=7)])
        runs.append(train(learners, opt, 1))
    for j in range(n):
        key = (7, 0) if algorithm == "ssgd" else (7, 0, j)
        generator = torch.Generator().manual_seed(hash(key) & 0x7FFF_FFFF_FFFF_FFFF)
        want = torch.cat([torch.randn(p.shape, generator=generator).reshape(-1) for p in make_model().parameters()])
        torch.testing.assert_close(runs[1][j] - runs[0][j], sigma * want, rtol=0, atol=1e-6)


# -- the non-finite policy, per learner ---------------------------------------------------------------------------

def nan_run(nonfinite, bad=1, at=1, steps=3):
    n = 3
    learners = sim.Learners(make_model(), n)
    opt = sim.DistributedOptimizer(sgd()(learners.parameters()), learners, topology="ring", nonfinite=nonfinite)
    for t in range(steps):
        opt.zero_grad()
        x, y = batches(n, t)
        losses = learners.losses(F.cross_entropy, learners(x), y)
        if t == at:
            losses = losses * torch.tensor([float("nan") if j == bad else 1.0 for j in range(n)])
        losses.sum().backward()
        if t == at:
            opt.synchronize()  # mixed weights and momentum before the skipped update
            mixed, momentum = rows(learners), [opt.state[p]["momentum_buffer"].clone() for p in learners.parameters()]
            with opt.skip_synchronize():
                opt.step()
            after = rows(learners)
            momentum_after = [opt.state[p]["momentum_buffer"].clone() for p in learners.parameters()]
        else:
            opt.step()
    return opt, mixed, after, momentum, momentum_after


def test_skip_skips_only_the_update_of_the_learner_with_a_nonfinite_gradient():
    opt, mixed, after, momentum, momentum_after = nan_run("skip")
    assert opt.skipped_by_learner == [0, 1, 0] and opt.skipped_steps == 1
    assert torch.equal(after[1], mixed[1])
    assert not torch.equal(after[0], mixed[0]) and not torch.equal(after[2], mixed[2])
    for before, now in zip(momentum, momentum_after):
        assert torch.equal(before[1], now[1]) and not torch.equal(before[0], now[0])
    assert bool(after.isfinite().all())


def test_raise_names_the_learner_and_the_step():
    with pytest.raises(hd.NonFiniteError, match="learner 2: the gradient of .* at step 1"):
        nan_run("raise", bad=2)


def poisoned_mix(nonfinite, topology, bad=(2,), n=4):
    """Learners ``bad`` hold NaN weights when the optimizer mixes (``synchronize``); returns the rows before and
    after the mix, and the optimizer."""
    learners = sim.Learners(make_model(), n, init=[make_model(seed=j) for j in range(n)])
    opt = sim.DistributedOptimizer(sgd(0.0)(learners.parameters()), learners, topology=topology,
                                   nonfinite=nonfinite)
    with torch.no_grad():
        for p in learners.parameters():
            for j in bad:
                p[j] = float("nan")
    before = rows(learners)
    opt.synchronize()
    return before, rows(learners), opt


def test_skip_leaves_nonfinite_weights_out_of_the_mix_and_renormalises_as_over_mpi():
    with pytest.warns(RuntimeWarning, match=r"learner 2: its NaN or infinite weights were left out of the mix at "
                                            r"step 0"):
        before, after, opt = poisoned_mix("skip", "ring")
    # ring of 4, W_jk = 1/3: learner 0 (neighbours 3, 1) is untouched; 1 and 3 average themselves with their other
    # neighbour; 2 takes the average of its finite neighbours 1 and 3 and rejoins
    torch.testing.assert_close(after[0], (before[3] + before[0] + before[1]) / 3)
    torch.testing.assert_close(after[1], (before[0] + before[1]) / 2)
    torch.testing.assert_close(after[3], (before[3] + before[0]) / 2)
    torch.testing.assert_close(after[2], (before[1] + before[3]) / 2)
    assert opt.rejected_weights == {2: 3}  # left out by learners 1, 3 and itself: MPI ranks 1, 2, 3 count one each
    assert opt._averager.screen.rejected_by_learner == [{}, {2: 1}, {2: 1}, {2: 1}]


def test_skip_with_full_averaging_gives_every_learner_the_mean_of_the_finite_ones():
    with pytest.warns(RuntimeWarning, match="learner 1: its NaN"):
        before, after, _ = poisoned_mix("skip", "full", bad=(1, 3))
    for j in range(4):
        torch.testing.assert_close(after[j], (before[0] + before[2]) / 2)


def test_raise_names_the_learners_that_would_mix_in_nonfinite_weights():
    with pytest.raises(hd.NonFiniteError, match=r"learners 1, 3: at step 0 the weights of learner 2 are NaN"):
        poisoned_mix("raise", "ring")


def test_ignore_mixes_without_a_check():
    _, after, opt = poisoned_mix("ignore", "ring")
    assert opt._averager.screen is None
    assert not bool(after[1].isfinite().any())  # no check: NaN spreads (docs/simulator.md: at once with a product)


def test_state_dict_round_trip_continues_exactly():
    n = 3
    learners = sim.Learners(make_model(), n)
    opt = sim.DistributedOptimizer(sgd()(learners.parameters()), learners, topology="random_peer", seed=2)
    train(learners, opt, 3)
    state, weights = copy.deepcopy(opt.state_dict()), copy.deepcopy(learners.state_dict())  # as torch.save/load
    assert state["horovod_dpsgd"]["step"] == 3
    learners2 = sim.Learners(make_model(seed=9), n)
    learners2.load_state_dict(weights)
    opt2 = sim.DistributedOptimizer(sgd()(learners2.parameters()), learners2, topology="random_peer", seed=2)
    opt2.load_state_dict(state)
    for ls, o in ((learners, opt), (learners2, opt2)):
        o.zero_grad()
        x, y = batches(n, 3)
        ls.losses(F.cross_entropy, ls(x), y).sum().backward()
        o.step()
    assert torch.equal(rows(learners), rows(learners2))


# -- the noise diagnostics: the plugin's own, once per learner ------------------------------------------------------

def test_noise_diagnostics_measure_eq3_on_the_displacement_of_the_mean():
    """As the diagnostics check of tests/parallel/checks/optimizer.py: Eq. 3 from every learner's weights before
    and after the step (momentum and Gaussian weight noise included) and the probe gradient at w_a(t)."""
    n, lr, every = 4, 0.2, 2
    learners = sim.Learners(make_model(), n, init=[make_model(seed=j) for j in range(n)])
    probe = [batch(100, 0, size=32), batch(101, 0, size=32)]
    diag = sim.NoiseDiagnostics(learners, F.cross_entropy, probe, every=every)
    opt = sim.DistributedOptimizer(torch.optim.SGD(learners.parameters(), lr=lr, momentum=0.9), learners,
                                   topology="ring", callbacks=[diag, hd.GaussianNoise(0.003, seed=2)])
    for t in range(2 * every):
        opt.zero_grad()
        x, y = batches(n, t)
        losses = learners.losses(F.cross_entropy, learners(x), y)
        losses.sum().backward()
        diag.observe(x, y, losses)
        before = rows(learners)
        opt.step()
        after = rows(learners)
        if (t + 1) % every:
            assert diag.last == {} or diag.last["step"] == t
            continue
        w_a = before.mean(0)
        at_mean = make_model()
        torch.nn.utils.vector_to_parameters(w_a, at_mean.parameters())
        g = sum(torch.nn.utils.parameters_to_vector(torch.autograd.grad(
            F.cross_entropy(at_mean(px), py), list(at_mean.parameters()))) for px, py in probe) / 2
        d, g = (w_a - after.mean(0)).double(), g.double()
        alpha_e = float(d @ g) / float(g @ g)
        assert diag.last["step"] == t + 1 and diag.count == (t + 1) // every
        assert diag.last["alpha_e_over_alpha"] == pytest.approx(alpha_e / lr, rel=1e-4)
        assert diag.last["delta"] == pytest.approx(float(d @ d) - alpha_e ** 2 * float(g @ g), rel=1e-3)
        assert diag.last["consensus_distance"] == pytest.approx(float(((before - w_a) ** 2).sum(1).mean()), rel=1e-5)
        assert diag.last["loss"] == pytest.approx(float(losses.detach().mean()), rel=1e-6)
        assert diag.last["delta2"] > 0


def test_a_learner_failing_in_the_diagnostics_fails_the_step_without_a_hang():
    learners = sim.Learners(make_model(), 3)
    diag = sim.NoiseDiagnostics(learners, F.cross_entropy, [batch(0, 0)], every=1)

    def broken(out, y):
        raise RuntimeError("learner 1 broke")

    diag.per_learner[1].loss_fn = broken
    opt = sim.DistributedOptimizer(torch.optim.SGD(learners.parameters(), lr=0.1), learners, callbacks=[diag])
    x, y = batches(3, 0)
    learners.losses(F.cross_entropy, learners(x), y).sum().backward()
    with pytest.raises(RuntimeError, match="learner 1 broke"):
        opt.step()
