"""DPSGD after ``hvd.init(comm=MPI.COMM_WORLD)`` with the plugin imported before Horovod is initialised.

A check module of its own, because it initialises Horovod differently: run by tests/parallel/checks/run.py
(``horovodrun -np N python tests/parallel/checks/run.py OUT.json init_variants``), which imports nothing
before it; tests/parallel/test_init_variants.py asserts on the result.
"""

import horovod_dpsgd as hd  # imported before hvd.init and before mpi4py
import torch
import horovod.torch as hvd
from mpi4py import MPI

from common import all_weights, check, loss_fn, make_model
from reference import dpsgd_reference

hvd.init(comm=MPI.COMM_WORLD)


@check("mpi_comm_world_and_plugin_imported_first")
def _():
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
    return {"max_abs_diff": float((got - want).abs().max()), "mpi_size": MPI.COMM_WORLD.Get_size()}
