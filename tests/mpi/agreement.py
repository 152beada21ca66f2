"""Ranks agree before they talk: construction settings that differ, or are invalid on one rank only.

Run as ``horovodrun -np N python tests/mpi/agreement.py OUT.json [CASE ...]`` (all cases by default). In each
case the ranks build ``horovod_dpsgd.DistributedOptimizer`` with arguments that differ on one rank; every rank
records what it raised and the warnings it saw, and rank 0 writes them to OUT.json (one list per case, in rank
order). tests/test_agreement.py asserts that every rank raised the same clear error.
"""

import os
import sys
import traceback
import warnings

import numpy as np
import torch
import horovod.torch as hvd

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import horovod_dpsgd as hd  # noqa: E402
from mpi.common import make_model, report  # noqa: E402

hvd.init()
RANK, SIZE = hvd.rank(), hvd.size()
ODD = RANK == SIZE - 1  # the rank whose arguments differ


def build(**kw):
    model = make_model()
    named = kw.pop("named", None)
    return hd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), named_parameters=named, **kw)


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
    model = Stack()
    params = list(model.parameters())
    if ODD:
        params[0], params[2] = params[2], params[0]  # the same shapes, another order
    return hd.DistributedOptimizer(torch.optim.SGD(params, lr=0.1))


def named_reordered():
    model = Stack()
    named = list(model.named_parameters())
    if ODD:
        named.reverse()
    return hd.DistributedOptimizer(torch.optim.SGD([p for _, p in named], lr=0.1), named_parameters=named)


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


def run_case(fn):
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        try:
            fn()
            outcome = {"raised": None}
        except Exception as exc:
            outcome = {"raised": type(exc).__name__, "message": str(exc),
                       "traceback": traceback.format_exc()[-3000:]}
    outcome["warnings"] = [str(w.message) for w in seen if issubclass(w.category, UserWarning)]
    return outcome


results = {"size": SIZE}
for name in sys.argv[2:] or CASES:
    results[name] = hvd.allgather_object(run_case(CASES[name]), name=f"case.{name}")
report(results)
