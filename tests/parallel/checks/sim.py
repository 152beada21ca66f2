"""The simulator (horovod_dpsgd.sim) against the real MPI run, case by case.

Each ``@check`` is one case: every rank trains with ``horovod_dpsgd.DistributedOptimizer``; rank 0 then trains
the same N learners with ``horovod_dpsgd.sim.DistributedOptimizer`` (same initial weights, seeds, per-learner
batches, topology and callbacks) and returns how far learner j's weights are from rank j's, what the callbacks
saw, and the noise diagnostics. tests/parallel/test_sim.py asserts on the results. Run by
tests/parallel/checks/run.py: ``horovodrun -np N python tests/parallel/checks/run.py OUT.json sim [CHECK ...]``.
"""

import torch
import torch.nn.functional as F
import horovod.torch as hvd

import horovod_dpsgd as hd
from horovod_dpsgd import sim
from common import all_weights, batch, check, make_model
from workload import Recorder

hvd.init()
RANK, SIZE = hvd.rank(), hvd.size()
STEPS = 8


def optimizer(params, momentum):
    return torch.optim.SGD(params, lr=0.1, momentum=momentum, weight_decay=1e-4 if momentum else 0.0)


class SumRecorder(Recorder):
    """What a callback sees at each hook: step, rank, size, algorithm, lr, and the parameters' and gradients'
    sums (float64) on this learner (JSON-serialisable, to compare across processes)."""

    def _snap(self, hook, ctx):
        params = list(ctx.parameters())
        self.seen.append([hook, ctx.step, ctx.rank, ctx.size, ctx.algorithm, ctx.lr,
                          [float(p.detach().double().sum()) for p in params],
                          [float(p.grad.double().sum()) for p in params]])


#: The noise diagnostics' probe: a fixed sample, the same on every learner.
PROBE = [batch(100, 0, size=32), batch(101, 0, size=32)]
DIAG_EVERY = 2


def mpi_run(case, algorithm, topology, momentum, noise, diagnostics):
    model = make_model()
    recorder = SumRecorder()
    callbacks = [recorder] + ([hd.GaussianNoise(noise, seed=5)] if noise else [])
    diag = hd.NoiseDiagnostics(model, F.cross_entropy, PROBE, every=DIAG_EVERY) if diagnostics else None
    opt = hd.DistributedOptimizer(optimizer(model.parameters(), momentum),
                                  named_parameters=[(f"{case}.{n}", p) for n, p in model.named_parameters()],
                                  algorithm=algorithm, topology=topology, seed=3,
                                  callbacks=callbacks + ([diag] if diag else []))
    measured = []
    for t in range(STEPS):
        opt.zero_grad()
        x, y = batch(RANK, t)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        if diag:
            diag.observe(x, y, loss)
        opt.step()
        if diag and diag.last.get("step") == t + 1:
            measured.append(dict(diag.last))
    seen = hvd.allgather_object(recorder.seen, name=f"{case}.seen")
    return all_weights(model), [s for rank_seen in seen for s in rank_seen], measured


def sim_run(algorithm, topology, momentum, noise, diagnostics):
    learners = sim.Learners(make_model(), SIZE)
    recorder = SumRecorder()
    callbacks = [recorder] + ([hd.GaussianNoise(noise, seed=5)] if noise else [])
    diag = sim.NoiseDiagnostics(learners, F.cross_entropy, PROBE, every=DIAG_EVERY) if diagnostics else None
    opt = sim.DistributedOptimizer(optimizer(learners.parameters(), momentum), learners, algorithm=algorithm,
                                   topology=topology, seed=3, callbacks=callbacks + ([diag] if diag else []))
    measured = []
    for t in range(STEPS):
        opt.zero_grad()
        x, y = (torch.stack(v) for v in zip(*(batch(j, t) for j in range(SIZE))))
        losses = learners.losses(F.cross_entropy, learners(x), y)
        losses.sum().backward()
        if diag:
            diag.observe(x, y, losses)
        opt.step()
        if diag and diag.last.get("step") == t + 1:
            measured.append(dict(diag.last))
    weights = torch.stack([torch.cat([p.detach().reshape(-1) for p in learners.learner(j).parameters()])
                           for j in range(SIZE)])
    return weights, recorder.seen, measured


def compare_measured(mpi, simulated):
    """Largest relative difference of the diagnostics' values, step by step; keys and steps must be the same."""
    if [sorted(m) for m in mpi] != [sorted(m) for m in simulated] or len(mpi) != STEPS // DIAG_EVERY:
        return {"same_keys": False, "mpi": [sorted(m) for m in mpi], "sim": [sorted(m) for m in simulated]}
    worst, where = 0.0, None
    for a, b in zip(mpi, simulated):
        for key in a:
            diff = abs(a[key] - b[key]) / max(abs(a[key]), 1e-12)
            if diff > worst:
                worst, where = diff, [a["step"], key, a[key], b[key]]
    return {"same_keys": True, "steps": [m["step"] for m in mpi], "keys": sorted(mpi[0]), "max_rel_diff": worst,
            "worst": where}


def compare_seen(mpi, simulated):
    """Largest relative difference of the recorded sums; the records must otherwise be identical."""
    key = lambda s: (s[1], s[2], s[0])  # noqa: E731  (step, rank, hook): the simulator runs learners in turn
    mpi, simulated = sorted(mpi, key=key), sorted(simulated, key=key)
    if [s[:6] for s in mpi] != [s[:6] for s in simulated]:
        return {"same_records": False, "mpi": [s[:6] for s in mpi[:8]], "sim": [s[:6] for s in simulated[:8]]}
    worst = 0.0
    for a, b in zip(mpi, simulated):
        for x, y in zip(a[6] + a[7], b[6] + b[7]):
            worst = max(worst, abs(x - y) / max(1.0, abs(x)))
    return {"same_records": True, "records": len(mpi), "max_rel_diff": worst}


def case(name, algorithm="dpsgd", topology="ring", momentum=0.0, noise=0.0, diagnostics=False):
    """Register the check ``name``: the same training over MPI and in the simulator; rank 0 compares."""
    @check(name)
    def run():
        mpi_weights, mpi_seen, mpi_measured = mpi_run(name, algorithm, topology, momentum, noise, diagnostics)
        if RANK != 0:
            return None
        sim_weights, sim_seen, sim_measured = sim_run(algorithm, topology, momentum, noise, diagnostics)
        return {"rel_diff": float((sim_weights - mpi_weights).abs().max() / mpi_weights.abs().max()),
                "learner_spread": float((mpi_weights - mpi_weights[0]).abs().max()),
                "callbacks": compare_seen(mpi_seen, sim_seen),
                "diagnostics": compare_measured(mpi_measured, sim_measured) if diagnostics else None}


for topology in ("ring", "random_peer", "exponential", "full"):
    for momentum, label in ((0.0, "sgd"), (0.9, "momentum")):
        case(f"dpsgd_{topology}_{label}", topology=topology, momentum=momentum)
case("dpsgd_ring_noise", noise=0.01)
for momentum, label in ((0.0, "sgd"), (0.9, "momentum")):
    case(f"ssgd_{label}", algorithm="ssgd", momentum=momentum)
case("ssgd_noise", algorithm="ssgd", noise=0.01)
case("diagnostics_dpsgd_ring_momentum_noise", momentum=0.9, noise=0.003, diagnostics=True)
case("diagnostics_dpsgd_full", topology="full", diagnostics=True)
case("diagnostics_dpsgd_random_peer", topology="random_peer", diagnostics=True)
case("diagnostics_ssgd_noise", algorithm="ssgd", noise=0.01, diagnostics=True)
