"""Ranks agree before they talk: construction settings that differ, or are invalid on one rank only.

In each check the ranks build ``horovod_dpsgd.DistributedOptimizer`` with arguments that differ on the last
rank; every rank records what it raised and the warnings it saw, and the check returns every rank's record (rank
order). tests/parallel/test_agreement.py asserts that every rank raised the same clear error.
"""

import traceback
import warnings

import numpy as np
import torch
import horovod.torch as hvd

import horovod_dpsgd as hd
from common import check, make_model

hvd.init()
RANK, SIZE = hvd.rank(), hvd.size()
ODD = RANK == SIZE - 1  # the rank whose arguments differ


def build(**kw):
    model = make_model()
    return hd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), **kw)


def two_matrices():
    """Two valid mixing matrices for SIZE learners: the ring's, and a lazier one."""
    ring = hd.topology.ring(SIZE).mixing_matrix()
    lazy = 0.5 * ring + 0.5 * np.eye(SIZE)
    return lazy if ODD else ring


class Stack(torch.nn.Module):
    """Three layers of the same shape: a different order cannot be seen in the shapes."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.layers = torch.nn.ModuleList(torch.nn.Linear(8, 8) for _ in range(3))

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


def unnamed_reordered():
    params = list(Stack().parameters())
    if ODD:
        params[0], params[2] = params[2], params[0]  # the same shapes, another order
    return hd.DistributedOptimizer(torch.optim.SGD(params, lr=0.1))


def named_reordered():
    named = list(Stack().named_parameters())
    if ODD:
        named.reverse()
    return hd.DistributedOptimizer(torch.optim.SGD([p for _, p in named], lr=0.1), named_parameters=named)


def every_rank(fn):
    """Run ``fn`` on every rank: each rank's exception type, message and warnings, gathered in rank order."""
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        try:
            fn()
            mine = {"raised": None}
        except Exception as exc:
            mine = {"raised": type(exc).__name__, "message": str(exc), "traceback": traceback.format_exc()[-3000:]}
    mine["warnings"] = [str(w.message) for w in seen if issubclass(w.category, UserWarning)]
    return hvd.allgather_object(mine, name="agreement.outcomes")


CASES = {
    "invalid_topology_on_one_rank": lambda: build(topology="ring:0" if ODD else "ring"),
    "invalid_algorithm_on_one_rank": lambda: build(algorithm="adpsgd" if ODD else "dpsgd"),
    "invalid_timeout_on_one_rank": lambda: build(timeout=-1 if ODD else 30),
    "different_mixing_matrices": lambda: build(topology=two_matrices()),
    "different_topologies": lambda: build(topology="random_peer" if ODD else "ring"),
    "different_seeds": lambda: build(seed=1 if ODD else 0),
    "different_algorithms": lambda: build(algorithm="ssgd" if ODD else "dpsgd"),
    "different_backward_passes": lambda: build(backward_passes_per_step=2 if ODD else 1),
    "different_timeouts": lambda: build(timeout=31 if ODD else 30),
    "different_compression": lambda: build(compression=hvd.Compression.fp16 if ODD else hvd.Compression.none),
    "ssgd_different_seeds": lambda: build(algorithm="ssgd", seed=1 if ODD else 0),
    "named_parameters_reordered": named_reordered,
    "unnamed_parameters_reordered": unnamed_reordered,
    "same_settings": lambda: build(topology="ring", seed=3, timeout=30),
}

for _name, _fn in CASES.items():
    check(_name)(lambda fn=_fn: every_rank(fn))
