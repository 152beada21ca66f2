"""The communication model of benchmarks/scaling.py (docs/performance.md quotes its predictions)."""

import importlib.util
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location(
    "scaling", Path(__file__).resolve().parents[2] / "benchmarks" / "scaling.py")
scaling = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(scaling)

S = 1e8


@pytest.mark.parametrize("n", [2, 4, 8, 64])
def test_a_random_peer_sends_the_model_once_in_one_hop_whatever_n(n):
    assert scaling.cost("random_peer", n, S) == (S, 1)


@pytest.mark.parametrize("n", [2, 4, 8, 64])
def test_a_ring_allreduce_sends_2_n_minus_1_over_n_of_the_model_in_2_n_minus_1_hops(n):
    assert scaling.cost("ring_allreduce", n, S) == pytest.approx((2 * (n - 1) / n * S, 2 * (n - 1)))


def test_graphs_cost_their_largest_degree_and_a_graph_that_links_everyone_is_an_allreduce():
    assert scaling.cost("ring", 8, S) == (2 * S, 1)
    assert scaling.cost("exponential", 8, S) == (5 * S, 1)   # 1, 2, 4 ahead and 1, 2 behind (4 is both)
    assert scaling.cost("ring", 3, S) == scaling.cost("ring_allreduce", 3, S)
    assert scaling.cost("exponential", 4, S) == scaling.cost("ring_allreduce", 4, S)


def test_the_fit_recovers_latency_and_bandwidth_and_shared_cores_divide_the_bandwidth():
    alpha, beta = 5e-6, 4e9
    points = [(b, alpha + b / beta) for b in (1e3, 1e5, 1e7, 6e7)]
    assert scaling.fit(points) == pytest.approx((alpha, beta), rel=1e-9)
    alone = scaling.predict("random_peer", 4, S, alpha, beta)
    shared = scaling.predict("random_peer", 4, S, alpha, beta, cores=2)
    assert shared - alpha == pytest.approx(2 * (alone - alpha))


def test_the_host_aware_fit_recovers_alpha_and_beta_per_link_rate_from_step_times():
    alpha, beta = {"1gbit": 0.2, "none": 0.01}, {"1gbit": 1.2e8, "none": 1e9}
    rows = []
    for rate in alpha:
        for compute in (0.4, 0.7):
            link = {"horovod_ssgd": 45.0, "dpsgd_default": 22.4, "dpsgd_random_peer": 75.0}
            ms = {v: 1e3 * (compute + alpha[rate] + mb * 1e6 / beta[rate]) for v, mb in link.items()}
            rows.append({"layout": "2x2", "rate": rate, "model": "resnet18", "ms": {**ms, "local_no_comm": 1e3 * compute},
                         "link_MB": {v: [mb, mb / 2] for v, mb in link.items()}})
    fits, points = scaling.fit_hosts(rows)
    for rate in alpha:
        assert fits[rate] == pytest.approx((alpha[rate], beta[rate]), rel=1e-9)
    assert len(points) == 12 and all(p == pytest.approx(m, rel=1e-9) for _, _, p, m in points)
