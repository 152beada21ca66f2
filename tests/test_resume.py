"""Horovod's resume patterns work with the plugin (tests/mpi/resume.py, one horovodrun launch per world size).

Each variant resumes a 3-step run in fresh objects and trains to step 6; its weights must equal, bit for bit,
those of a twin that continued the first run in memory after the same state transfer, and every rank must count
6 steps. Ranks that resume at different steps fail at their first exchange, naming the ranks and steps.
"""

import json

import pytest

from launch import horovodrun

pytestmark = pytest.mark.mpi


@pytest.fixture(scope="module", params=(2, 3), ids=lambda n: f"np{n}")
def report(request, tmp_path_factory):
    out = tmp_path_factory.mktemp(f"resume-np{request.param}") / "report.json"
    proc = horovodrun(request.param, ["tests/mpi/resume.py", str(out)], timeout=300)
    assert proc.returncode == 0, proc.stdout[-5000:]
    results = json.loads(out.read_text())
    assert results["size"] == request.param
    return results


def result(report, name):
    r = report[name]
    assert "error" not in r, r["error"]
    return r


@pytest.mark.parametrize("variant", [
    "rank0_load_then_broadcasts",            # Horovod's examples: rank 0 loads; broadcast_parameters/_optimizer_state
    "rank0_load_then_broadcasts_stateless",  # SGD without momentum: broadcast_optimizer_state carries nothing at all
    "every_rank_loads_the_same_file",
    "per_learner_checkpoint",                # horovod_dpsgd.checkpoint, one file per learner
    "ssgd_rank0_load_then_broadcasts",       # SSGD*: the step seeds the noise every replica must share
])
def test_a_resumed_run_continues_like_the_uninterrupted_one(report, variant):
    r = result(report, variant)
    assert r["steps"] == [6] * report["size"]
    assert r["diff"] == 0.0
    if variant.startswith("ssgd"):
        assert r["replica_spread"] == 0.0


def test_ranks_resumed_at_different_steps_fail_at_their_first_exchange_naming_them(report):
    ranks = result(report, "error_learners_at_different_steps")["ranks"]
    n, odd = report["size"], report["size"] - 1
    assert [r["raised"] for r in ranks] == ["StepMismatchError"] * n, ranks
    assert len({r["message"] for r in ranks}) == 1  # the same message on every rank
    message = ranks[0]["message"]
    others = f"ranks {', '.join(map(str, range(odd)))}" if odd > 1 else "rank 0"
    assert f"rank {odd} at step 2 (restored from a state_dict); {others} at step 3 (restored" in message, message


def test_load_state_dict_on_one_rank_mid_training_is_named_by_the_next_exchange(report):
    ranks = result(report, "error_load_state_dict_on_one_rank")["ranks"]
    odd = report["size"] - 1
    assert [r["raised"] for r in ranks] == ["StepMismatchError"] * report["size"], ranks
    assert f"in the weight exchange of step 2, rank 0 sent its weights of step 3" in ranks[odd]["message"]
    assert f"in the weight exchange of step 3, rank {odd} sent its weights of step 2" in ranks[0]["message"]
