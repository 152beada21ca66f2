"""A failing learner ends the whole horovodrun job quickly, naming the failed rank; never a hang."""

import time

import pytest

from horovod_dpsgd.launch import horovodrun_command
from launch import run

pytestmark = pytest.mark.mpi


@pytest.mark.parametrize("mode,words", [
    ("kill", "process rank 2"),                       # SIGKILL: mpirun names the rank
    ("raise", "MPI_ABORT was invoked on rank 2"),     # an exception: the plugin aborts the job
    ("hang", "rank 2 did not answer"),                # a stuck learner: neighbours time out naming it
])
def test_failed_learner_ends_the_job_naming_it(mode, words):
    start = time.monotonic()
    proc = run(horovodrun_command(4, ["tests/mpi/faults.py", mode, "2"]), timeout=120,
               env={"HOROVOD_DPSGD_TIMEOUT": "5"}, np_=4)
    elapsed = time.monotonic() - start
    assert proc.returncode != 0
    assert words in proc.stdout, proc.stdout[-4000:]
    assert elapsed < 60
