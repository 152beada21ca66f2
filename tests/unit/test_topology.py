"""Mixing-matrix math of horovod_dpsgd.topology (no MPI)."""

import numpy as np
import pytest

from horovod_dpsgd import topology as T
from horovod_dpsgd.errors import TopologyError


def assert_valid(w, n):
    assert w.shape == (n, n)
    np.testing.assert_allclose(w, w.T, atol=1e-12)
    np.testing.assert_allclose(w.sum(0), 1.0, atol=1e-12)
    np.testing.assert_allclose(w.sum(1), 1.0, atol=1e-12)
    assert (w >= 0).all()
    assert T.spectral_gap(w) > 0  # connected


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 8, 16])
@pytest.mark.parametrize("build", [T.ring, lambda n: T.ring(n, 2), T.exponential, T.full,
                                   lambda n: T.random_graph(n, 0.3, seed=1)])
def test_static_topologies_are_doubly_stochastic_and_connected(n, build):
    topo = build(n)
    assert_valid(topo.mixing_matrix(), n)
    for j in range(n):  # plans agree with the matrix
        p = topo.plan(j, 0)
        row = np.zeros(n)
        row[j] = p.self_weight
        row[list(p.peers)] = p.peer_weights
        np.testing.assert_allclose(row, topo.mixing_matrix()[j], atol=1e-12)


def test_ring_weights_are_uniform():
    w = T.ring(6, k=2).mixing_matrix()  # paper Sec. 2.2: 2 neighbours on each side
    np.testing.assert_allclose(w[0], [0.2, 0.2, 0.2, 0, 0.2, 0.2])
    assert T.ring(2).plan(0, 0).peers == (1,)  # coinciding neighbours counted once


def test_full_averaging_is_collective_and_has_gap_one():
    topo = T.full(4)
    assert topo.plan(0, 0).collective
    assert topo.spectral_gap() == pytest.approx(1.0)
    assert not T.ring(4).plan(0, 0).collective


def test_spectral_gap_of_ring_matches_closed_form():
    n = 8  # W = (I + S + S^T)/3: eigenvalues (1 + 2 cos(2 pi k / n)) / 3
    lam = sorted(abs((1 + 2 * np.cos(2 * np.pi * k / n)) / 3) for k in range(n))[::-1]
    assert T.ring(n).spectral_gap() == pytest.approx(1 - lam[1])


@pytest.mark.parametrize("n", [2, 3, 4, 5, 7, 8])
def test_random_peer_is_a_matching_every_step(n):
    topo = T.RandomPeer(n, seed=5)
    for t in range(200):
        partner = topo.partners(t)
        assert (partner[partner] == np.arange(n)).all()  # an involution: j <-> partner[j]
        assert (partner == np.arange(n)).sum() == n % 2  # odd sizes leave exactly one learner alone
        assert_valid(topo.mixing_matrix(t), n) if n == 2 else np.testing.assert_allclose(
            topo.mixing_matrix(t).sum(1), 1.0)


def test_random_peer_is_deterministic_in_seed_and_step_and_varies():
    a, b = T.RandomPeer(8, seed=1), T.RandomPeer(8, seed=1)
    assert all((a.partners(t) == b.partners(t)).all() for t in range(20))
    assert len({tuple(a.partners(t)) for t in range(20)}) > 5
    assert not all((a.partners(t) == T.RandomPeer(8, seed=2).partners(t)).all() for t in range(20))


@pytest.mark.parametrize("n", [4, 5])
def test_random_peer_expected_matrix_matches_empirical_mean(n):
    topo = T.RandomPeer(n, seed=0)
    mean = np.mean([topo.mixing_matrix(t) for t in range(20000)], axis=0)
    np.testing.assert_allclose(mean, topo.expected_mixing_matrix(), atol=0.01)
    assert_valid(topo.expected_mixing_matrix(), n)


