"""The simulator agrees with the real MPI run: each test asserts on one named check of
tests/parallel/checks/sim.py (the same training over MPI and, on rank 0, in horovod_dpsgd.sim), at np 2, 3, 4.
"""

import pytest

pytestmark = [pytest.mark.mpi, pytest.mark.checks("sim", sizes=(2, 3, 4))]
TOLERANCE = 1e-5  # relative, after 8 steps: float32 rounding of differently ordered sums
#: Relative, on every logged value. Delta (|dW_a|^2 - alpha_e^2 |g|^2) and Delta^(2) are differences of nearly
#: equal float32-based terms, so the weights' rounding differences are amplified there.
DIAGNOSTICS_TOLERANCE = 1e-3


DPSGD_CASES = [f"dpsgd_{topology}_{optimizer}" for topology in ("ring", "random_peer", "exponential", "full")
               for optimizer in ("sgd", "momentum")] + ["dpsgd_ring_noise"]


@pytest.mark.parametrize("check", DPSGD_CASES)
def test_simulated_learners_hold_the_mpi_ranks_weights_under_dpsgd(result):
    r = result
    assert r["rel_diff"] <= TOLERANCE
    assert r["learner_spread"] > 1e-4, "DPSGD learners apply their own gradients, so their weights differ"


@pytest.mark.parametrize("check", ["ssgd_sgd", "ssgd_momentum", "ssgd_noise"])
def test_simulated_learners_hold_the_mpi_ranks_weights_under_ssgd(result):
    r = result
    assert r["rel_diff"] <= TOLERANCE
    assert r["learner_spread"] == 0.0, "SSGD replicas are identical"


@pytest.mark.parametrize("check", DPSGD_CASES + ["ssgd_sgd", "ssgd_momentum", "ssgd_noise"])
def test_callbacks_see_in_learner_j_what_they_see_in_rank_j(result, size):
    seen = result["callbacks"]
    assert seen["same_records"], seen
    assert seen["records"] == 4 * 8 * size  # 4 hooks, 8 steps, every learner
    assert seen["max_rel_diff"] <= TOLERANCE


DIAGNOSTICS_CASES = ["diagnostics_dpsgd_ring_momentum_noise", "diagnostics_dpsgd_full", "diagnostics_dpsgd_random_peer",
                     "diagnostics_ssgd_noise"]


@pytest.mark.parametrize("check", DIAGNOSTICS_CASES)
def test_noise_diagnostics_of_the_simulated_learners_equal_the_mpi_runs(result):
    r = result
    measured = r["diagnostics"]
    assert measured["same_keys"], measured
    assert measured["steps"] == [2, 4, 6, 8]
    assert {"alpha_e_over_alpha", "delta", "consensus_distance", "delta2", "loss"} <= set(measured["keys"])
    assert measured["max_rel_diff"] <= DIAGNOSTICS_TOLERANCE, measured["worst"]
    assert r["rel_diff"] <= TOLERANCE
