"""Checkpoints that cannot lie (issue 15, part 1): damaged, mixed and half-written checkpoints raise the same
clear error on every rank, naming the file and the rank; a crash in the middle of a save keeps the previous one.

The scenarios run in tests/integration/jobs/checkpoints.py (np = 2, one launch for all of them); each test asserts on what
every rank saw.
"""

import json
import os

import pytest

from launch import horovodrun

pytestmark = pytest.mark.mpi


@pytest.fixture(scope="module")
def seen(tmp_path_factory):
    out = tmp_path_factory.mktemp("checkpoints") / "report.json"
    proc = horovodrun(2, ["tests/integration/jobs/checkpoints.py", str(out)], timeout=240)
    assert proc.returncode == 0, proc.stdout[-5000:]
    return json.loads(out.read_text())


def every_rank_raised(outcomes, *words):
    assert len(outcomes) == 2
    for rank, o in enumerate(outcomes):
        assert o.get("type") == "CheckpointError", f"rank {rank} saw {o}"
        for w in words:
            assert w in o["message"], f"rank {rank}: {w!r} not in {o['message']!r}"
    assert outcomes[0]["message"] == outcomes[1]["message"]  # the ranks agree


def test_an_intact_checkpoint_loads_on_every_rank(seen):
    assert seen["intact"] == [{"ok": {"step": 3, "extra": {"epoch": 1}}}] * 2


@pytest.mark.parametrize("scenario", ["altered_tensor_bytes", "empty_file", "truncated_file", "not_a_checkpoint",
                                      "two_saves"])
def test_a_damaged_or_foreign_file_is_named_on_every_rank(seen, scenario):
    # rank 1's file was damaged (or, for two_saves, replaced by its file of the previous save)
    every_rank_raised(seen[scenario], "rank 1:", "learner-00001-of-00002", "does not match its checksum")


def test_a_save_that_fails_on_one_rank_fails_on_every_rank_and_keeps_the_previous_checkpoint(seen):
    r = seen["save_fails_on_one_rank"]
    every_rank_raised(r["save"], "rank 0:", "No space left on device", "previous one there, if any, is kept")
    assert r["load"] == [{"ok": {"step": 3, "extra": {"epoch": 1}}}] * 2
    assert r["leftovers"] == []


def test_a_learner_killed_in_the_middle_of_a_save_leaves_the_previous_checkpoint_whole(tmp_path):
    out = tmp_path / "report.json"
    killed = horovodrun(2, ["tests/integration/jobs/checkpoints.py", str(out), "kill_during_save"], timeout=120)
    assert killed.returncode != 0
    assert os.path.exists(tmp_path / "rank1-wrote"), killed.stdout[-3000:]  # rank 1 wrote its new file
    resumed = horovodrun(2, ["tests/integration/jobs/checkpoints.py", str(out), "resume_after_kill"], timeout=120)
    assert resumed.returncode == 0, resumed.stdout[-5000:]
    # both ranks at the first save's step: not rank 1 at step 6 and rank 0 at step 3
    assert json.loads(out.read_text())["resume_after_kill"] == [{"ok": {"step": 3, "extra": {"epoch": 1}}}] * 2
