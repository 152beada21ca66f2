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
