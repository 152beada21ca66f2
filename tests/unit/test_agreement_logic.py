"""Ranks agree before they talk, and waits report stalls and departures: the logic, in one process (the
multi-process behaviour: tests/parallel/test_agreement.py, test_resume.py, tests/integration/test_leaving.py)."""

import os
import signal
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import horovod_dpsgd as hd
from horovod_dpsgd.comm import agreement, exchange, liveness
from horovod_dpsgd.errors import (ExchangeTimeoutError, ParameterMismatchError, SettingsMismatchError, StallWarning,
                                  StepMismatchError, TopologyError)


# --- the step ---------------------------------------------------------------------------------------------------

def test_equal_steps_are_kept():
    assert agreement.resolve_step([5, 5, 5], [False, True, False]) == 5


def test_fresh_ranks_take_the_step_of_the_ranks_that_restored_a_state():
    # Horovod's resume pattern: rank 0 loaded a checkpoint of step 8, the others are fresh
    assert agreement.resolve_step([8, 0, 0], [True, False, False]) == 8
    assert agreement.resolve_step([8, 8, 0], [True, True, False]) == 8


def test_restored_ranks_that_disagree_are_named_with_their_steps():
    with pytest.raises(StepMismatchError) as info:
        agreement.resolve_step([8, 6, 8, 0], [True, True, True, False])
    message = str(info.value)
    assert "rank 3 at step 0; rank 1 at step 6 (restored from a state_dict); ranks 0, 2 at step 8 (restored" in message
    assert "hvd.broadcast_optimizer_state" in message


def test_a_rank_that_trained_without_restoring_does_not_give_way():
    with pytest.raises(StepMismatchError, match="rank 1 at step 3; rank 0 at step 8"):
        agreement.resolve_step([8, 3], [True, False])


@pytest.mark.parametrize("step,tag,want", [(3, 3, 3), (8, 0, 0), (0, 8, 8), (32770, 2, 32770), (32770, 32767, 32767)])
def test_the_step_of_a_message_is_read_from_its_tag(step, tag, want):
    assert exchange._step_of_tag(tag, step) == want


# --- the settings -----------------------------------------------------------------------------------------------

def model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))


def description(size=4, **changes):
    options = hd.Options(**{"topology": "ring", "timeout": 30, **changes})
    topology = hd.topology.from_name(options.topology, size, options.seed) if options.algorithm == "dpsgd" else None
    return agreement.describe(options=options, topology=topology, named=list(model().named_parameters()),
                              compression=hd.optimizer.Compression.none, backward_passes_per_step=1,
                              op=hd.optimizer.Average, gradient_predivide_factor=1.0)


def gathered(*descriptions):
    return [agreement._wire(d) for d in descriptions]


def test_the_same_description_on_every_rank_passes():
    assert agreement.check(gathered(description(), description(), description())) is None


@pytest.mark.parametrize("change,words", [
    ({"seed": 1}, "seed is 0 on rank 0 but 1 on rank 2"),
    ({"timeout": 31}, "timeout is 30.0 on rank 0 but 31.0 on rank 2"),
    ({"topology": "full"}, "topology is 'ring (k=1)' on rank 0 but 'full averaging' on rank 2"),
    ({"algorithm": "ssgd"}, "algorithm is 'dpsgd' on rank 0 but 'ssgd' on rank 2"),
])
def test_a_different_setting_is_named_with_the_rank_and_both_values(change, words):
    with pytest.raises(SettingsMismatchError) as info:
        agreement.check(gathered(description(), description(), description(**change)))
    assert words in str(info.value)


def test_mixing_plans_that_differ_under_the_same_name_are_left_to_the_collective_that_names_the_learner():
    lazy = 0.5 * hd.topology.ring(4).mixing_matrix() + 0.5 * np.eye(4)
    mine, theirs = description(topology=hd.topology.ring(4).mixing_matrix()), description(topology=lazy)
    assert mine["topology"] == theirs["topology"] == "user mixing matrix"
    assert agreement.check(gathered(mine, theirs)) == (1, 0)  # rank 1, step 0


def test_dynamic_topologies_compare_the_plans_of_several_steps():
    a, b = (hd.topology.RandomPeer(4, seed=s) for s in (0, 1))
    assert len(agreement.plans_digest(a)) == agreement.FINGERPRINT_STEPS
    assert agreement.plans_digest(a) != agreement.plans_digest(b)
    assert agreement.plans_digest(hd.topology.ring(8)) != agreement.plans_digest(hd.topology.ring(8, k=2))
    # the same plans under another name are the same exchange (at n = 3 the ring is full averaging, an allreduce)
    assert agreement.plans_digest(hd.topology.ring(3)) == agreement.plans_digest(hd.topology.full(3))


def test_different_parameters_are_named():
    theirs = description()
    theirs["parameters"] = list(reversed(theirs["parameters"]))
    with pytest.raises(ParameterMismatchError, match="parameter #0: rank 0 has .'0.weight'"):
        agreement.check(gathered(description(), theirs))


def test_an_error_on_one_rank_is_raised_on_every_rank_with_its_type_naming_the_rank():
    try:
        hd.topology.from_name("ring:0", 4)
    except TopologyError as exc:
        error = exc
    with pytest.raises(TopologyError) as info:
        agreement.check(gathered(description(), error, description(), ValueError("bad")))
    assert str(info.value).startswith("rank 1 could not build horovod_dpsgd.DistributedOptimizer (ranks 1, 3 failed)")
    assert "ring" in str(info.value)


