"""Emulated hosts on one machine, for trying multi-host layouts before booking a cluster.

A host is a network namespace with one interface, named ``veth0`` in every host (Horovod wants one
interface name common to all hosts), plugged into a Linux bridge; its name resolves through
``/etc/hosts`` lines and is its hostname. An ``ssh`` stand-in (:mod:`.ssh`) placed first on
``PATH`` runs commands inside the hosts, so an unchanged ``horovodrun -H host1:2,host2:2 ...`` launches
across them: processes on one host talk over shared memory, processes on different hosts over TCP
through their hosts' links. A ``tc`` token bucket (``tbf``) on both ends of each link limits its rate
in both directions. There is no ``netem`` in this kernel, so latency is not emulated (docs/cluster.md).

    with EmulatedCluster(hosts=2, slots=2, rate="1gbit") as cluster:
        subprocess.run(cluster.horovodrun_command([sys.executable, "train.py"]), env=cluster.env(), check=True)

Everything is recorded in a state file before it is created; teardown removes exactly that (the
processes still running on the hosts included), from any process (:func:`down`, ``horovod-dpsgd cluster
down``), also after the process that built the cluster was killed. The context manager tears down on
any exit, exceptions, Ctrl-C (SIGINT), SIGTERM and SIGHUP included. Needs root.
"""

from horovod_dpsgd.experiments.cluster.emulated import (EmulatedCluster, clusters, down, shape, status,
                                                        up)
from horovod_dpsgd.experiments.cluster.layout import (DEFAULT_PREFIX, ClusterError, ClusterExistsError,
                                                      ClusterUnavailableError, Layout, format_rate, parse_rate)

__all__ = ["EmulatedCluster", "ClusterError", "ClusterExistsError", "ClusterUnavailableError", "Layout",
           "parse_rate", "format_rate", "up", "down", "shape", "status", "clusters", "DEFAULT_PREFIX"]
