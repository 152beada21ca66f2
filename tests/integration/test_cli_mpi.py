"""The CLI end to end under horovodrun: train (deterministic), landscape/hessian on its checkpoint, compare."""

import json
import sys

import pytest

from horovod_dpsgd.experiments.launch import horovodrun_command
from launch import BIN, run

pytestmark = pytest.mark.mpi

TRAIN = ["-m", "horovod_dpsgd.experiments.cli", "train", "--batch-size", "100", "--lr", "0.5", "--epochs", "1",
         "--max-steps", "12", "--diag-every", "4", "--log-every", "2", "--topology", "random_peer", "--seed", "3"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Two identical training runs (metrics), the first with a checkpoint."""
    out = tmp_path_factory.mktemp("train")
    for i in (0, 1):
        extra = ["--metrics-file", str(out / f"metrics{i}.jsonl")]
        if i == 0:
            extra += ["--checkpoint-dir", str(out / "ckpt"), "--log-dir", str(out / "tb")]
        proc = run(horovodrun_command(2, TRAIN + extra), timeout=240, np_=2)
        assert proc.returncode == 0, proc.stdout[-4000:]
    return out


def test_same_seeds_give_the_same_run_bit_for_bit(trained):
    first, second = [(trained / f"metrics{i}.jsonl").read_text().splitlines() for i in (0, 1)]
    records = [json.loads(line) for line in first]
    assert first[1:] == second[1:]  # all but the start records, which name each run's own output paths
    assert [r["kind"] for r in records].count("diag") == 3 and records[-1]["kind"] == "end"
    assert records[-1]["steps"] == 12 and not records[-1]["diverged"]


def test_a_run_records_the_exact_configuration_it_ran(trained):
    from horovod_dpsgd.experiments.config import TrainConfig
    start = json.loads((trained / "metrics0.jsonl").read_text().splitlines()[0])
    assert start["kind"] == "start" and start["learners"] == 2 and not start["resumed"]
    cfg = TrainConfig.from_dict(start["config"])
    assert (cfg.batch_size, cfg.lr, cfg.topology, cfg.seed, cfg.max_steps) == (100, 0.5, "random_peer", 3, 12)
    assert cfg.metrics_file == str(trained / "metrics0.jsonl") and cfg.probe_batches == TrainConfig().probe_batches
    for directory in ("tb", "ckpt"):
        assert TrainConfig.load(str(trained / directory / "config.json")) == cfg


def test_landscape_and_hessian_commands_on_a_checkpoint(trained):
    ckpt = trained / "ckpt" / "last"
    assert sorted(p.name for p in ckpt.iterdir()) == ["learner-00000-of-00002.s000001.pt",
                                                      "learner-00001-of-00002.s000001.pt", "manifest.json"]
    assert sorted(p.name for p in ckpt.parent.iterdir()) == ["config.json", "last"]
    cli = [sys.executable, "-m", "horovod_dpsgd.experiments.cli"]
    proc = run(cli + ["landscape", str(ckpt), "--grid", "3", "--batches", "1", "--batch-size", "100"], timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert (ckpt / "landscape.png").exists() and (ckpt / "landscape.npz").exists()
    proc = run(cli + ["hessian", str(ckpt), "--grid", "2", "--iters", "4", "--batches", "1", "--batch-size", "100"],
               timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert "|lambda_min|/|lambda_max|" in proc.stdout and (ckpt / "hessian.png").exists()


def test_compare_runs_configurations_and_reports(tmp_path):
    # random_graph:0.05 has a connected graph at np = 2 (not at 8, where the CLI used to check it)
    proc = run([str(BIN / "horovod-dpsgd"), "compare", "--np", "2", "--run", "s:algorithm=ssgd",
                "--run", "d:algorithm=dpsgd,topology=random_graph:0.05", "--epochs", "2", "--batch-size", "250",
                "--diag-every", "4", "--out", str(tmp_path)], timeout=300, np_=2)
    assert proc.returncode == 0, proc.stdout[-4000:]
    assert "| s | 1 | no |" in proc.stdout and "| d | 1 | no |" in proc.stdout
    for name in ("loss.png", "accuracy.png", "alpha_e.png", "diagnostics.png", "summary.json"):
        assert (tmp_path / name).exists(), name
    assert (tmp_path / "d-seed0" / "tb").is_dir()
    assert "train --config " + str(tmp_path / "d-seed0" / "config.json") in proc.stdout
    assert json.loads((tmp_path / "d-seed0" / "config.json").read_text())["topology"] == "random_graph:0.05"


def test_resuming_appends_to_the_metrics_file(trained, tmp_path):
    """issue 15: a resumed run keeps the records written before it stopped (the file is appended, not truncated)."""
    import shutil
    from horovod_dpsgd.experiments import reports
    shutil.copytree(trained / "ckpt", tmp_path / "ckpt")
    metrics = tmp_path / "metrics.jsonl"
    shutil.copy(trained / "metrics0.jsonl", metrics)
    before = metrics.read_text()
    proc = run(horovodrun_command(2, TRAIN + ["--epochs", "2", "--max-steps", "24", "--checkpoint-dir",
                                              str(tmp_path / "ckpt"), "--metrics-file", str(metrics)]),
               timeout=240, np_=2)
    assert proc.returncode == 0, proc.stdout[-4000:]
    assert "resumed from" in proc.stdout
    after = metrics.read_text()
    assert after.startswith(before), "the records of the first run are gone"
    records = reports.read_metrics(metrics)
    assert [r["step"] for r in records if r["kind"] == "step"] == list(range(2, 25, 2))
    assert [r["steps"] for r in records if r["kind"] == "end"] == [24]


def test_a_checkpoint_each_epoch_even_when_evaluating_less_often(tmp_path):
    """issue 15: with --eval-every 4, a run killed in epoch 3 has a checkpoint of an epoch before (epoch 2, or
    epoch 3 if the kill, which follows rank 0's progress line through horovodrun's output, lands after its end;
    without a checkpoint each epoch the first one would be epoch 4's)."""
    import os
    import signal
    import subprocess
    import threading
    from horovod_dpsgd import checkpoint
    from horovod_dpsgd.experiments.launch import horovodrun_env
    from launch import REPO
    cmd = horovodrun_command(2, ["-m", "horovod_dpsgd.experiments.cli", "train", "--batch-size", "100", "--lr", "0.5",
                                 "--epochs", "4", "--eval-every", "4", "--checkpoint-dir", str(tmp_path / "ckpt")])
    proc = subprocess.Popen(cmd, cwd=REPO, env={**horovodrun_env(2), "PYTHONPATH": str(REPO)}, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    lines, in_epoch_3 = [], threading.Event()

    def read():
        for line in proc.stdout:
            lines.append(line)
            if "epoch 3: 5/20 steps" in line:  # rank 0's progress line, a quarter into epoch 3
                in_epoch_3.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        reached = in_epoch_3.wait(timeout=240)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        reader.join(timeout=10)
    assert reached, "".join(lines)[-4000:]
    _, extra = checkpoint.load_average(str(tmp_path / "ckpt" / "last"))
    assert extra["epoch"] in (2, 3)


def test_topology_is_validated_for_the_world_size_in_the_job(tmp_path):
    """issue 15: a topology that cannot be built for the job's np is a clean error naming np (checked in the job)."""
    proc = run(horovodrun_command(2, TRAIN + ["--topology", "random_graph:0.0001"]), timeout=240, np_=2)
    assert proc.returncode != 0
    assert "random_graph:0.0001" in proc.stdout and "2 learners" in proc.stdout, proc.stdout[-3000:]
    assert "Traceback" not in proc.stdout
