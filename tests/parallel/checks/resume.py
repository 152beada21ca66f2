"""Resuming the ways Horovod users resume.

A first run trains 3 steps (learners start from different weights, random-peer topology, StepLR) and saves, as
Horovod's examples do (rank 0 writes model, optimizer and scheduler state and the epoch to one file) and as
horovod_dpsgd.checkpoint does (one file per learner). Each check then builds fresh objects, as a relaunched
script would, resumes, and trains to step 6. Its weights must equal those of a *twin* that continued the first
run in memory after the same state transfer, bit for bit, and every rank must count 6 steps.
tests/parallel/test_resume.py asserts on the checks; files go beside OUT.json (``sys.argv[1]``).
"""

import functools
import os
import sys
import traceback

import torch
import horovod.torch as hvd

import horovod_dpsgd as hd
from common import all_weights, check, loss_fn, make_model

hvd.init()
RANK, SIZE = hvd.rank(), hvd.size()
ODD = RANK == SIZE - 1
HERE = os.path.dirname(os.path.abspath(sys.argv[1]))
SAVED, END = 3, 6


def build(momentum: float, model_seed: int, algorithm: str = "dpsgd", callbacks=(), topology="random_peer"):
    model = make_model(seed=model_seed)
    sgd = torch.optim.SGD(model.parameters(), lr=0.1, momentum=momentum)
    opt = hd.DistributedOptimizer(sgd, named_parameters=model.named_parameters(), topology=topology, seed=7,
                                  algorithm=algorithm, callbacks=callbacks)
    # The learning rate is the optimizer's: broadcast_optimizer_state carries it only for an optimizer with state
    # (with SGD without momentum it broadcasts nothing, as Horovod's own), so the stateless runs keep it constant.
    return model, opt, torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5 if momentum else 1.0)


def train(model, opt, sched, first: int, last: int) -> None:
    for t in range(first, last):
        opt.zero_grad()
        loss_fn(model, RANK, t).backward()
        opt.step()
        sched.step()


def first_run(momentum: float, algorithm: str = "dpsgd", callbacks=()):
    """3 steps from per-learner initial weights."""
    objects = build(momentum, RANK if algorithm == "dpsgd" else 0, algorithm, callbacks)
    train(*objects, 0, SAVED)
    return objects


def files(tag: str) -> dict:
    return {"rank0": os.path.join(HERE, f"{tag}-rank0.pt"), "learners": os.path.join(HERE, f"{tag}-learners"),
            "mine": os.path.join(HERE, f"{tag}-rank{RANK}.pt")}


def save(tag: str, model, opt, sched) -> None:
    """Horovod's way (rank 0, one file), the plugin's per-learner checkpoint, and each rank's own state_dict."""
    state = {"model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
             "epoch": opt.step_count}
    if RANK == 0:
        torch.save(state, files(tag)["rank0"])
    torch.save(state, files(tag)["mine"])
    hd.checkpoint.save(files(tag)["learners"], model, opt, extra={"scheduler": sched.state_dict(),
                                                                 "epoch": opt.step_count})


def twin(momentum: float, broadcast: bool, algorithm: str = "dpsgd", callbacks=()):
    """The first run continued in memory, after the state transfer the variant makes (the broadcasts from rank 0)."""
    model, opt, sched = first_run(momentum, algorithm, callbacks)
    if broadcast:
        hvd.broadcast_parameters(model.state_dict(), root_rank=0)
        if momentum:  # a stateless optimizer has nothing to broadcast
            hvd.broadcast_optimizer_state(opt, root_rank=0)
    train(model, opt, sched, SAVED, END)
    return all_weights(model)


def resume_rank0(tag: str, momentum: float, algorithm: str = "dpsgd", callbacks=()):
    """Horovod's examples: rank 0 loads, then the broadcasts (epoch and scheduler state with broadcast_object)."""
    model, opt, sched = build(momentum, 100 + RANK, algorithm, callbacks)
    epoch = 0
    if RANK == 0:
        state = torch.load(files(tag)["rank0"], weights_only=False)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        epoch = state["epoch"]
    epoch = hvd.broadcast_object(epoch, root_rank=0, name=f"{tag}.epoch")
    sched.load_state_dict(hvd.broadcast_object(sched.state_dict(), root_rank=0, name=f"{tag}.scheduler"))
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    hvd.broadcast_optimizer_state(opt, root_rank=0)
    train(model, opt, sched, epoch, END)
    return model, opt


