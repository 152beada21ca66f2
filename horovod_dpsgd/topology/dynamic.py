"""Dynamic topologies: ``W(t)`` changes from step to step, by a schedule every rank computes alone.

* :class:`RandomPeer`: a random perfect matching per step (the paper's Sec. 4 setting).
* :class:`OnePeerExponential`: one peer per step at distance ``2^(t mod tau)`` (Ying et al. 2021), directed.
* :class:`Periodic`: a base topology, and a global average every ``H`` steps (Gossip-PGA, Chen et al. 2021);
  without a base, local SGD.
"""

import math
from typing import Optional

import numpy as np

from horovod_dpsgd.errors import TopologyError
from horovod_dpsgd.topology.base import MixingPlan, Topology

__all__ = ["RandomPeer", "OnePeerExponential", "Periodic", "random_matching"]


def random_matching(size: int, seed: int, step: int) -> np.ndarray:
    """``partner[j]`` of a uniformly random perfect matching of ``size`` nodes drawn from ``(seed, step)``
    (``j`` itself for the one node left out when ``size`` is odd)."""
    perm = np.random.default_rng([seed, int(step)]).permutation(size)
    partner = np.arange(size)
    pairs = perm[: size - size % 2].reshape(-1, 2)
    partner[pairs[:, 0]] = pairs[:, 1]
    partner[pairs[:, 1]] = pairs[:, 0]
    return partner


def matching_probability(size: int) -> float:
    """Probability that two given nodes are matched by :func:`random_matching`."""
    return 1.0 / (size - 1) if size % 2 == 0 else 1.0 / size


class RandomPeer(Topology):
    """Each step, a random perfect matching: every learner averages 1:1 with one peer.

    This is the paper's evaluation setting (Sec. 4: "a learner randomly picks a neighbor with
    which to exchange weights in each iteration"). The matching of step ``t`` is drawn from
    ``(seed, t)``, so all ranks agree on it without communication. With an odd world size
    one learner per step has no partner and keeps its own weights.
    """

    dynamic = True
    period = None
    name = "random peer"

    def __init__(self, size: int, seed: int = 0):
        if size < 1:
            raise TopologyError(f"size must be >= 1, got {size}")
        self.size = size
        self.seed = int(seed)

    def partners(self, step: int) -> np.ndarray:
        """``partner[j]`` of every learner at ``step`` (``j`` itself when unmatched)."""
        return random_matching(self.size, self.seed, step)

    def plan(self, rank: int, step: int) -> MixingPlan:
        peer = int(self.partners(step)[rank])
        if peer == rank:
            return MixingPlan(1.0, (), ())
        return MixingPlan(0.5, (peer,), (0.5,))

    def mixing_matrix(self, step: int = 0) -> np.ndarray:
        partner = self.partners(step)
        w = np.zeros((self.size, self.size))
        idx = np.arange(self.size)
        w[idx, idx] += 0.5
        w[idx, partner] += 0.5
        return w

    def expected_mixing_matrix(self) -> np.ndarray:
        n = self.size
        if n == 1:
            return np.ones((1, 1))
        p = matching_probability(n)
        w = np.full((n, n), 0.5 * p)
        np.fill_diagonal(w, 1.0 - 0.5 * p * (n - 1))
        return w


class OnePeerExponential(Topology):
    r"""The one-peer exponential graph (Ying et al. 2021, "Exponential graph is provably efficient for
    decentralized deep training"): at step ``t`` learner ``j`` averages 1:1 with learner
    ``j + 2^(t mod tau)`` (mod ``n``), ``tau = ceil(log2 n)``:

    .. math::
        W_{jk}(t) = 1/2 \text{ if } k = j \text{ or } k = j + 2^{t \bmod \tau} \pmod n, \text{ else } 0

    One message in and one out per learner and step, as a random peer, but deterministic; each ``W(t)`` is
    doubly stochastic but **not symmetric** (learner ``j`` receives from ``j + 2^i`` and sends to
    ``j - 2^i``), so this topology is directed. When ``n`` is a power of two, ``tau`` steps multiply to the
    exact average ``J / n``: the learners agree after every period, where a random matching only
    contracts their disagreement.
    """

    dynamic = True
    directed = True
    name = "one-peer exponential graph"

    def __init__(self, size: int):
        if size < 1:
            raise TopologyError(f"size must be >= 1, got {size}")
        self.size = size
        self.period = max(1, math.ceil(math.log2(size))) if size > 1 else 1
        self.dynamic = self.directed = size > 2  # n = 2: one peer, the same every step

    def hop(self, step: int) -> int:
        """The distance ``2^(step mod tau)`` of ``step``'s peer."""
        return 2 ** (step % self.period)

    def plan(self, rank: int, step: int) -> MixingPlan:
        if self.size == 1:
            return MixingPlan(1.0, (), ())
        hop = self.hop(step)
        return MixingPlan(0.5, ((rank + hop) % self.size,), (0.5,), send_to=((rank - hop) % self.size,))

    def mixing_matrix(self, step: int = 0) -> np.ndarray:
        n = self.size
        w = 0.5 * np.eye(n)
        idx = np.arange(n)
        w[idx, (idx + self.hop(step)) % n] += 0.5
        return w


class Periodic(Topology):
    """Global averaging every ``period_steps`` steps, a base topology in between.

    Gossip SGD with periodic global averaging (Gossip-PGA; Chen et al. 2021, "Accelerating gossip SGD with
    periodic global averaging"): ``W(t) = J / n`` (full averaging) when ``(t + 1) mod H = 0``, the base
    topology's ``W(t)`` otherwise. Without a base (``base=None``) learners do not communicate between the
    global averages: that is local SGD with ``H`` local steps.
    """

    dynamic = True

    def __init__(self, size: int, every: int, base: Optional[Topology] = None):
        if every < 1:
            raise TopologyError(f"the global averaging period must be >= 1 step, got {every}")
        if base is not None:
            base.check_size(size)
        self.size, self.every, self.base = size, int(every), base
        self.directed = base is not None and base.directed
        self.layout = base.layout if base is not None else None
        self.shards = base.shards if base is not None else None
        self.period = None if base is not None and base.period is None else \
            math.lcm(self.every, base.period if base is not None else 1)
        self.name = (f"periodic global averaging every {every} steps, {base.name} in between" if base is not None
                     else f"local SGD, global averaging every {every} steps")
        self._average = MixingPlan(1.0 / size, (), (), collective=size > 1)

    def averages(self, step: int) -> bool:
        """True at the steps that average globally."""
        return (step + 1) % self.every == 0

    def plan(self, rank: int, step: int) -> MixingPlan:
        if self.averages(step):
            peers = tuple(k for k in range(self.size) if k != rank)
            return self._average._replace(peers=peers, peer_weights=(1.0 / self.size,) * len(peers))
        if self.base is None:
            return MixingPlan(1.0, (), ())
        return self.base.plan(rank, step)

    def mixing_matrix(self, step: int = 0) -> np.ndarray:
        if self.averages(step):
            return np.full((self.size, self.size), 1.0 / self.size)
        return np.eye(self.size) if self.base is None else self.base.mixing_matrix(step)

    def expected_mixing_matrix(self) -> np.ndarray:
        if self.period is not None:
            return super().expected_mixing_matrix()
        # A random base is drawn independently of the step's phase.
        h = self.every
        return ((h - 1) * self.base.expected_mixing_matrix() + np.full((self.size, self.size), 1.0 / self.size)) / h
