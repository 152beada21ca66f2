"""Horovod's resume patterns work with the plugin: each test asserts on one named check of
tests/parallel/checks/resume.py, at np 2 and 3.

Each variant resumes a 3-step run in fresh objects and trains to step 6; its weights must equal, bit for bit,
those of a twin that continued the first run in memory after the same state transfer, and every rank must count
6 steps. Ranks that resume at different steps fail at their first exchange, naming the ranks and steps.
"""

import pytest

pytestmark = [pytest.mark.mpi, pytest.mark.checks("resume", sizes=(2, 3))]


@pytest.mark.parametrize("check", [
    "rank0_load_then_broadcasts",            # Horovod's examples: rank 0 loads; broadcast_parameters/_optimizer_state
    "rank0_load_then_broadcasts_stateless",  # SGD without momentum: broadcast_optimizer_state carries nothing at all
    "every_rank_loads_the_same_file",
    "per_learner_checkpoint",                # horovod_dpsgd.checkpoint, one file per learner
    "ssgd_rank0_load_then_broadcasts",       # SSGD*: the step seeds the noise every replica must share
])
def test_a_resumed_run_continues_like_the_uninterrupted_one(result, size, check):
    assert result["steps"] == [6] * size
    assert result["diff"] == 0.0
    if check.startswith("ssgd"):
        assert result["replica_spread"] == 0.0


@pytest.mark.parametrize("check", ["error_learners_at_different_steps"])
def test_ranks_resumed_at_different_steps_fail_at_their_first_exchange_naming_them(result, size):
    ranks, odd = result["ranks"], size - 1
    assert [r["raised"] for r in ranks] == ["StepMismatchError"] * size, ranks
    assert len({r["message"] for r in ranks}) == 1  # the same message on every rank
    others = f"ranks {', '.join(map(str, range(odd)))}" if odd > 1 else "rank 0"
    message = ranks[0]["message"]
    assert f"rank {odd} at step 2 (restored from a state_dict); {others} at step 3 (restored" in message, message


@pytest.mark.parametrize("check", ["error_load_state_dict_on_one_rank"])
def test_load_state_dict_on_one_rank_mid_training_is_named_by_the_next_exchange(result, size):
    ranks, odd = result["ranks"], size - 1
    assert [r["raised"] for r in ranks] == ["StepMismatchError"] * size, ranks
    assert "in the weight exchange of step 2, rank 0 sent its weights of step 3" in ranks[odd]["message"]
    assert f"in the weight exchange of step 3, rank {odd} sent its weights of step 2" in ranks[0]["message"]