def resume_same_file(tag: str, momentum: float):
    model, opt, sched = build(momentum, 100 + RANK)
    state = torch.load(files(tag)["rank0"], weights_only=False)
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    train(model, opt, sched, state["epoch"], END)
    return model, opt


def resume_learners(tag: str, momentum: float):
    model, opt, sched = build(momentum, 100 + RANK)
    extra = hd.checkpoint.load(files(tag)["learners"], model, opt)
    sched.load_state_dict(extra["scheduler"])
    train(model, opt, sched, extra["epoch"], END)
    return model, opt


def outcome(model, opt, want) -> dict:
    got = all_weights(model)
    steps = hvd.allgather_object(opt.step_count, name="steps")
    return {"diff": float((got - want).abs().max()), "steps": steps,
            "replica_spread": float((got - got[0]).abs().max())}


def compare(resume, want_fn):
    want = want_fn()
    model, opt = resume()
    return outcome(model, opt, want)


def expect_error(fn) -> dict:
    """Run ``fn`` on every rank; each rank's exception type and message (None if it raised nothing)."""
    try:
        fn()
        mine = {"raised": None}
    except Exception as exc:
        mine = {"raised": type(exc).__name__, "message": str(exc), "traceback": traceback.format_exc()[-2000:]}
    return {"ranks": hvd.allgather_object(mine, name="errors")}


def load_at_different_steps():
    """Every rank loads its own state, the odd rank one saved a step earlier (a crash between two saves)."""
    model, opt, sched = build(0.9, 100 + RANK)
    state = torch.load(files("early" if ODD else "m")["mine"], weights_only=False)
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])
    train(model, opt, sched, state["epoch"], END)


def load_on_one_rank_mid_training():
    """Training goes on, and the odd rank alone loads an older state: its first exchange with each neighbour (on a
    ring, all of them at np <= 3) names the mismatch."""
    model, opt, sched = build(0.9, RANK, topology="ring")
    train(model, opt, sched, 0, SAVED)
    if ODD:
        opt.load_state_dict(torch.load(files("early")["mine"], weights_only=False)["optimizer"])
    train(model, opt, sched, SAVED, END)


def noise():
    return [hd.GaussianNoise(0.01, seed=1)]  # SSGD*: the step seeds the sample every replica adds


@functools.lru_cache(maxsize=None)
def saved() -> bool:
    """The saved states, written once (collective: the first check that needs them runs it on every rank): after
    3 steps with momentum, without (stateless), and with SSGD*; after 2 steps for the error checks."""
    for tag, args in (("m", (0.9,)), ("s", (0.0,)), ("ssgd", (0.9, "ssgd", noise()))):
        save(tag, *first_run(*args))
    model, opt, sched = build(0.9, RANK)
    train(model, opt, sched, 0, SAVED - 1)
    save("early", model, opt, sched)
    return True


VARIANTS = {
    "rank0_load_then_broadcasts": lambda: compare(lambda: resume_rank0("m", 0.9), lambda: twin(0.9, True)),
    "rank0_load_then_broadcasts_stateless": lambda: compare(lambda: resume_rank0("s", 0.0), lambda: twin(0.0, True)),
    "every_rank_loads_the_same_file": lambda: compare(lambda: resume_same_file("m", 0.9), lambda: twin(0.9, True)),
    "per_learner_checkpoint": lambda: compare(lambda: resume_learners("m", 0.9), lambda: twin(0.9, False)),
    "ssgd_rank0_load_then_broadcasts": lambda: compare(
        lambda: resume_rank0("ssgd", 0.9, "ssgd", noise()), lambda: twin(0.9, True, "ssgd", noise())),
    "error_learners_at_different_steps": lambda: expect_error(load_at_different_steps),
    "error_load_state_dict_on_one_rank": lambda: expect_error(load_on_one_rank_mid_training),
}

for _name, _variant in VARIANTS.items():
    check(_name)(lambda variant=_variant: saved() and variant())