def test_an_error_that_cannot_travel_keeps_its_type_name_and_message():
    class Local(Exception):
        def __init__(self, a, b):
            super().__init__(f"{a} and {b}")

    wire = agreement._wire(Local(1, 2))
    assert "Local: 1 and 2" in str(wire["error"])


def test_without_names_rank_0_warns_when_same_shaped_parameters_could_be_reordered_unseen():
    stack = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))
    named = [(f"p{i}", p) for i, p in enumerate(stack.parameters())]
    with pytest.warns(UserWarning, match="4 trainable parameters share their shape"):
        agreement.warn_if_order_unchecked(None, named, rank=0, size=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        agreement.warn_if_order_unchecked(named, named, rank=0, size=2)  # names are compared
        agreement.warn_if_order_unchecked(None, named, rank=1, size=2)  # said once, by rank 0
        agreement.warn_if_order_unchecked(None, named, rank=0, size=1)  # nobody to differ from
        agreement.warn_if_order_unchecked(None, list(model().named_parameters())[:2], rank=0, size=2)  # distinct


# --- waits: stalls, departures ----------------------------------------------------------------------------------

def test_a_wait_warns_at_every_stall_period_then_times_out(monkeypatch):
    from mpi4py import MPI
    monkeypatch.setenv("HOROVOD_STALL_CHECK_TIME_SECONDS", "0.2")
    request = MPI.COMM_SELF.Irecv(np.empty(1), source=0, tag=77)  # nobody sends it
    try:
        with pytest.warns(StallWarning) as seen, pytest.raises(ExchangeTimeoutError, match="gave up"):
            exchange._wait_requests([request], time.monotonic() + 0.7, "gave up",
                                    stalled=lambda pending, waited: f"waited {waited:.1f} s for {pending}")
    finally:
        request.Cancel()
        request.Wait()
    messages = [str(w.message) for w in seen]
    assert 2 <= len(messages) <= 4 and messages[0].startswith("waited 0.2 s for [0]"), messages


def test_stall_reports_follow_horovods_settings(monkeypatch):
    monkeypatch.delenv("HOROVOD_STALL_CHECK_TIME_SECONDS", raising=False)
    assert exchange.stall_warning_seconds() == 60.0
    monkeypatch.setenv("HOROVOD_STALL_CHECK_DISABLE", "1")
    assert exchange.stall_warning_seconds() is None


def test_a_learner_that_left_ends_the_waits_of_the_steps_it_never_reached():
    from mpi4py import MPI
    roster = liveness.Roster(MPI.COMM_SELF)
    first, second = roster.register(30.0), roster.register(60.0)
    assert (first.seq, second.seq, roster.timeout) == (0, 1, 60.0)
    roster.left[1] = {0: 24, 1: 3}  # rank 1 left after 24 steps of the first optimizer, 3 of the second
    first.check(23)  # its weights of step 23 were sent before it left
    with pytest.raises(StepMismatchError, match="rank 1 finished after 24 steps while rank 0 started its 25th"):
        first.check(24)
    with pytest.raises(StepMismatchError, match="rank 1 finished after 3 steps while rank 0 started its 4th"):
        second.check(3)


def test_a_wait_ends_as_soon_as_its_check_raises():
    from mpi4py import MPI
    request = MPI.COMM_SELF.Irecv(np.empty(1), source=0, tag=78)

    def check():
        raise StepMismatchError("peer left")

    try:
        with pytest.raises(StepMismatchError, match="peer left"):
            exchange._wait_requests([request], time.monotonic() + 60, "timeout", check=check)
    finally:
        request.Cancel()
        request.Wait()


# --- the launcher -----------------------------------------------------------------------------------------------

@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="the launcher watch reads /proc (Linux)")
def test_a_learner_stops_when_its_launcher_is_killed(tmp_path):
    """A fake launcher named mpirun starts a learner that watches it; killing the launcher stops the learner."""
    learner = tmp_path / "learner.py"
    learner.write_text(textwrap.dedent("""
        import sys, time
        from horovod_dpsgd.comm import liveness
        launchers = [name for _, _, name in liveness.launcher_processes()]
        liveness.watch_launcher(every=0.1)
        print(launchers, len(liveness._watching), flush=True)  # once the watch has started
        time.sleep(60)
    """))
    launcher = tmp_path / "mpirun"
    launcher.write_text(f"#!{sys.executable}\nimport subprocess, sys, time\n"
                        f"child = subprocess.Popen([sys.executable, {str(learner)!r}])\n"
                        "print(child.pid, flush=True)\ntime.sleep(60)\n")
    launcher.chmod(0o755)
    repo = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, "PYTHONPATH": repo + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen([str(launcher)], stdout=subprocess.PIPE, text=True, env=env)
    child = int(proc.stdout.readline())
    try:
        assert proc.stdout.readline().strip() == "['mpirun'] 1"  # the learner found its launcher, and watches it
        proc.kill()
        proc.wait()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and liveness._stat(child) is not None and liveness._stat(child)[2] != "Z":
            time.sleep(0.05)
        stat = liveness._stat(child)
        assert stat is None or stat[2] == "Z", "the learner still runs after its launcher was killed"
    finally:
        proc.stdout.close()
        try:
            os.kill(child, signal.SIGKILL)
        except ProcessLookupError:
            pass
