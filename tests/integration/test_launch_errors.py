"""A job started without MPI (horovodrun --gloo, plain python) stops with an error naming the fix."""

import sys

import pytest

from launch import horovodrun, run

pytestmark = pytest.mark.mpi

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
    proc = run([sys.executable, "-c", GLOO_SCRIPT], timeout=120)
    assert proc.returncode != 0
    assert "MPIEnvironmentError" in proc.stdout and "horovodrun -np N" in proc.stdout
