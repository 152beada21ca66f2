"""Topologies by name: what ``topology="..."`` of the optimizer and ``--topology`` of the CLI accept."""

from typing import Optional, Union

import numpy as np

from horovod_dpsgd.errors import TopologyError
from horovod_dpsgd.topology.base import Topology, validate_mixing_matrix
from horovod_dpsgd.topology.dynamic import OnePeerExponential, Periodic, RandomPeer
from horovod_dpsgd.topology.hosts import Hierarchical, HostLayout, default_topology
from horovod_dpsgd.topology.static import exponential, from_mixing_matrix, full, random_graph, ring

__all__ = ["from_name", "check_name", "TOPOLOGY_NAMES"]

#: Names accepted by :func:`from_name` (and the ``--topology`` option of the CLI).
TOPOLOGY_NAMES = ("auto", "hierarchical", "random_peer", "one_peer_exponential", "ring", "exponential",
                  "random_graph", "full", "periodic", "local_sgd")

_HELP = ("choose one of " + ", ".join(TOPOLOGY_NAMES) + " (with arguments: 'ring:2', 'random_graph:0.3', "
         "'hierarchical:2x4' for an explicit host layout, 'hierarchical:leader' for one sender per host, "
         "'hierarchical:every=2' to cross hosts every 2nd step, "
         "'periodic:8' or 'periodic:8:ring' for a global average every 8 steps, 'local_sgd:8'), "
         "or pass a mixing matrix or a Topology")

_WITHOUT_ARGUMENT = {"auto", "random_peer", "random_matching", "one_peer_exponential", "one_peer_exp", "exponential",
                     "exp", "full"}


def _hierarchical(args, size: int, seed: int, layout: Optional[HostLayout]) -> Hierarchical:
    shards, every = None, 1
    for arg in args:
        if arg == "leader":
            shards = 1
        elif arg.startswith("every="):
            every = _integer(arg[len("every="):], "hierarchical:every=H (steps between exchanges across hosts)")
        elif arg:
            layout = HostLayout.parse(arg)
    if layout is None:
        raise TopologyError(
            "the hierarchical topology needs the host layout: the optimizer detects it under horovodrun; "
            "elsewhere give it in the name, e.g. 'hierarchical:2x4' (2 hosts of 4 consecutive ranks) or "
            "'hierarchical:4,4,2', or as layout= (`horovod-dpsgd topology hierarchical --hosts 2x4`)")
    if layout.size != size:
        raise TopologyError(f"the host layout {layout.describe()} has {layout.size} ranks but the job has "
                            f"{size}; give a layout of {size} ranks")
    return Hierarchical(layout, seed, shards, every)


def _integer(text: str, what: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise TopologyError(f"{what}: {text!r} is not an integer") from None


def _periodic(arg: str, size: int, seed: int, layout: Optional[HostLayout], local: bool) -> Periodic:
    every, _, base = arg.partition(":")
    if not every:
        raise TopologyError("give the global averaging period in steps, e.g. 'periodic:8' or 'local_sgd:8'")
    if local:
        if base:
            raise TopologyError("local SGD has no topology between its global averages; for one use "
                                f"'periodic:{every}:{base}'")
        return Periodic(size, int(every))
    return Periodic(size, int(every), from_name(base or "auto", size, seed, layout))


def from_name(spec: Union[str, Topology, np.ndarray], size: int, seed: int = 0,
              layout: Optional[HostLayout] = None) -> Topology:
    """Build a topology for ``size`` ranks from a name, a matrix, or return a Topology as is.

    Names:

    * ``auto``: the one-line swap's default, chosen from the host ``layout``
      (:func:`~horovod_dpsgd.topology.default_topology`): ``hierarchical:every=2`` on two hosts
      with several learners each, ``one_peer_exponential`` on other layouts of several hosts, the paper's
      ``random_peer`` on one host;
    * ``hierarchical``, ``hierarchical:HxL`` or ``hierarchical:L1,L2,...`` (an explicit host layout),
      ``hierarchical:leader`` (one sender per host), ``hierarchical:every=H`` (across hosts every ``H``-th step,
      inside each host in between), combinable (``hierarchical:2x4:every=2``):
      :class:`~horovod_dpsgd.topology.Hierarchical`;
    * ``random_peer``; ``one_peer_exponential``; ``ring`` or ``ring:K`` (K neighbours per side);
      ``exponential``; ``random_graph`` or ``random_graph:P`` (edge probability); ``full``;
    * ``periodic:H`` or ``periodic:H:BASE``: a global average every ``H`` steps, ``BASE`` (any name here,
      ``auto`` by default) in between (Gossip-PGA); ``local_sgd:H``: no communication in between.

    ``layout`` is the job's host layout (the optimizer passes the detected one); it matters to ``auto`` and
    ``hierarchical`` only.
    """
    if isinstance(spec, Topology):
        spec.check_size(size)
        return spec
    if isinstance(spec, np.ndarray) or (isinstance(spec, (list, tuple)) and spec and
                                        isinstance(spec[0], (list, tuple, np.ndarray))):
        return from_mixing_matrix(validate_mixing_matrix(spec, size))
    if not isinstance(spec, str):
        raise TopologyError(f"topology must be a name, a Topology or a mixing matrix; got {type(spec).__name__}")
    name, _, arg = spec.partition(":")
    name = name.strip().lower().replace("-", "_")
    try:
        if arg and name in _WITHOUT_ARGUMENT:
            raise TopologyError(f"the {name} topology takes no argument; got {spec!r}")
        if name == "auto":
            return default_topology(size, seed, layout)
        if name == "hierarchical":
            return _hierarchical(arg.split(":") if arg else [], size, seed, layout)
        if name in ("periodic", "local_sgd", "local"):
            return _periodic(arg, size, seed, layout, local=name != "periodic")
        if name == "ring":
            return ring(size, int(arg) if arg else 1)
        if name in ("random_peer", "random_matching"):
            return RandomPeer(size, seed)
        if name in ("one_peer_exponential", "one_peer_exp"):
            return OnePeerExponential(size)
        if name == "random_graph":
            return random_graph(size, float(arg) if arg else 0.5, seed)
        if name in ("exponential", "exp"):
            return exponential(size)
        if name == "full":
            return full(size)
    except ValueError as exc:
        if isinstance(exc, TopologyError):
            raise
        raise TopologyError(f"bad argument {arg!r} in topology {spec!r}: {exc}") from None
    raise TopologyError(f"unknown topology {spec!r}; {_HELP}")


def check_name(spec: str) -> None:
    """Raise :class:`TopologyError` unless ``spec`` is a valid topology name with valid arguments.

    Checks the syntax, before the world size is known: the topology is built for the ranks of an explicit
    host layout in the name (``hierarchical:2x4``), for 4 ranks on 2 hosts for other hierarchical names, and for
    one rank otherwise (which parses the name and its arguments but needs no graph: ``random_graph:0.05`` may
    have no connected graph on 4 nodes, yet be valid for the job's 2).
    """
    parts = [p.strip().lower() for p in spec.split(":")]
    if "hierarchical" not in parts:
        from_name(spec, 1)
        return
    layout = HostLayout.uniform(2, 2)
    for arg in parts[parts.index("hierarchical") + 1:]:
        if arg and arg != "leader" and not arg.startswith("every="):
            layout = HostLayout.parse(arg)
    from_name(spec, layout.size, layout=layout)
