"""Ranks agree before they talk, through real horovodrun jobs: one launch (np = 4) runs every case of
tests/mpi/agreement.py, in which the last rank builds the optimizer with other or invalid arguments."""

import json

import pytest

from launch import horovodrun

pytestmark = pytest.mark.mpi
NP = 4
ODD = NP - 1


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("agreement") / "report.json"
    # A short exchange timeout: a case that waited for it instead of failing at construction would show.
    proc = horovodrun(NP, ["tests/mpi/agreement.py", str(out)], timeout=240)
    assert proc.returncode == 0, proc.stdout[-5000:]
    results = json.loads(out.read_text())
    assert results["size"] == NP
    return results


def same_error_on_every_rank(ranks, exc):
    assert [r["raised"] for r in ranks] == [exc] * NP, [r.get("traceback", r) for r in ranks]
    messages = {r["message"] for r in ranks}
    assert len(messages) == 1, messages
    return messages.pop()


@pytest.mark.parametrize("case,exc,words", [
    ("invalid_topology_on_one_rank", "TopologyError", [f"rank {ODD} could not build", "a ring needs k >= 1"]),
    ("invalid_algorithm_on_one_rank", "ValueError", [f"rank {ODD} could not build", "'adpsgd'"]),
    ("invalid_timeout_on_one_rank", "ValueError", [f"rank {ODD} could not build", "timeout must be > 0"]),
])
def test_an_invalid_argument_on_one_rank_raises_the_same_error_on_every_rank(report, case, exc, words):
    message = same_error_on_every_rank(report[case], exc)
    for w in words:
        assert w in message


@pytest.mark.parametrize("case,exc,words", [
    ("different_mixing_matrices", "SettingsMismatchError",
     ["different mixing matrices", f"on rank 0 but", f"on rank {ODD}", "learner"]),
    ("different_topologies", "SettingsMismatchError", ["topology is 'ring (k=1)' on rank 0 but 'random peer' on "
                                                        f"rank {ODD}"]),
    ("different_seeds", "SettingsMismatchError", [f"seed is 0 on rank 0 but 1 on rank {ODD}"]),
    ("different_algorithms", "SettingsMismatchError", [f"algorithm is 'dpsgd' on rank 0 but 'ssgd' on rank {ODD}"]),
    ("different_backward_passes", "SettingsMismatchError",
     [f"backward_passes_per_step is 1 on rank 0 but 2 on rank {ODD}"]),
    ("different_timeouts", "SettingsMismatchError", [f"timeout is 30.0 on rank 0 but 31.0 on rank {ODD}"]),
    ("different_compression", "SettingsMismatchError",
     [f"compression is 'NoneCompressor' on rank 0 but 'FP16Compressor' on rank {ODD}"]),
    ("ssgd_different_seeds", "SettingsMismatchError", [f"seed is 0 on rank 0 but 1 on rank {ODD}"]),
    ("named_parameters_reordered", "ParameterMismatchError", ["parameter #0: rank 0 has ('layers.0.weight'",
                                                              f"rank {ODD} has ('layers.2.bias'"]),
])
def test_different_settings_raise_the_same_error_on_every_rank_naming_rank_and_values(report, case, exc, words):
    message = same_error_on_every_rank(report[case], exc)
    for w in words:
        assert w in message


def test_unnamed_parameters_warn_at_construction_that_their_order_cannot_be_checked(report):
    ranks = report["unnamed_parameters_reordered"]
    assert [r["raised"] for r in ranks] == [None] * NP  # the same shapes in another order cannot be detected ...
    warned = [w for w in ranks[0]["warnings"] if "named_parameters=None" in w]  # ... so rank 0 says so
    assert warned and "6 trainable parameters share their shape" in warned[0], ranks[0]["warnings"]
    assert "named_parameters=model.named_parameters()" in warned[0]


def test_the_same_settings_build_without_error_or_warning(report):
    ranks = report["same_settings"]
    assert [r["raised"] for r in ranks] == [None] * NP
    # make_model's parameters all differ in shape: the order is checked, nothing to warn about
    assert not any(r["warnings"] for r in ranks), ranks