@pytest.mark.parametrize("matrix,words", [
    (np.array([[0.5, 0.5], [0.4, 0.6]]), "not symmetric"),
    (np.array([[0.6, 0.5], [0.5, 0.6]]), "not doubly stochastic"),
    (np.eye(3), "not connected"),
    (np.array([[1.5, -0.5], [-0.5, 1.5]]), "negative"),
    (np.ones((2, 3)) / 3, "square"),
    (np.array([[np.nan, 1], [1, 0]]), "NaN"),
])
def test_invalid_mixing_matrices_are_rejected_with_the_reason(matrix, words):
    with pytest.raises(TopologyError, match=words):
        T.from_mixing_matrix(matrix)


def test_mixing_matrix_size_must_match_world():
    with pytest.raises(TopologyError, match="launch with -np 3"):
        T.from_name(T.full(3).mixing_matrix(), size=4)
    with pytest.raises(TopologyError, match="size=4"):
        T.from_name(T.ring(3), size=4)


def test_from_graph_builds_metropolis_hastings_weights():
    topo = T.from_graph([(0, 1), (1, 2), (2, 3)])  # a path: degrees 1, 2, 2, 1
    w = topo.mixing_matrix()
    assert_valid(w, 4)
    assert w[0, 1] == pytest.approx(1 / 3) and w[1, 2] == pytest.approx(1 / 3)
    with pytest.raises(TopologyError, match="not connected"):
        T.from_graph([(0, 1), (2, 3)])


@pytest.mark.parametrize("spec,cls_name", [("ring", "ring (k=1)"), ("ring:2", "ring (k=2)"),
                                           ("exponential", "exponential graph"), ("full", "full averaging"),
                                           ("random_graph:0.9", "random graph (p=0.9)"),
                                           ("random_peer", "random peer")])
def test_from_name(spec, cls_name):
    assert T.from_name(spec, size=6).name == cls_name


@pytest.mark.parametrize("spec", ["torus", "ring:x", "ring:0", "random_graph:2"])
def test_from_name_rejects_bad_specs(spec):
    with pytest.raises(TopologyError):
        T.from_name(spec, size=4)


def test_str_shows_neighbours_and_spectral_gap():
    text = str(T.ring(4))
    assert "spectral gap" in text and "rank 0: self 0.333; peers 1 (0.333), 3 (0.333)" in text
    assert "expected mixing matrix" in str(T.RandomPeer(4))


# -- directed topologies: doubly stochastic without symmetry ---------------------------------------------------

def assert_doubly_stochastic(w, n):
    assert w.shape == (n, n) and (w >= 0).all()
    np.testing.assert_allclose(w.sum(0), 1.0, atol=1e-12)
    np.testing.assert_allclose(w.sum(1), 1.0, atol=1e-12)


def test_directed_matrices_need_directed_true_and_doubly_stochastic_columns():
    cycle = 0.5 * (np.eye(3) + np.roll(np.eye(3), 1, axis=1))  # j averages with j + 1: doubly stochastic
    with pytest.raises(TopologyError, match="not symmetric.*directed=True"):
        T.from_mixing_matrix(cycle)
    topo = T.from_mixing_matrix(cycle, directed=True)
    assert topo.directed
    assert topo.plan(0, 0).peers == (1,) and topo.plan(0, 0).send_to == (2,)
    row_stochastic = np.array([[0.5, 0.5, 0], [0.5, 0.5, 0], [0.5, 0, 0.5]])  # columns sum to 1.5, 0.5, 1
    with pytest.raises(TopologyError, match="column 0 sums to 1.5"):
        T.from_mixing_matrix(row_stochastic, directed=True)
    one_way = np.array([[1.0, 0.0], [0.0, 1.0]])
    with pytest.raises(TopologyError, match="not connected"):
        T.from_mixing_matrix(one_way, directed=True)


