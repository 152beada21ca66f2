"""Invariants of horovod_dpsgd.DistributedOptimizer over real MPI processes.

Each ``@check`` is one named check; tests/parallel/test_optimizer.py asserts on its result.
Run by tests/parallel/checks/run.py: ``horovodrun -np N python tests/parallel/checks/run.py OUT.json optimizer
[CHECK ...]`` (the OUT.json path is ``sys.argv[1]``; checks that write files put them beside it).
"""

import copy
import gc
import json
import os
import sys
import threading
import time
import warnings

import numpy as np
import torch
import horovod.torch as hvd

import horovod_dpsgd as hd
from common import all_weights, batch, check, dpsgd_vs_reference, loss_fn, make_model
from workload import Recorder

hvd.init()
RANK, SIZE = hvd.rank(), hvd.size()


def sgd(model, **kw):
    kw = {"lr": 0.1, "momentum": 0.9, "weight_decay": 1e-4, **kw}
    return torch.optim.SGD(model.parameters(), **kw)


class EmbeddingBag(torch.nn.Module):
    """A model with a sparse-gradient embedding (sparse=True) and a dense head."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb = torch.nn.Embedding(50, 8, sparse=True)
        self.head = torch.nn.Linear(8, 3)

    def forward(self, x):
        idx = (x.abs() * 10).long().clamp(max=49)
        return self.head(self.emb(idx).mean(1))


for topo in ("ring", "random_peer", "exponential", "random_graph"):
    check(f"reference_{topo}")(lambda topo=topo: dpsgd_vs_reference(topo))
check("reference_ring_passes2")(lambda: dpsgd_vs_reference("ring", passes=2))
check("reference_sparse_gradients")(lambda: dpsgd_vs_reference("ring", make=EmbeddingBag, momentum=0.0))
check("reference_ring_no_comm_thread")(lambda: dpsgd_vs_reference("ring", overlap=False))
check("reference_random_peer_fp16_wire")(lambda: dpsgd_vs_reference("random_peer", compression=hvd.Compression.fp16))
check("reference_user_matrix")(lambda: dpsgd_vs_reference(hd.topology.ring(SIZE).mixing_matrix()))

@check("full_averaging")
def _():
    model = make_model(seed=RANK)  # different weights per learner
    lr = 0.05
    opt = hd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=lr), topology="full")
    worst = 0.0
    for t in range(4):
        opt.zero_grad()
        loss_fn(model, RANK, t).backward()
        before = all_weights(model)
        grad = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
        opt.step()
        after = torch.nn.utils.parameters_to_vector(model.parameters()).detach()
        worst = max(worst, float((after - (before.mean(0) - lr * grad)).abs().max()))
    return {"max_abs_diff": worst}


@check("random_peer_matching_consistent")
def _():
    topo = hd.topology.RandomPeer(SIZE, seed=11)
    mine = np.array([topo.partners(t) for t in range(50)])
    everyone = hvd.allgather(torch.from_numpy(mine).unsqueeze(0), name="partners").numpy()
    return {"consistent": bool((everyone == everyone[0]).all())}


@check("ssgd_equals_horovod")
def _():
    out = []
    for make in (hvd.DistributedOptimizer,
                 lambda o, named_parameters: hd.DistributedOptimizer(o, named_parameters, algorithm="ssgd")):
        model = make_model()
        opt = make(sgd(model), named_parameters=[(f"ssgd.{n}", p) for n, p in model.named_parameters()])
        for t in range(5):
            opt.zero_grad()
            loss_fn(model, RANK, t).backward()
            opt.step()
        out.append(all_weights(model))
    return {"max_abs_diff": float((out[0] - out[1]).abs().max()),
            "replica_spread": float((out[1] - out[1][0]).abs().max())}


def horovod_user_script(make_optimizer, steps=8):
    """A training loop written for hvd.DistributedOptimizer: only the constructor differs."""
    model = make_model(seed=RANK + 5)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.2 * SIZE, momentum=0.9)
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    optimizer = make_optimizer(optimizer, named_parameters=model.named_parameters(), backward_passes_per_step=2)
    hvd.broadcast_optimizer_state(optimizer, root_rank=0)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=3, gamma=0.5)
    losses = []
    for t in range(steps):
        optimizer.zero_grad()
        for k in range(2):
            loss = loss_fn(model, RANK, t % 2, k)
            loss.backward()
        optimizer.synchronize()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        with optimizer.skip_synchronize():
            optimizer.step()
        scheduler.step()
        losses.append(hvd.allreduce(loss.detach(), name=f"loss.{t}").item())
    # state_dict round trip: a restored optimizer continues exactly like the original
    state = copy.deepcopy(optimizer.state_dict())  # as torch.save/torch.load would
    model2 = make_model()
    model2.load_state_dict(model.state_dict())
    optimizer2 = make_optimizer(torch.optim.SGD(model2.parameters(), lr=0.1, momentum=0.9),
                                named_parameters=[(f"copy.{n}", p) for n, p in model2.named_parameters()],
                                backward_passes_per_step=2)
    optimizer2.load_state_dict(state)
    for m, o in ((model, optimizer), (model2, optimizer2)):
        o.zero_grad()
        for k in range(2):
            loss_fn(m, RANK, steps, k).backward()
        o.step()
    diff = (all_weights(model) - all_weights(model2)).abs().max()
    return {"first_loss": losses[0], "last_loss": losses[-1], "lr": optimizer.param_groups[0]["lr"],
            "roundtrip_diff": float(diff), "class": type(optimizer).__name__,
            "is_sgd": isinstance(optimizer, torch.optim.SGD)}


check("dropin_horovod")(lambda: horovod_user_script(hvd.DistributedOptimizer))
check("dropin_dpsgd")(lambda: horovod_user_script(hd.DistributedOptimizer))


def train_steps(model, opt, first, last):
    for t in range(first, last):
        opt.zero_grad()
        loss = loss_fn(model, RANK, t) + 1e-3 * torch.randn(()).abs()  # consumes the torch RNG too
        loss.backward()
        opt.step()


@check("checkpoint_resume_bit_exact")
def _():
    directory = os.path.join(os.path.dirname(os.path.abspath(sys.argv[1])), "ckpt")
    torch.manual_seed(RANK)
    model = make_model()
    opt = hd.DistributedOptimizer(sgd(model), topology="random_peer", seed=7)
    train_steps(model, opt, 0, 3)
    hd.checkpoint.save(directory, model, opt, extra={"epoch": 3})
    train_steps(model, opt, 3, 6)
    uninterrupted = all_weights(model)
    model2 = make_model(seed=99)  # a fresh process would start from other weights and RNG state
    torch.manual_seed(1234)
    opt2 = hd.DistributedOptimizer(sgd(model2), topology="random_peer", seed=7)
    extra = hd.checkpoint.load(directory, model2, opt2)
    train_steps(model2, opt2, opt2.step_count, 6)
    return {"diff": float((all_weights(model2) - uninterrupted).abs().max()), "extra": extra,
            "files": sorted(os.listdir(directory))}


def nan_at(rank_set, step, nonfinite, steps=5):
    model = make_model()
    opt = hd.DistributedOptimizer(sgd(model), topology="ring", nonfinite=nonfinite)
    for t in range(steps):
        opt.zero_grad()
        loss = loss_fn(model, RANK, t)
        if t == step and RANK in rank_set:
            loss = loss * float("nan")
        loss.backward()
        opt.step()
    return model, opt


@check("nonfinite_skip")
def _():
    model, opt = nan_at({0}, 2, "skip")
    skipped = hvd.allgather(torch.tensor([opt.skipped_steps]), name="skipped").tolist()
    return {"skipped": skipped, "finite": bool(all_weights(model).isfinite().all())}


def nan_weights_skip(topology, victim=1, at=2, steps=8, lr=0.1):
    """Learner ``victim``'s weights turn NaN before step ``at`` (nonfinite="skip"). Every rank reports whether it
    ends finite, what it left out of its mixes, its warnings, and how far its weights after step ``at`` are from
    the rule: w_j(at+1) = sum_{k finite} W_jk w_k(at) / sum_{k finite} W_jk - lr g_j (no update on the victim,
    whose gradient is NaN)."""
    model = make_model()
    opt = hd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=lr), topology=topology, seed=3,
                                  nonfinite="skip")
    diff = None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for t in range(steps):
            if t == at and RANK == victim:
                with torch.no_grad():
                    next(model.parameters()).view(-1)[0] = float("nan")
            opt.zero_grad()
            loss_fn(model, RANK, t).backward()
            if t == at:
                before, w = all_weights(model), torch.as_tensor(opt.topology.mixing_matrix(t), dtype=torch.float32)
            opt.step()
            if t == at:
                after = all_weights(model)
                row = w[RANK].clone()
                row[victim] = 0.0
                if row.sum() > 0:
                    want = (row / row.sum()) @ torch.nan_to_num(before, nan=0.0)
                    if RANK != victim:
                        want -= lr * torch.cat([p.grad.reshape(-1) for p in model.parameters()])
                    diff = float((after[RANK] - want).abs().max())
    mine = {"finite": bool(torch.cat([p.reshape(-1) for p in model.parameters()]).isfinite().all()), "diff": diff,
            "rejected": {str(k): v for k, v in opt.rejected_weights.items()}, "skipped": opt.skipped_steps,
            "warnings": [str(c.message) for c in caught if issubclass(c.category, RuntimeWarning)]}
    return hvd.allgather_object(mine, name=f"nan_weights_skip.{topology}")


def nan_weights_raise(topology, victim=1, at=2):
    """As nan_weights_skip with nonfinite="raise", ending at step ``at``: who raises, saying what."""
    model = make_model()
    opt = hd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), topology=topology, seed=3)
    error = None
    try:
        for t in range(at + 1):
            if t == at and RANK == victim:
                with torch.no_grad():
                    next(model.parameters()).view(-1)[0] = float("nan")
            opt.zero_grad()
            loss_fn(model, RANK, t).backward()
            opt.step()
    except hd.NonFiniteError as exc:
        error = str(exc)
    finite = bool(torch.cat([p.reshape(-1) for p in model.parameters()]).isfinite().all())
    return hvd.allgather_object({"error": error, "finite": finite}, name=f"nan_weights_raise.{topology}")


# Two "hosts" on this machine (at np 4, 2 x 2: the host average's relay round runs); its W(t) is the full average.
HIERARCHICAL = "hierarchical:" + {2: "2x1", 3: "2,1", 4: "2x2"}.get(SIZE, f"{SIZE // 2},{SIZE - SIZE // 2}")
for name, topo in (("ring", "ring"), ("random_peer", "random_peer"), ("full", "full"),
                   ("hierarchical", HIERARCHICAL)):
    check(f"nan_weights_skip_{name}")(lambda topo=topo: nan_weights_skip(topo))
for name, topo in (("ring", "ring"), ("full", "full"), ("hierarchical", HIERARCHICAL)):
    check(f"nan_weights_raise_{name}")(lambda topo=topo: nan_weights_raise(topo))


@check("noise_ssgd_replicas_identical")
def _():
    out = []
    for sigma in (0.0, 0.01):
        model = make_model()
        opt = hd.DistributedOptimizer(sgd(model), algorithm="ssgd", callbacks=[hd.GaussianNoise(sigma, seed=1)],
                                      named_parameters=[(f"noise{sigma}.{n}", p) for n, p in model.named_parameters()])
        for t in range(4):
            opt.zero_grad()
            loss_fn(model, RANK, t).backward()
            opt.step()
        out.append(all_weights(model))
    return {"replica_spread": float((out[1] - out[1][0]).abs().max()),
            "noise_effect": float((out[1] - out[0]).abs().max())}


@check("callback_contract")
def _():
    """Parameters are w_j(t), then w_s,j(t) = sum_k W_jk w_k(t), then w_s,j(t) - lr g_j at the first three hooks;
    at the fourth, the final weights, including what a callback listed later added in on_after_update."""
    lr, recorder, noise = 0.1, Recorder(), hd.GaussianNoise(0.01, seed=5)
    model = make_model(seed=RANK)
    opt = hd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=lr), topology="ring",
                                  callbacks=[recorder, noise])
    worst, order, noise_seen = 0.0, [], []
    w = opt.topology.mixing_matrix(0)
    for t in range(3):
        opt.zero_grad()
        loss_fn(model, RANK, t).backward()
        before = all_weights(model)  # w_k(t) of every learner
        recorder.seen.clear()
        opt.step()
        final = torch.nn.utils.parameters_to_vector(model.parameters()).detach()
        (h0, s0, r0, n0, w_j, g_j), (h1, _, _, _, w_s, _), (h2, _, _, _, w_next, _), (h3, _, _, _, w_end, _) = \
            recorder.seen
        order.append([h0, h1, h2, h3, s0 == t, r0 == RANK, n0 == SIZE])
        expected_mix = sum(w[RANK, k] * before[k] for k in range(SIZE))
        worst = max(worst, float((w_j - before[RANK]).abs().max()), float((w_s - expected_mix).abs().max()),
                    float((w_next - (w_s - lr * g_j)).abs().max()), float((w_end - final).abs().max()))
        noise_seen.append(float((w_end - w_next).abs().max()))
    return {"order": order, "max_abs_diff": worst, "noise_seen_at_step_end": min(noise_seen)}


@check("diagnostics_measure_the_displacement_of_the_mean")
def _():
    """NoiseDiagnostics against Eq. 3 computed here from every learner's weights before and after the step
    (momentum and Gaussian weight noise included) and the probe gradient at w_a(t), and Eq. 4's definition."""
    lr, every = 0.2, 2
    model = make_model(seed=RANK)
    probe = [batch(100, 0, size=32), batch(101, 0, size=32)]   # the same training sample on every rank
    diag = hd.NoiseDiagnostics(model, torch.nn.functional.cross_entropy, probe, every=every)
    opt = hd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9), topology="ring",
                                  callbacks=[diag, hd.GaussianNoise(0.003, seed=2)])
    got, want = [], []
    for t in range(2 * every):
        opt.zero_grad()
        x, y = batch(RANK, t)
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        diag.observe(x, y, loss)
        before = all_weights(model)
        opt.step()
        after = all_weights(model)
        if (t + 1) % every:
            continue
        w_a = before.mean(0)
        at_mean = make_model()
        torch.nn.utils.vector_to_parameters(w_a, at_mean.parameters())
        g = sum(torch.nn.utils.parameters_to_vector(torch.autograd.grad(
            torch.nn.functional.cross_entropy(at_mean(px), py), list(at_mean.parameters()))) for px, py in probe) / 2
        d, g = (w_a - after.mean(0)).double(), g.double()
        alpha_e = float(d @ g) / float(g @ g)
        want.append([alpha_e / lr, float(d @ d) - alpha_e ** 2 * float(g @ g),
                     float(((before - w_a) ** 2).sum(1).mean())])
        got.append([diag.last["alpha_e_over_alpha"], diag.last["delta"], diag.last["consensus_distance"]])
    return {"got": got, "want": want, "step": diag.last["step"]}


