"""Multi-process invariants of DistributedOptimizer: each test asserts on one named check of
tests/parallel/checks/optimizer.py, run on real horovodrun + MPI jobs of 2, 3 and 4 processes.

The harness (tests/parallel/conftest.py) runs the checks of the selected tests in one job per world size.
"""

import pytest

pytestmark = [pytest.mark.mpi, pytest.mark.checks("optimizer", sizes=(2, 3, 4))]


@pytest.mark.parametrize("check", [f"reference_{topology}" for topology in (
    "ring", "random_peer", "exponential", "random_graph", "ring_passes2", "user_matrix", "sparse_gradients",
    "ring_no_comm_thread")])
def test_dpsgd_equals_single_process_reference(result):
    assert result["max_abs_diff"] <= 1e-6
    assert result["steps"] == 6
    assert result["learner_spread"] > 1e-4, "learners should hold different weights under DPSGD"


@pytest.mark.parametrize("check", ["reference_random_peer_fp16_wire"])
def test_fp16_compression_of_the_exchanged_weights_stays_close_to_the_reference(result):
    assert 0 < result["max_abs_diff"] <= 5e-3  # peers' weights travel in float16 (about 3 significant digits)


@pytest.mark.parametrize("check", ["full_averaging"])
def test_full_averaging_gives_global_mean_minus_own_update(result):
    assert result["max_abs_diff"] <= 1e-6


@pytest.mark.parametrize("check", ["random_peer_matching_consistent"])
def test_random_peer_matching_is_the_same_on_all_ranks(result):
    assert result["consistent"]


@pytest.mark.parametrize("check", ["ssgd_equals_horovod"])
def test_ssgd_mode_equals_horovod(result):
    assert result["max_abs_diff"] == 0.0
    assert result["replica_spread"] == 0.0


@pytest.mark.parametrize("check", ["dropin_horovod", "dropin_dpsgd"])
def test_horovod_script_runs_with_only_the_constructor_changed(result, size):
    assert result["class"] == "SGD" and result["is_sgd"]
    assert result["lr"] == pytest.approx(0.2 * size / 4)  # StepLR halved it twice
    assert result["last_loss"] < result["first_loss"]
    assert result["roundtrip_diff"] == 0.0


@pytest.mark.parametrize("check,exc,words", [
    ("error_topology_size", "TopologyError", "build it with size="),
    ("error_matrix_size", "TopologyError", "-np"),
    ("error_unknown_topology", "TopologyError", "choose one of"),
    ("error_models_differ", "ParameterMismatchError", "same model"),
    ("error_unknown_algorithm", "ValueError", "choose one of"),
    ("error_checkpoint_world_size", "CheckpointError", "resume with -np"),
    ("error_nonfinite_raise", "NonFiniteError", "at step 2"),
])
def test_bad_input_gets_a_clear_error(result, exc, words):
    assert result["raised"] == exc
    assert words in result["message"]


@pytest.mark.parametrize("check", ["nonfinite_skip"])
def test_nonfinite_skip_skips_only_the_affected_learners_update(result, size):
    assert result["skipped"] == [1] + [0] * (size - 1)
    assert result["finite"]


@pytest.mark.parametrize("check", ["noise_ssgd_replicas_identical"])
def test_gaussian_noise_keeps_ssgd_replicas_identical(result):
    assert result["replica_spread"] == 0.0
    assert result["noise_effect"] > 1e-3


@pytest.mark.parametrize("check", ["callback_contract"])
def test_callbacks_see_own_then_mixed_then_updated_then_final_weights(result):
    assert result["order"] == [["before_mixing", "after_mixing", "after_update", "step_end", True, True, True]] * 3
    assert result["max_abs_diff"] <= 1e-6
    assert result["noise_seen_at_step_end"] > 1e-4   # on_step_end sees the noise a later callback added


@pytest.mark.parametrize("check", ["diagnostics_measure_the_displacement_of_the_mean"])
def test_noise_diagnostics_measure_eq3_on_the_displacement_of_the_mean(result):
    assert result["step"] == 4 and len(result["got"]) == 2
    for got, want in zip(result["got"], result["want"]):
        assert got == pytest.approx(want, rel=1e-3)


@pytest.mark.parametrize("check", ["frozen_integer_parameter_left_alone"])
def test_non_floating_parameters_are_not_exchanged_or_changed(result):
    assert result == {"counter": [0, 1, 2], "steps": 3}


@pytest.mark.parametrize("check", ["dropped_optimizers_stop_their_threads"])
def test_a_dropped_optimizer_stops_its_communication_thread(result):
    assert result["after"] <= result["before"], result


@pytest.mark.parametrize("check", ["checkpoint_resume_bit_exact"])
def test_checkpoint_resume_reproduces_the_uninterrupted_run_bit_for_bit(result, size):
    assert result["diff"] == 0.0
    assert result["extra"] == {"epoch": 3}
    # one file per learner and the manifest; no temporary files left
    assert result["files"] == [f"learner-{j:05d}-of-{size:05d}.s000001.pt" for j in range(size)] + ["manifest.json"]


@pytest.mark.parametrize("check", ["nan_weights_skip_ring", "nan_weights_skip_random_peer", "nan_weights_skip_full",
                                   "nan_weights_skip_hierarchical"])
def test_nan_weights_of_one_learner_are_kept_out_of_every_mix_with_nonfinite_skip(result, size, check):
    """issue 15: learner 1's weights turn NaN before step 2 (nonfinite="skip"); every rank's view."""
    ranks, topology = result, check[len("nan_weights_skip_"):]
    assert all(r["finite"] for r in ranks), ranks          # contained: nobody ends NaN, the victim rejoined
    for rank, r in enumerate(ranks):
        assert r["diff"] is None or r["diff"] <= 1e-6, (rank, r)
        if "1" in r["rejected"]:                              # whoever left rank 1 out said so, naming the step
            step = "at step 2" if topology != "random_peer" else "at step "  # a random peer may match it later
            assert any(f"rank {rank}: left " in w and (" from rank 1 " in w or rank == 1) and step in w
                       for w in r["warnings"]), r["warnings"]
    # its gradient, taken at NaN weights, was NaN: once, or while a random peer left it unmatched
    assert ranks[1]["skipped"] == 1 if topology != "random_peer" else ranks[1]["skipped"] >= 1
    if topology != "random_peer":
        neighbours = set(range(size)) if topology in ("full", "hierarchical") else {0, 1, 2 % size}
        assert all(r["diff"] is not None for r in ranks)
        assert [r["rejected"] for r in ranks] == [{"1": 1} if j in neighbours else {} for j in range(size)]


@pytest.mark.parametrize("check", ["nan_weights_raise_ring", "nan_weights_raise_full", "nan_weights_raise_hierarchical"])
def test_nan_weights_raise_on_every_learner_that_received_them_naming_the_source_and_step(result, size, check):
    """issue 15: as above with nonfinite="raise", stopping at step 2: who raised, saying what."""
    neighbours = set(range(size)) if check.endswith(("full", "hierarchical")) else {0, 1, 2 % size}
    for rank, r in enumerate(result):
        if rank == 1:  # the source: its gradient at NaN weights (ring), or the allreduce naming it (full)
            assert r["error"].startswith("rank 1: ") and "at step 2" in r["error"], r
        elif rank in neighbours:
            assert f"rank {rank}: at step 2 the weights of rank 1 are NaN or infinite" in r["error"], r
            assert r["finite"]                                 # the NaN did not reach it
        else:
            assert r["error"] is None and r["finite"]          # not a neighbour: nothing reached it yet
