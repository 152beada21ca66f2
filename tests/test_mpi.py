"""Multi-process invariants of DistributedOptimizer, through real horovodrun + MPI jobs.

One horovodrun launch per world size runs every check in tests/mpi/checks.py (start-up
dominates); the tests below assert on its JSON report.
"""

import json

import pytest

from launch import horovodrun

pytestmark = pytest.mark.mpi
SIZES = (2, 3, 4)


@pytest.fixture(scope="module", params=SIZES, ids=lambda n: f"np{n}")
def report(request, tmp_path_factory):
    out = tmp_path_factory.mktemp(f"np{request.param}") / "report.json"
    proc = horovodrun(request.param, ["tests/mpi/checks.py", str(out)], timeout=300)
    assert proc.returncode == 0, proc.stdout[-5000:]
    results = json.loads(out.read_text())
    assert results["size"] == request.param
    return results


def result(report, name):
    r = report[name]
    assert "error" not in r, r.get("error")
    return r


@pytest.mark.parametrize("topology", ["ring", "random_peer", "exponential", "random_graph", "ring_passes2",
                                      "user_matrix", "sparse_gradients", "ring_no_comm_thread"])
def test_dpsgd_equals_single_process_reference(report, topology):
    r = result(report, f"reference_{topology}")
    assert r["max_abs_diff"] <= 1e-6
    assert r["steps"] == 6
    assert r["learner_spread"] > 1e-4, "learners should hold different weights under DPSGD"


@pytest.mark.parametrize("topology", ["one_peer_exponential", "periodic_ring", "local_sgd", "hierarchical",
                                      "hierarchical_leader", "hierarchical_uneven", "periodic_hierarchical",
                                      "hierarchical_no_comm_thread"])
def test_new_topologies_equal_the_single_process_reference(report, topology):
    r = result(report, f"reference_{topology}")
    assert r["max_abs_diff"] <= 1e-6
    assert r["steps"] == 6
    assert r["learner_spread"] > 1e-4, "learners should hold different weights under DPSGD"


@pytest.mark.parametrize("name", ["random_peer", "hierarchical"])
def test_fp16_compression_of_the_exchanged_weights_stays_close_to_the_reference(report, name):
    r = result(report, f"reference_{name}_fp16_wire")
    assert 0 < r["max_abs_diff"] <= 5e-3  # peers' weights travel in float16 (about 3 significant digits)


def test_the_default_topology_on_one_host_is_the_papers_random_peer(report):
    assert result(report, "auto_topology_on_one_host")["name"] == "random peer"


def test_full_averaging_gives_global_mean_minus_own_update(report):
    assert result(report, "full_averaging")["max_abs_diff"] <= 1e-6


def test_random_peer_matching_is_the_same_on_all_ranks(report):
    assert result(report, "random_peer_matching_consistent")["consistent"]


def test_ssgd_mode_equals_horovod(report):
    r = result(report, "ssgd_equals_horovod")
    assert r["max_abs_diff"] == 0.0
    assert r["replica_spread"] == 0.0


@pytest.mark.parametrize("variant", ["horovod", "dpsgd"])
def test_horovod_script_runs_with_only_the_constructor_changed(report, variant):
    r = result(report, f"dropin_{variant}")
    assert r["class"] == "SGD" and r["is_sgd"]
    assert r["lr"] == pytest.approx(0.2 * report["size"] / 4)  # StepLR halved it twice
    assert r["last_loss"] < r["first_loss"]
    assert r["roundtrip_diff"] == 0.0


@pytest.mark.parametrize("name,exc,words", [
    ("error_topology_size", "TopologyError", "build it with size="),
    ("error_matrix_size", "TopologyError", "-np"),
    ("error_unknown_topology", "TopologyError", "choose one of"),
    ("error_models_differ", "ParameterMismatchError", "same model"),
    ("error_unknown_algorithm", "ValueError", "choose one of"),
    ("error_checkpoint_world_size", "CheckpointError", "resume with -np"),
    ("error_nonfinite_raise", "NonFiniteError", "at step 2"),
])
def test_bad_input_gets_a_clear_error(report, name, exc, words):
    r = result(report, name)
    assert r["raised"] == exc
    assert words in r["message"]


