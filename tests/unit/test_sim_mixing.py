"""The simulator's mixing (horovod_dpsgd.sim.averaging): ``W(t) X`` applied to stacked learners' rows, in place.

Every way of applying ``W`` (mean, dense, CSR, from the neighbours' rows) must give the product with the
topology's mixing matrix; the neighbours' way must also read no row that a learner gives no weight.
"""

import numpy as np
import pytest
import torch

from horovod_dpsgd import topology as topologies
from horovod_dpsgd.sim.averaging import MixingMatrix, StackedAverager


@pytest.mark.parametrize("topology,n,kind", [("ring", 5, "dense"), ("ring", 20, "neighbours"), ("ring:2", 7, "dense"),
                                             ("exponential", 64, "sparse"), ("full", 6, "mean"),
                                             ("random_graph", 9, "dense"), ("random_peer", 33, "neighbours"),
                                             ("random_graph:0.5", 20, "dense"), ("ring:2", 256, "neighbours"),
                                             ("exponential", 16, "neighbours")])
def test_mixing_is_the_product_with_the_mixing_matrix(topology, n, kind):
    topo = topologies.from_name(topology, n, seed=1)
    w = MixingMatrix.of(topo.mixing_matrix(0))
    assert w.kind == kind
    x = torch.randn(n, 37, dtype=torch.float64)
    want = torch.from_numpy(topo.mixing_matrix(0)) @ x
    w.apply_(x)
    torch.testing.assert_close(x, want)


def test_neighbour_mixing_of_learners_with_different_numbers_of_neighbours_is_the_product():
    # rows with 0, 1, 2, 3 and 5 non-zero entries, in no order
    rng = np.random.default_rng(0)
    n, counts = 12, [3, 0, 5, 1, 2, 3, 1, 5, 0, 2, 3, 1]
    w = np.zeros((n, n))
    for j, c in enumerate(counts):
        w[j, rng.choice(n, c, replace=False)] = rng.uniform(0.1, 1.0, c)
    mixing = MixingMatrix.by_neighbours(w)
    assert mixing.kind == "neighbours"
    for dtype, tolerance in ((torch.float64, {}), (torch.float32, {"rtol": 1e-6, "atol": 1e-6})):
        x = torch.randn(n, 1000, dtype=torch.float64)
        want = (torch.from_numpy(w) @ x).to(dtype)
        x = x.to(dtype)
        mixing.apply_(x)
        torch.testing.assert_close(x, want, **tolerance)


def test_neighbour_mixing_equals_each_learners_own_weighted_sum():
    # the learner-by-learner definition, w_s,j = sum_k W_jk w_k over j's non-zero entries, in float32
    topo = topologies.from_name("ring:2", 40)
    w = topo.mixing_matrix(0)
    x = torch.randn(40, 513)
    want = torch.stack([sum(float(w[j, k]) * x[k] for k in np.flatnonzero(w[j])) for j in range(40)])
    MixingMatrix.of(w).apply_(x)
    torch.testing.assert_close(x, want, rtol=1e-6, atol=1e-6)


def test_neighbour_mixing_reads_only_the_rows_a_learner_gives_weight():
    n = 20
    x = torch.randn(n, 8)
    x[10] = float("inf")  # a product would give every learner 0 * inf = NaN
    want = torch.from_numpy(topologies.ring(n).mixing_matrix()).float() @ torch.where(x.isfinite(), x, 0)
    mixing = MixingMatrix.of(topologies.ring(n).mixing_matrix())
    assert mixing.kind == "neighbours"
    mixing.apply_(x)
    assert bool(x[9:12].isinf().all())
    others = [j for j in range(n) if j not in (9, 10, 11)]
    torch.testing.assert_close(x[others], want[others])


def test_random_peer_mixes_with_the_matching_drawn_for_each_step():
    topo = topologies.RandomPeer(6, seed=4)
    p = torch.nn.Parameter(torch.randn(6, 3, 2, dtype=torch.float64))
    averager = StackedAverager([p], topo)
    for step in range(3):
        before = p.detach().clone()
        averager.start(step)
        averager.finish()
        partner = topo.partners(step)
        torch.testing.assert_close(p.detach(), (before + before[partner]) / 2)


def test_parameters_whose_learner_rows_are_scattered_in_memory_are_mixed_too():
    n = 4
    p = torch.nn.Parameter(torch.randn(3, n).t())  # shape (n, 3), learner j's elements n apart in memory
    want = torch.from_numpy(topologies.ring(n).mixing_matrix()).float() @ p.detach()
    averager = StackedAverager([p], topologies.ring(n))
    averager.start(0)
    averager.finish()
    torch.testing.assert_close(p.detach(), want)