def test_spectral_gap_of_a_directed_matrix_is_one_minus_its_norm_off_consensus():
    n = 8
    w = 0.5 * (np.eye(n) + np.roll(np.eye(n), 1, axis=1))  # eigenvalues (1 + e^(2 pi i k/n)) / 2, normal
    assert T.spectral_gap(w) == pytest.approx(1 - abs(1 + np.exp(2j * np.pi / n)) / 2)


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 6, 8, 16])
def test_one_peer_exponential_graph(n):
    topo = T.OnePeerExponential(n)
    tau = max(1, int(np.ceil(np.log2(n)))) if n > 1 else 1
    assert topo.period == tau
    topo.validate()
    for t in range(2 * tau):
        w = topo.mixing_matrix(t)
        assert_doubly_stochastic(w, n)
        for j in range(n):
            p = topo.plan(j, t)
            if n > 1:  # Ying et al. 2021: receive from j + 2^(t mod tau), send to j - 2^(t mod tau)
                assert p.peers == ((j + 2 ** (t % tau)) % n,) and p.peer_weights == (0.5,)
                assert p.destinations == ((j - 2 ** (t % tau)) % n,)
    if n >= 3:
        assert topo.directed and not np.allclose(topo.mixing_matrix(0), topo.mixing_matrix(0).T)
    if n & (n - 1) == 0:  # a power of two: one period multiplies to the exact average
        assert T.consensus_contraction(topo.mixing_matrix(t) for t in range(tau)) == pytest.approx(0, abs=1e-12)
    else:
        assert 0 < T.consensus_contraction(topo.mixing_matrix(t) for t in range(tau)) < 1


# -- periodic global averaging (Gossip-PGA) and local SGD -------------------------------------------------------

@pytest.mark.parametrize("spec,base", [("periodic:4:ring", "ring (k=1)"), ("periodic:3:one_peer_exponential",
                                                                         "one-peer exponential graph"),
                                       ("local_sgd:4", None), ("periodic:3", "random peer")])
def test_periodic_global_averaging(spec, base):
    n = 6
    topo = T.from_name(spec, size=n, seed=2)
    h = topo.every
    assert (topo.base.name if topo.base is not None else None) == base
    topo.validate(steps=4 * h)
    for t in range(4 * h):
        w, plan = topo.mixing_matrix(t), topo.plan(1, t)
        if (t + 1) % h == 0:
            np.testing.assert_allclose(w, np.full((n, n), 1 / n))
            assert plan.collective and len(plan.peers) == n - 1
        elif base is None:
            np.testing.assert_allclose(w, np.eye(n))  # local SGD: no communication between the averages
            assert plan.peers == () and plan.self_weight == 1.0
        else:
            np.testing.assert_allclose(w, topo.base.mixing_matrix(t))
    empirical = np.mean([topo.mixing_matrix(t) for t in range(2000 * h)], axis=0)
    np.testing.assert_allclose(empirical, topo.expected_mixing_matrix(), atol=0.01)


@pytest.mark.parametrize("spec,words", [("periodic", "period"), ("periodic:0", ">= 1"),
                                        ("local_sgd:4:ring", "periodic:4:ring"), ("periodic:x", "bad argument"),
                                        ("full:2", "takes no argument"), ("hierarchical", "hierarchical:2x4"),
                                        ("hierarchical:3x2", "has 6 ranks but the job has 4"),
                                        ("hierarchical:2y2", "bad host layout")])
def test_bad_specs_name_the_fix(spec, words):
    with pytest.raises(TopologyError, match=words):
        T.from_name(spec, size=4)


# -- host layouts and the hierarchical topology ------------------------------------------------------------------

def test_host_layouts():
    assert T.HostLayout.parse("2x3").hosts == ((0, 1, 2), (3, 4, 5))
    assert T.HostLayout.parse("3,1").hosts == ((0, 1, 2), (3,))
    by_name = T.HostLayout.from_host_names(["b", "a", "b", "a"])
    assert by_name.hosts == ((0, 2), (1, 3)) and by_name.names == ("b", "a")
    assert by_name.host_of(3) == 1 and by_name.local_index(3) == 1 and by_name.where(3) == "rank 3 (a)"
    assert by_name.describe() == "2 hosts x 2 processes"
    assert T.HostLayout.parse("3,1").describe() == "2 hosts of 3, 1 processes"
    with pytest.raises(TopologyError, match="once each"):
        T.HostLayout([[0, 1], [1, 2]])


