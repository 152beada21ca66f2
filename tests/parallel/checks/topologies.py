"""The topologies from the literature and across hosts, against the single-process reference (Eq. 2).

Each ``@check`` is one named check; tests/parallel/test_topologies.py asserts on its result. Run by
tests/parallel/checks/run.py. Every "host" of an explicit layout shares this machine here: the host
averages run over the same MPI communicators as across real hosts (tests/integration/test_hosts.py runs
them across emulated hosts).
"""

import torch
import horovod.torch as hvd

import horovod_dpsgd as hd
from common import check, dpsgd_vs_reference, make_model

hvd.init()
SIZE = hvd.size()

# Two hosts, and an uneven layout (at np 4 three hosts, so the host matching changes and a full average sums
# across hosts by allreduce).
HOSTS = {2: "2x1", 3: "2,1", 4: "2x2"}[SIZE] if SIZE in (2, 3, 4) else f"{SIZE // 2},{SIZE - SIZE // 2}"
UNEVEN = {2: "1,1", 3: "1,2", 4: "2,1,1"}.get(SIZE, HOSTS)
for name, spec, options in (
        ("one_peer_exponential", "one_peer_exponential", {}),
        ("periodic_ring", "periodic:3:ring", {}),
        ("local_sgd", "local_sgd:3", {}),
        ("hierarchical", f"hierarchical:{HOSTS}", {}),
        ("hierarchical_leader", f"hierarchical:{HOSTS}:leader", {}),
        ("hierarchical_uneven", f"hierarchical:{UNEVEN}", {}),
        ("periodic_hierarchical", f"periodic:2:hierarchical:{UNEVEN}", {}),
        ("hierarchical_no_comm_thread", f"hierarchical:{HOSTS}", {"overlap": False}),
        ("hierarchical_fp16_wire", f"hierarchical:{HOSTS}", {"compression": hvd.Compression.fp16})):
    check(f"reference_{name}")(lambda spec=spec, options=options: dpsgd_vs_reference(spec, **options))


@check("auto_topology_on_one_host")
def _():
    model = make_model()
    return {"name": hd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1)).topology.name}
