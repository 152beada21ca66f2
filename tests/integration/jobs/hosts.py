"""DPSGD across emulated hosts against the single-process reference, with the bytes that crossed the hosts' links.

Run by tests/integration/test_hosts.py on an emulated cluster: ``horovodrun -H h1:2,h2:2 ... python tests/integration/jobs/hosts.py OUT.json``.
For every topology, the learners' weights after a few steps are compared with the single-process reference,
and one learner per host reads its host link's byte counters (``/sys/class/net/veth0``) before and after the
steps; the bytes the topology's plans send across hosts (``topology.cross_host_bytes``) are computed alongside.
Rank 0 writes the JSON report.
"""

import faulthandler
import json
import os
import signal
import socket
import sys
import traceback

import torch
import horovod.torch as hvd
from mpi4py import MPI

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "support"))
import horovod_dpsgd as hd  # noqa: E402
from reference import dpsgd_reference  # noqa: E402

STEPS = 6
LINK = "/sys/class/net/veth0/statistics"
TOPOLOGIES = {  # check name -> (topology, optimizer keywords)
    "default": ("auto", {}),
    "hierarchical": ("hierarchical", {}),
    "hierarchical_leader": ("hierarchical:leader", {}),
    "hierarchical_fp16_wire": ("hierarchical", {"compression": hvd.Compression.fp16}),
    "random_peer": ("random_peer", {}),
    "ring": ("ring", {}),
    "exponential": ("exponential", {}),
    "random_graph": ("random_graph", {}),
    "one_peer_exponential": ("one_peer_exponential", {}),
    "periodic_ring": ("periodic:3:ring", {}),
    "local_sgd": ("local_sgd:3", {}),
    "full": ("full", {}),
}


def make_model() -> torch.nn.Module:
    """1.2 MB of weights: every exchange that crosses hosts stands out in the link counters."""
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 4096), torch.nn.Tanh(), torch.nn.Linear(4096, 64))


def loss_fn(model, rank, t, k=0):
    g = torch.Generator().manual_seed(100_000 * t + 1000 * k + rank)
    x, y = torch.randn(16, 8, generator=g), torch.randint(0, 64, (16,), generator=g)
    return torch.nn.functional.cross_entropy(model(x), y)


def sgd(model):
    return torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)


def sent_bytes():
    """Bytes this host has sent through its link so far (read by one learner per host)."""
    with open(os.path.join(LINK, "tx_bytes")) as f:
        return int(f.read())


def run(name, spec, options):
    model = make_model()
    opt = hd.DistributedOptimizer(sgd(model), named_parameters=model.named_parameters(), topology=spec, seed=3,
                                  **options)
    MPI.COMM_WORLD.Barrier()
    before = sent_bytes() if hvd.local_rank() == 0 else None
    for t in range(STEPS):
        opt.zero_grad()
        loss_fn(model, hvd.rank(), t).backward()
        opt.step()
    MPI.COMM_WORLD.Barrier()
    after = sent_bytes() if hvd.local_rank() == 0 else None
    flat = torch.nn.utils.parameters_to_vector(model.parameters()).detach()
    got = torch.stack(MPI.COMM_WORLD.allgather(flat))
    models = [make_model() for _ in range(hvd.size())]
    want = torch.stack(dpsgd_reference(models, [sgd(m) for m in models], opt.topology, loss_fn, STEPS))
    sent = [s for s in MPI.COMM_WORLD.allgather(None if before is None else after - before) if s is not None]
    nbytes = flat.numel() * flat.element_size()
    wire = 0.5 if options.get("compression") is hvd.Compression.fp16 else 1.0
    return {"topology": opt.topology.name, "max_abs_diff": float((got - want).abs().max()),
            "learner_spread": float((got - got.mean(0)).abs().max()), "sent_bytes": sent,
            "planned_bytes": planned_bytes(opt.topology, nbytes, wire), "model_bytes": nbytes}


def planned_bytes(topology, nbytes, wire):
    """Bytes each host sends across hosts in STEPS steps, by the topology's plans."""
    layout = hd.topology.HostLayout.from_host_names(MPI.COMM_WORLD.allgather(MPI.Get_processor_name()))
    return [float(b) for b in sum(hd.topology.cross_host_bytes(topology, layout, t, nbytes, wire)
                                  for t in range(STEPS))]


def main():
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # `kill -USR1 PID` prints where a rank is stuck
    hvd.init()
    results = {"size": hvd.size(), "local_size": hvd.local_size(), "cross_size": hvd.cross_size(),
               "hosts": MPI.COMM_WORLD.allgather(socket.gethostname()), "checks": {}}
    for name, (spec, options) in TOPOLOGIES.items():
        if hvd.rank() == 0:
            print(f"check {name}", flush=True)
        try:
            results["checks"][name] = run(name, spec, options)
        except Exception:
            results["checks"][name] = {"error": traceback.format_exc()}
    if hvd.rank() == 0:
        with open(sys.argv[1], "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
