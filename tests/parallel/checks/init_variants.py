"""DPSGD after ``hvd.init(comm=MPI.COMM_WORLD)`` with the plugin imported before Horovod is initialised.

Run as ``horovodrun -np N python tests/mpi/init_variants.py OUT.json``.
"""

import os
import sys

import horovod_dpsgd as hd  # imported before hvd.init and before mpi4py
import torch
import horovod.torch as hvd
from mpi4py import MPI

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from mpi.common import all_weights, loss_fn, make_model, report  # noqa: E402
from reference import dpsgd_reference  # noqa: E402

hvd.init(comm=MPI.COMM_WORLD)
model = make_model()
opt = hd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), topology="random_peer")
for t in range(4):
    opt.zero_grad()
    loss_fn(model, hvd.rank(), t).backward()
    opt.step()
got = all_weights(model)
models = [make_model() for _ in range(hvd.size())]
want = torch.stack(dpsgd_reference(models, [torch.optim.SGD(m.parameters(), lr=0.1) for m in models],
                                   opt.topology, loss_fn, 4))
report({"max_abs_diff": float((got - want).abs().max()), "mpi_size": MPI.COMM_WORLD.Get_size()})
