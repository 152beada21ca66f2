"""The one-peer exponential graph, periodic global averaging, local SGD and the hierarchical topology equal
the single-process reference at 2, 3 and 4 processes (tests/parallel/checks/topologies.py)."""

import pytest

pytestmark = [pytest.mark.mpi, pytest.mark.checks("topologies", sizes=(2, 3, 4))]


@pytest.mark.parametrize("check", [f"reference_{topology}" for topology in (
    "one_peer_exponential", "periodic_ring", "local_sgd", "hierarchical", "hierarchical_leader",
    "hierarchical_uneven", "periodic_hierarchical", "hierarchical_no_comm_thread")])
def test_topology_equals_single_process_reference(result):
    assert result["max_abs_diff"] <= 1e-6
    assert result["steps"] == 6
    assert result["learner_spread"] > 1e-4, "learners should hold different weights under DPSGD"


@pytest.mark.parametrize("check", ["reference_hierarchical_fp16_wire"])
def test_hierarchical_fp16_wire_stays_close_to_the_reference(result):
    assert 0 < result["max_abs_diff"] <= 5e-3  # host sums travel in float16 (about 3 significant digits)


@pytest.mark.parametrize("check", ["auto_topology_on_one_host"])
def test_the_default_topology_on_one_host_is_the_papers_random_peer(result):
    assert result["name"] == "random peer"