def test_nonfinite_skip_skips_only_the_affected_learners_update(report):
    r = result(report, "nonfinite_skip")
    assert r["skipped"] == [1] + [0] * (report["size"] - 1)
    assert r["finite"]


def test_gaussian_noise_keeps_ssgd_replicas_identical(report):
    r = result(report, "noise_ssgd_replicas_identical")
    assert r["replica_spread"] == 0.0
    assert r["noise_effect"] > 1e-3


def test_callbacks_see_own_then_mixed_then_updated_then_final_weights(report):
    r = result(report, "callback_contract")
    assert r["order"] == [["before_mixing", "after_mixing", "after_update", "step_end", True, True, True]] * 3
    assert r["max_abs_diff"] <= 1e-6
    assert r["noise_seen_at_step_end"] > 1e-4   # on_step_end sees the noise a later callback added


def test_noise_diagnostics_measure_eq3_on_the_displacement_of_the_mean(report):
    r = result(report, "diagnostics_measure_the_displacement_of_the_mean")
    assert r["step"] == 4 and len(r["got"]) == 2
    for got, want in zip(r["got"], r["want"]):
        assert got == pytest.approx(want, rel=1e-3)


def test_non_floating_parameters_are_not_exchanged_or_changed(report):
    r = result(report, "frozen_integer_parameter_left_alone")
    assert r == {"counter": [0, 1, 2], "steps": 3}


def test_a_dropped_optimizer_stops_its_communication_thread(report):
    r = result(report, "dropped_optimizers_stop_their_threads")
    assert r["after"] <= r["before"], r


def test_checkpoint_resume_reproduces_the_uninterrupted_run_bit_for_bit(report):
    r = result(report, "checkpoint_resume_bit_exact")
    assert r["diff"] == 0.0
    assert r["extra"] == {"epoch": 3}
    n = report["size"]
    assert r["files"] == [f"learner-{j:05d}-of-{n:05d}.pt" for j in range(n)]  # no temporary files left


def test_a_save_interrupted_after_some_learners_wrote_keeps_the_previous_checkpoint(report):
    r = result(report, "checkpoint_interrupted_save_keeps_the_previous_one")
    assert r["extra"] == {"step": 2} and r["diff"] == 0.0
    assert r["after"] == {"step": 4} and r["step"] == 4
    assert r["entries"] == ["last"]  # the partial save was replaced, nothing left beside the checkpoint


GLOO_SCRIPT = """
import torch, horovod.torch as hvd, horovod_dpsgd as hd
hvd.init()
model = torch.nn.Linear(2, 2)
hd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1))
"""


def test_gloo_launch_stops_with_an_error_naming_the_fix():
    proc = horovodrun(2, ["-c", GLOO_SCRIPT], extra=["--gloo"], timeout=120)
    assert proc.returncode != 0
    assert "MPIEnvironmentError" in proc.stdout
    assert "without --gloo" in proc.stdout


def test_plain_python_stops_with_an_error_naming_the_fix():
    from launch import run
    import sys
    proc = run([sys.executable, "-c", GLOO_SCRIPT], timeout=120)
    assert proc.returncode != 0
    assert "MPIEnvironmentError" in proc.stdout and "horovodrun -np N" in proc.stdout


def test_init_with_mpi_comm_world_and_plugin_imported_first(tmp_path):
    out = tmp_path / "report.json"
    proc = horovodrun(2, ["tests/mpi/init_variants.py", str(out)], timeout=180)
    assert proc.returncode == 0, proc.stdout[-5000:]
    r = json.loads(out.read_text())
    assert r["mpi_size"] == 2 and r["max_abs_diff"] <= 1e-6
