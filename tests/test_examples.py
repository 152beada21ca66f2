"""Every example runs as written under horovodrun (a few steps each)."""

import re

import pytest

from launch import horovodrun

pytestmark = pytest.mark.mpi


def test_mnist_example_trains_and_reports_accuracy():
    proc = horovodrun(2, ["examples/pytorch_mnist_mlp.py", "--epochs", "2"], timeout=180)
    assert proc.returncode == 0, proc.stdout[-4000:]
    accuracies = [float(a) for a in re.findall(r"test accuracy ([\d.]+)%", proc.stdout)]
    assert len(accuracies) == 2
    assert accuracies[-1] > 70.0  # 10 classes: chance is 10 %
