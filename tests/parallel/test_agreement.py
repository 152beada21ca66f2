"""Ranks agree before they talk: each test asserts on one named check of tests/parallel/checks/agreement.py, in
which the last rank builds the optimizer with other or invalid arguments, at np 2 and 4."""

import pytest

pytestmark = [pytest.mark.mpi, pytest.mark.checks("agreement", sizes=(2, 4))]


def same_error_on_every_rank(ranks, exc):
    assert [r["raised"] for r in ranks] == [exc] * len(ranks), [r.get("traceback", r) for r in ranks]
    messages = {r["message"] for r in ranks}
    assert len(messages) == 1, messages
    return messages.pop()


@pytest.mark.parametrize("check,exc,words", [
    ("invalid_topology_on_one_rank", "TopologyError", ["could not build", "a ring needs k >= 1"]),
    ("invalid_algorithm_on_one_rank", "ValueError", ["could not build", "'adpsgd'"]),
    ("invalid_timeout_on_one_rank", "ValueError", ["could not build", "timeout must be > 0"]),
])
def test_an_invalid_argument_on_one_rank_raises_the_same_error_on_every_rank(result, size, exc, words):
    message = same_error_on_every_rank(result, exc)
    assert message.startswith(f"rank {size - 1} could not build horovod_dpsgd.DistributedOptimizer")
    for w in words:
        assert w in message


@pytest.mark.parametrize("check,exc,words", [
    ("different_mixing_matrices", "SettingsMismatchError", ["different mixing matrices", "on rank 0 but",
                                                             "on rank {odd}", "learner"]),
    ("different_topologies", "SettingsMismatchError", ["on rank 0 but 'random peer' on rank {odd}"]),
    ("different_seeds", "SettingsMismatchError", ["seed is 0 on rank 0 but 1 on rank {odd}"]),
    ("different_algorithms", "SettingsMismatchError", ["algorithm is 'dpsgd' on rank 0 but 'ssgd' on rank {odd}"]),
    ("different_backward_passes", "SettingsMismatchError",
     ["backward_passes_per_step is 1 on rank 0 but 2 on rank {odd}"]),
    ("different_timeouts", "SettingsMismatchError", ["timeout is 30.0 on rank 0 but 31.0 on rank {odd}"]),
    ("different_compression", "SettingsMismatchError",
     ["compression is 'NoneCompressor' on rank 0 but 'FP16Compressor' on rank {odd}"]),
    ("ssgd_different_seeds", "SettingsMismatchError", ["seed is 0 on rank 0 but 1 on rank {odd}"]),
    ("named_parameters_reordered", "ParameterMismatchError", ["parameter #0: rank 0 has ('layers.0.weight'",
                                                              "rank {odd} has ('layers.2.bias'"]),
])
def test_different_settings_raise_the_same_error_on_every_rank_naming_rank_and_values(result, size, exc, words):
    message = same_error_on_every_rank(result, exc)
    for w in words:
        assert w.format(odd=size - 1) in message


@pytest.mark.parametrize("check", ["unnamed_parameters_reordered"])
def test_unnamed_parameters_warn_at_construction_that_their_order_cannot_be_checked(result):
    assert [r["raised"] for r in result] == [None] * len(result)  # same shapes in another order: undetectable ...
    warned = [w for w in result[0]["warnings"] if "named_parameters=None" in w]  # ... so rank 0 says so
    assert warned and "6 trainable parameters share their shape" in warned[0], result[0]["warnings"]
    assert "named_parameters=model.named_parameters()" in warned[0]


@pytest.mark.parametrize("check", ["same_settings"])
def test_the_same_settings_build_without_error_or_warning(result):
    assert [r["raised"] for r in result] == [None] * len(result)
    # make_model's parameters all differ in shape: the order is checked, nothing to warn about
    assert not any(r["warnings"] for r in result), result
