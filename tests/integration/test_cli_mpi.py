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
    first, second = (trained / "metrics0.jsonl").read_text(), (trained / "metrics1.jsonl").read_text()
    records = [json.loads(line) for line in first.splitlines()]
    assert first == second
    assert [r["kind"] for r in records].count("diag") == 3 and records[-1]["kind"] == "end"
    assert records[-1]["steps"] == 12 and not records[-1]["diverged"]


def test_landscape_and_hessian_commands_on_a_checkpoint(trained):
    ckpt = trained / "ckpt" / "last"
    assert sorted(p.name for p in ckpt.iterdir()) == ["learner-00000-of-00002.pt", "learner-00001-of-00002.pt"]
    cli = [sys.executable, "-m", "horovod_dpsgd.experiments.cli"]
    proc = run(cli + ["landscape", str(ckpt), "--grid", "3", "--batches", "1", "--batch-size", "100"], timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert (ckpt / "landscape.png").exists() and (ckpt / "landscape.npz").exists()
    proc = run(cli + ["hessian", str(ckpt), "--grid", "2", "--iters", "4", "--batches", "1", "--batch-size", "100"],
               timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert "|lambda_min|/|lambda_max|" in proc.stdout and (ckpt / "hessian.png").exists()


def test_compare_runs_configurations_and_reports(tmp_path):
    proc = run([str(BIN / "horovod-dpsgd"), "compare", "--np", "2", "--run", "s:algorithm=ssgd",
                "--run", "d:algorithm=dpsgd,topology=ring", "--epochs", "2", "--batch-size", "250",
                "--diag-every", "4", "--out", str(tmp_path)], timeout=300, np_=2)
    assert proc.returncode == 0, proc.stdout[-4000:]
    assert "| s | 1 | no |" in proc.stdout and "| d | 1 | no |" in proc.stdout
    for name in ("loss.png", "accuracy.png", "alpha_e.png", "diagnostics.png", "summary.json"):
        assert (tmp_path / name).exists(), name
    assert (tmp_path / "d-seed0" / "tb").is_dir()
