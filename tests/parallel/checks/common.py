"""Shared pieces of the multi-process check modules (run on every rank under horovodrun).

A check module initialises Horovod at import, the way its checks need, and registers each check
with ``@check("name")``; tests/parallel/checks/run.py runs the ones a pytest session selected.
"""

from typing import Callable, Dict

import torch
import horovod.torch as hvd
from torch.nn.utils import parameters_to_vector

from workload import batch, make_model  # noqa: F401 (the check modules take them from here)


#: name -> check, in the order the check module defines them (the order run.py runs them in).
CHECKS: Dict[str, Callable[[], object]] = {}


def check(name: str):
    """Register a check: a function of no arguments, called on every rank, whose rank-0 return value
    (JSON-serialisable) is what tests/parallel asserts on. It may use Horovod's collectives."""
    def register(fn: Callable[[], object]) -> Callable[[], object]:
        if name in CHECKS:
            raise ValueError(f"two checks are named {name!r}")
        CHECKS[name] = fn
        return fn
    return register


def loss_fn(model, rank, t, k=0):
    x, y = batch(rank, t, k)
    return torch.nn.functional.cross_entropy(model(x), y)


_calls = [0]


def all_weights(model) -> torch.Tensor:
    """Every rank's flat weights, stacked (rank order). Collective: call on every rank."""
    flat = parameters_to_vector(model.parameters()).detach()
    _calls[0] += 1
    return hvd.allgather(flat.unsqueeze(0), name=f"weights.{_calls[0]}")


def dpsgd_vs_reference(topology, passes=1, steps=6, make=make_model, momentum=0.9, **options) -> dict:
    """Train ``steps`` steps of DistributedOptimizer(topology=...) and compare every learner's weights with the
    single-process reference (tests/support/reference.py) fed the same topology. Collective."""
    import horovod_dpsgd as hd
    from reference import dpsgd_reference
    rank, size = hvd.rank(), hvd.size()
    model = make()
    sgd = (lambda m: torch.optim.SGD(m.parameters(), lr=0.1, momentum=momentum, weight_decay=1e-4 if momentum else 0.0))
    opt = hd.DistributedOptimizer(sgd(model), named_parameters=model.named_parameters(),
                                  backward_passes_per_step=passes, topology=topology, seed=3, **options)
    for t in range(steps):
        opt.zero_grad()
        for k in range(passes):
            loss_fn(model, rank, t, k).backward()
        opt.step()
    got = all_weights(model)
    models = [make() for _ in range(size)]
    want = dpsgd_reference(models, [sgd(m) for m in models], opt.topology, loss_fn, steps, passes)
    spread = float((got - got.mean(0)).abs().max())
    return {"max_abs_diff": float((got - torch.stack(want)).abs().max()), "learner_spread": spread,
            "steps": opt.step_count}
