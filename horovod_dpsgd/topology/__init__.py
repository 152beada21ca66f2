"""Communication topologies: who each learner averages with, and with what weights.

A topology is data. For a world of ``size`` learners it yields, at every step ``t``, a doubly stochastic
*mixing matrix* ``W(t)``. Row ``j`` of ``W(t)`` holds the weights with which learner ``j`` averages its
own and its neighbours' weights into the starting weight of paper Eq. 2::

    w_s,j(t) = sum_k W_jk(t) w_k(t)

Every ``W(t)`` is validated: non-negative, rows and columns summing to one, its graph connected (over a
period, for schedules that connect the learners only together). Undirected topologies are symmetric;
the one directed topology here, the one-peer exponential graph, is checked as doubly stochastic without
symmetry (:func:`validate_mixing_matrix` with ``directed=True``), and its plans say whom to send to.

* static (:mod:`.static`): ring, exponential graph, random graph, full averaging, a user's graph or matrix;
* dynamic (:mod:`.dynamic`): a random peer per step (the paper's), the one-peer exponential graph,
  periodic global averaging (Gossip-PGA) and local SGD; every rank computes the schedule alone from
  ``(seed, t)``;
* host-aware (:mod:`.hosts`): :class:`Hierarchical` averages inside each host and exchanges one model per
  host across hosts; ``"auto"`` (:func:`default_topology`) picks it on two hosts of several learners, the
  one-peer exponential graph on other layouts of several hosts, the random peer on one host.

Example::

    >>> from horovod_dpsgd import topology
    >>> print(topology.ring(4))                      # doctest: +SKIP
    >>> topology.from_name("hierarchical:2x2", size=4).plan(rank=0, step=3)  # doctest: +SKIP
"""

from horovod_dpsgd.errors import TopologyError
from horovod_dpsgd.topology.base import (MixingPlan, Topology, consensus_contraction, metropolis_hastings_weights,
                                         spectral_gap, validate_mixing_matrix)
from horovod_dpsgd.topology.dynamic import OnePeerExponential, Periodic, RandomPeer
from horovod_dpsgd.topology.hosts import (Hierarchical, HostLayout, averages_by_host, cross_host_bytes,
                                          default_topology)
from horovod_dpsgd.topology.names import TOPOLOGY_NAMES, check_name, from_name
from horovod_dpsgd.topology.static import (StaticTopology, exponential, from_graph, from_mixing_matrix, full,
                                           random_graph, ring)

__all__ = [
    "MixingPlan", "Topology", "StaticTopology", "RandomPeer", "OnePeerExponential", "Periodic", "Hierarchical",
    "HostLayout", "ring", "exponential", "random_graph", "full", "from_mixing_matrix", "from_graph",
    "from_name", "check_name", "default_topology", "averages_by_host", "cross_host_bytes", "metropolis_hastings_weights", "validate_mixing_matrix", "spectral_gap",
    "consensus_contraction", "TOPOLOGY_NAMES", "TopologyError",
]