@check("frozen_integer_parameter_left_alone")
def _():
    model = make_model()
    counter = torch.nn.Parameter(torch.arange(3), requires_grad=False)  # non-floating: cannot be trained
    opt = hd.DistributedOptimizer(torch.optim.SGD(list(model.parameters()) + [counter], lr=0.1))
    for t in range(3):
        opt.zero_grad()
        loss_fn(model, RANK, t).backward()
        opt.step()
    return {"counter": counter.tolist(), "steps": opt.step_count}


@check("dropped_optimizers_stop_their_threads")
def _():
    def exchange_threads():
        gc.collect()
        return sum(t.name == "dpsgd-exchange" for t in threading.enumerate())

    before = exchange_threads()
    for t in range(3):
        model = make_model()
        opt = hd.DistributedOptimizer(sgd(model))
        loss_fn(model, RANK, t).backward()
        opt.step()
        del model, opt
    deadline = time.monotonic() + 10
    while exchange_threads() > before and time.monotonic() < deadline:
        time.sleep(0.05)
    return {"before": before, "after": exchange_threads()}


def expect_error(fn, exc_type):
    try:
        fn()
    except exc_type as exc:
        return {"raised": type(exc).__name__, "message": str(exc)}
    return {"raised": None}


check("error_topology_size")(lambda: expect_error(
    lambda: hd.DistributedOptimizer(sgd(make_model()), topology=hd.topology.ring(SIZE + 1)), hd.TopologyError))