@pytest.mark.parametrize("sizes", [(2, 2), (4, 4, 4, 4), (2, 1, 3), (1, 1, 1, 1), (3,), (2, 2, 2)])
def test_hierarchical_averages_each_host_with_its_peer_host(sizes):
    layout = T.HostLayout.from_sizes(sizes)
    topo = T.Hierarchical(layout, seed=4)
    n = layout.size
    steps = 1 if len(sizes) <= 2 else 40
    topo.validate(steps=steps)  # doubly stochastic and symmetric, plans = rows, connected over the steps
    for t in range(steps):
        w = topo.mixing_matrix(t)
        assert_valid(w, n) if len(sizes) <= 2 else assert_doubly_stochastic(w, n)
        partner = topo.host_partners(t)
        for j in range(n):
            h = layout.host_of(j)
            group = [k for g in {h, int(partner[h])} for k in layout.hosts[g]]
            expected = np.zeros(n)
            expected[group] = 1 / len(group)  # the uniform average of both hosts' learners
            np.testing.assert_allclose(w[j], expected)
            assert topo.plan(j, t).hosts[0] == h and set(topo.plan(j, t).hosts) == {h, int(partner[h])}
    if len(sizes) == 2:  # two hosts: the full average every step
        np.testing.assert_allclose(topo.mixing_matrix(0), np.full((n, n), 1 / n))
        assert not topo.dynamic
    if len(sizes) > 2:
        empirical = np.mean([topo.mixing_matrix(t) for t in range(8000)], axis=0)
        np.testing.assert_allclose(empirical, topo.expected_mixing_matrix(), atol=0.015)
        assert_valid(topo.expected_mixing_matrix(), n)


def test_hierarchical_shards_and_its_printout():
    layout = T.HostLayout.parse("2x4")
    assert T.Hierarchical(layout).shards == 4
    assert T.from_name("hierarchical:leader", 8, layout=layout).shards == 1
    with pytest.raises(TopologyError, match="between 1 and 4"):
        T.Hierarchical(layout, shards=5)
    text = str(T.from_name("hierarchical:2x2", size=4))
    assert "hierarchical (2 hosts x 2 processes)" in text and "host 1: ranks 2, 3" in text
    assert "rank 2: self 0.25; peers 0 (0.25), 1 (0.25), 3 (0.25)  [host 1 + host 0]" in text


@pytest.mark.parametrize("layout,expected", [
    (None, "random peer"), ("1x4", "random peer"), ("4x1", "one-peer exponential graph"),
    ("2x2", "hierarchical (2 hosts x 2 processes, across hosts every 2 steps)"),
    ("3,1", "hierarchical (2 hosts of 3, 1 processes, one sender per host, across hosts every 2 steps)"),
    ("4x2", "one-peer exponential graph"), ("3x2", "one-peer exponential graph")])
def test_the_default_topology_follows_the_host_layout(layout, expected):
    layout = T.HostLayout.parse(layout) if layout else None
    topo = T.from_name("auto", size=layout.size if layout else 4, layout=layout)
    assert topo.name == expected


def test_the_default_on_more_hosts_keeps_its_short_hops_inside_the_hosts():
    layout = T.HostLayout.parse("4x2")
    topo = T.from_name("auto", 8, layout=layout)
    # hops 1, 2, 4: learner 2h + 1 receives from 2h + 2 (next host) and sends to 2h (own host) at hop 1
    sent = [T.cross_host_bytes(topo, layout, t, 1000) for t in range(6)]
    np.testing.assert_allclose(sent, [[1000] * 4, [2000] * 4, [2000] * 4] * 2)


