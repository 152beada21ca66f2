"""A DPSGD ring job across emulated hosts: ``horovodrun ... python tests/integration/jobs/cluster_job.py OUT.json``.

Every rank reports where it ran (hostname, MPI processor name, Horovod's local/cross ranks and sizes);
the learners' weights after a few steps are compared with the single-process reference. Rank 0 writes
the JSON report that tests/integration/test_cluster.py asserts on.
"""

import json
import os
import socket
import sys

import torch
import horovod.torch as hvd
from mpi4py import MPI

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "support"))
import horovod_dpsgd as hd  # noqa: E402
from reference import dpsgd_reference  # noqa: E402

STEPS = 5


def loss_fn(model, rank, t, k=0):
    g = torch.Generator().manual_seed(100_000 * t + 1000 * k + rank)
    x, y = torch.randn(16, 8, generator=g), torch.randint(0, 64, (16,), generator=g)
    return torch.nn.functional.cross_entropy(model(x), y)


def make_model() -> torch.nn.Module:
    """1.2 MB of weights: each exchange that crosses hosts is visible in the link counters."""
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 4096), torch.nn.Tanh(), torch.nn.Linear(4096, 64))


def sgd(model):
    return torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)


hvd.init()
where = {"rank": hvd.rank(), "size": hvd.size(), "local_rank": hvd.local_rank(), "local_size": hvd.local_size(),
         "cross_rank": hvd.cross_rank(), "cross_size": hvd.cross_size(), "hostname": socket.gethostname(),
         "processor": MPI.Get_processor_name()}
ranks = hvd.allgather_object(where)

model = make_model()
opt = hd.DistributedOptimizer(sgd(model), named_parameters=model.named_parameters(), topology="ring")
for t in range(STEPS):
    opt.zero_grad()
    loss_fn(model, hvd.rank(), t).backward()
    opt.step()
got = hvd.allgather(torch.nn.utils.parameters_to_vector(model.parameters()).detach().unsqueeze(0), name="weights")
if hvd.rank() == 0:
    models = [make_model() for _ in range(hvd.size())]
    want = torch.stack(dpsgd_reference(models, [sgd(m) for m in models], opt.topology, loss_fn, STEPS))
    report = {"ranks": ranks, "steps": opt.step_count, "max_abs_diff": float((got - want).abs().max()),
              "learner_spread": float((got - got.mean(0)).abs().max()),
              "model_bytes": sum(p.numel() * p.element_size() for p in model.parameters())}
    with open(sys.argv[1], "w") as f:
        json.dump(report, f, indent=1)
