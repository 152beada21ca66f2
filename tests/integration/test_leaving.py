"""A learner that leaves or falls behind is named at once, a stall is reported long before the timeout, and
learners stop when their launcher dies (tests/integration/jobs/leaving.py, real horovodrun jobs).

The exchange timeout is left at its default (300 s) or set far above the launch timeout: a failure that came
from the timeout, not from the plugin noticing, makes the launch time out and the test fail.
"""

import os
import re
import signal
import subprocess
import time

import pytest

from horovod_dpsgd.experiments.launch import horovodrun_command, horovodrun_env
from launch import REPO, run

pytestmark = pytest.mark.mpi


def leaving(case: str, np_: int = 2, timeout: float = 120, env=None):
    return run(horovodrun_command(np_, ["tests/integration/jobs/leaving.py", case]), timeout=timeout,
               env={"HOROVOD_DPSGD_TIMEOUT": "600", **(env or {})}, np_=np_)


@pytest.mark.parametrize("np_", [2, 4])
def test_a_learner_whose_loop_ends_early_makes_the_others_fail_at_once_naming_it(np_):
    proc = leaving("finish_early", np_)
    assert proc.returncode != 0
    odd = np_ - 1  # the first rank to notice names itself, then the job ends
    assert re.search(rf"rank {odd} finished after 24 steps while rank \d started its 25th", proc.stdout), \
        proc.stdout[-4000:]
    assert "drop_last=True" in proc.stdout
    assert "MPI_FINALIZE" not in proc.stdout, proc.stdout[-4000:]


def test_a_step_without_backward_on_one_rank_counts_and_the_surplus_step_is_named():
    # The extra step() communicates and counts like any other (the ranks stay in step while they train), so the
    # odd rank runs one step more than the others: when rank 0 finishes, the odd rank's 11th step names it.
    proc = leaving("extra_step")
    assert proc.returncode != 0
    assert "rank 0 finished after 10 steps while rank 1 started its 11th" in proc.stdout, proc.stdout[-4000:]
    assert "rank 0 done after 10 steps" in proc.stdout


def test_a_rank_out_of_step_is_named_by_its_first_exchange():
    proc = leaving("out_of_step")
    assert proc.returncode != 0
    assert "StepMismatchError" in proc.stdout, proc.stdout[-4000:]
    # each of the two names the other (the first to notice ends the job)
    assert re.search(r"in the weight exchange of step (4, rank 1 sent its weights of step 5|5, rank 0 sent its "
                     r"weights of step 4)", proc.stdout), proc.stdout[-4000:]


def test_a_stall_is_reported_naming_rank_and_step_long_before_the_timeout():
    proc = leaving("stall", env={"HOROVOD_STALL_CHECK_TIME_SECONDS": "2"})
    assert proc.returncode == 0, proc.stdout[-4000:]  # a stall is not a failure ...
    assert "StallWarning: horovod-dpsgd: rank 0 has waited 2 s in the weight exchange of step 3 for rank 1" \
        in proc.stdout, proc.stdout[-4000:]  # ... but it is reported, after HOROVOD_STALL_CHECK_TIME_SECONDS
    assert "ExchangeTimeoutError at 600 s" in proc.stdout


def _alive(pids):
    alive = []
    for pid in pids:
        try:
            os.kill(pid, 0)
            alive.append(pid)
        except ProcessLookupError:
            pass
    return alive


def _parent(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[1])


def _children(pid: int):
    return [int(p) for p in os.listdir("/proc") if p.isdigit() and _safe_parent(int(p)) == pid]


def _safe_parent(pid: int) -> int:
    try:
        return _parent(pid)
    except (OSError, IndexError, ValueError):
        return -1


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="the launcher watch reads /proc (Linux)")
def test_learners_stop_when_their_launcher_dies(tmp_path):
    """The launcher dies outright: horovodrun, Horovod's helper process (which otherwise stops mpirun when horovodrun
    dies), and mpirun itself are killed with SIGKILL. Nobody is left to stop the learners: they must notice that
    their launcher is gone and stop."""
    env = {**horovodrun_env(2), "PYTHONPATH": str(REPO), "HOROVOD_DPSGD_TIMEOUT": "600",
           "DPSGD_PID_DIR": str(tmp_path)}
    launcher = subprocess.Popen(horovodrun_command(2, ["tests/integration/jobs/leaving.py", "forever"]), cwd=REPO, env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    learners, mpirun = [], []
    try:
        deadline = time.monotonic() + 120
        while len(list(tmp_path.glob("pid.*"))) < 2 and time.monotonic() < deadline and launcher.poll() is None:
            time.sleep(0.2)
        learners = [int(f.read_text()) for f in tmp_path.glob("pid.*")]
        assert len(learners) == 2, "the job did not start"
        mpirun = [_parent(learners[0])]
        shell = _parent(mpirun[0])  # horovodrun -> its helper -> /bin/sh -c mpirun ... -> mpirun -> learners
        for pid in [launcher.pid, *_children(launcher.pid), shell, mpirun[0]]:
            os.kill(pid, signal.SIGKILL)
        launcher.wait()
        deadline = time.monotonic() + 20
        while _alive(learners) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not _alive(learners), f"learners {_alive(learners)} still ran 20 s after their launcher died"
    finally:  # never leave processes running
        for pid in _alive(learners + mpirun):
            os.kill(pid, signal.SIGKILL)
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)