check("error_matrix_size")(lambda: expect_error(
    lambda: hd.DistributedOptimizer(sgd(make_model()), topology=np.eye(SIZE + 1)), hd.TopologyError))
check("error_unknown_topology")(lambda: expect_error(
    lambda: hd.DistributedOptimizer(sgd(make_model()), topology="torus"), hd.TopologyError))
check("error_models_differ")(lambda: expect_error(
    lambda: hd.DistributedOptimizer(sgd(make_model(hidden=16 + (RANK == SIZE - 1)))), hd.ParameterMismatchError))
check("error_nonfinite_raise")(lambda: expect_error(lambda: nan_at(set(range(SIZE)), 2, "raise"),
                                                  hd.NonFiniteError))
check("error_unknown_algorithm")(lambda: expect_error(
    lambda: hd.DistributedOptimizer(sgd(make_model()), algorithm="adpsgd"), ValueError))

def load_other_world_size():
    directory = os.path.join(os.path.dirname(os.path.abspath(sys.argv[1])), "ckpt-other")
    if RANK == 0:  # a manifest of a checkpoint of SIZE + 3 learners
        os.makedirs(directory, exist_ok=True)
        files = [{"rank": r, "name": f"learner-{r:05d}-of-{SIZE + 3:05d}.s000001.pt", "sha256": "0" * 64, "bytes": 0,
                  "step": 0} for r in range(SIZE + 3)]
        with open(os.path.join(directory, hd.checkpoint.MANIFEST), "w") as f:
            json.dump({"format": 2, "size": SIZE + 3, "generation": 1, "step": 0, "files": files}, f)
    hvd.allreduce(torch.zeros(1), name="ckpt-other-ready")
    hd.checkpoint.load(directory, make_model())


check("error_checkpoint_world_size")(lambda: expect_error(load_other_world_size, hd.checkpoint.CheckpointError))
