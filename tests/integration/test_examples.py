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


def test_cifar10_example_runs_a_few_steps_with_the_large_batch_recipe():
    proc = horovodrun(2, ["examples/cifar10_large_batch.py", "--fake-data", "--model", "mobilenet_v2",
                          "--batch-size", "8", "--epochs", "1", "--max-steps", "3"], timeout=240)
    assert proc.returncode == 0, proc.stdout[-4000:]
    assert "mobilenet_v2 (2.30 M parameters), dpsgd" in proc.stdout and "epoch 1:" in proc.stdout


def test_lstm_example_runs_on_synthetic_sequences():
    proc = horovodrun(2, ["examples/lstm_synthetic.py", "--epochs", "1", "--samples", "256", "--hidden", "8"],
                      timeout=240)
    assert proc.returncode == 0, proc.stdout[-4000:]
    assert "held-out loss" in proc.stdout


def test_noise_diagnostics_example_logs_to_tensorboard(tmp_path):
    proc = horovodrun(2, ["examples/noise_diagnostics.py", "--steps", "6", "--diag-every", "3",
                          "--log-dir", str(tmp_path)], timeout=240)
    assert proc.returncode == 0, proc.stdout[-4000:]
    assert re.search(r"step 6: .*alpha_e/alpha", proc.stdout)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(tmp_path))
    events.Reload()
    assert {"noise/alpha_e", "noise/delta2", "consensus/distance"} <= set(events.Tags()["scalars"])