def test_the_default_on_two_hosts_crosses_every_second_step_half_the_allreduces_bytes():
    layout = T.HostLayout.parse("2x4")
    topo = T.from_name("auto", 8, layout=layout)
    sent = [T.cross_host_bytes(topo, layout, t, 1000) for t in range(6)]
    np.testing.assert_allclose(sent, [[0, 0], [1000, 1000]] * 3)
    np.testing.assert_allclose(topo.mixing_matrix(1), np.full((8, 8), 1 / 8))  # the full average


@pytest.mark.parametrize("layout,spec,per_host", [
    ("2x2", "hierarchical", 1.0), ("2x2", "hierarchical:leader", 1.0), ("4x2", "hierarchical", 1.0),
    ("2x2", "full", 1.0), ("2x2", "ring", 2.0), ("4x1", "ring", 2.0),
    ("4x1", "full", 1.5), ("4x2", "full", 1.5),  # an allreduce: counted as a ring allreduce's 2 (m - 1) / m
])
def test_bytes_across_hosts_per_step(layout, spec, per_host):
    layout = T.HostLayout.parse(layout)
    topo = T.from_name(spec, layout.size, layout=layout)
    for t in range(8):
        np.testing.assert_allclose(T.cross_host_bytes(topo, layout, t, 1000), per_host * 1000)
    np.testing.assert_allclose(T.cross_host_bytes(T.from_name("hierarchical", layout.size, layout=layout), layout,
                                                  0, 1000, wire=0.5), 500 if layout.num_hosts > 1 else 0)


def test_a_random_peer_sends_one_model_per_learner_whose_partner_is_on_another_host():
    layout = T.HostLayout.parse("2x2")
    topo = T.RandomPeer(4, seed=1)
    for t in range(20):
        partner = topo.partners(t)
        off = [sum(layout.host_of(int(partner[j])) != h for j in ranks) for h, ranks in enumerate(layout.hosts)]
        np.testing.assert_allclose(T.cross_host_bytes(topo, layout, t, 10), np.array(off) * 10)


@pytest.mark.parametrize("sizes,every", [((2, 2), 2), ((2, 2), 3), ((4, 2, 2, 2), 2), ((1, 3), 4)])
def test_hierarchical_every_h_steps_crosses_hosts_only_then(sizes, every):
    layout = T.HostLayout.from_sizes(sizes)
    spec = f"hierarchical:{','.join(map(str, sizes))}:every={every}"
    topo, each = T.from_name(spec, layout.size), T.Hierarchical(layout, seed=0)
    n = layout.size
    for t in range(4 * every):
        w = topo.mixing_matrix(t)
        assert_doubly_stochastic(w, n)
        if (t + 1) % every == 0:  # the steps that cross: the hierarchical W(t) itself
            np.testing.assert_allclose(w, each.mixing_matrix(t))
            assert len(topo.plan(0, t).hosts) == 2 or len(sizes) > 2
        else:  # every host averages over its own learners; nothing crosses a link
            for h, ranks in enumerate(layout.hosts):
                np.testing.assert_allclose(w[np.ix_(ranks, ranks)], 1 / len(ranks))
                assert topo.plan(ranks[0], t).hosts == (h,)
            assert not T.cross_host_bytes(topo, layout, t, 1000).any()
    topo.validate(steps=40 * every if len(sizes) > 2 else None)
    assert f"across hosts every {every} steps" in topo.name
    if len(sizes) == 2:
        assert topo.period == every
        np.testing.assert_allclose(np.mean([T.cross_host_bytes(topo, layout, t, 1000) for t in range(every)], axis=0),
                                   1000 / every)
    else:
        empirical = np.mean([topo.mixing_matrix(t) for t in range(4000)], axis=0)
        np.testing.assert_allclose(empirical, topo.expected_mixing_matrix(), atol=0.02)
    with pytest.raises(TopologyError, match=">= 1"):
        T.from_name(f"hierarchical:{','.join(map(str, sizes))}:every=0", n)
    with pytest.raises(TopologyError, match="not an integer"):
        T.from_name("hierarchical:every=x", n, layout=layout)
