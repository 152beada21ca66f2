"""The training CLI under horovodrun (issue 15): a damaged checkpoint stops every rank with the plugin's error,
not Open MPI's; a run whose model ends NaN does not report success, and compare still reports it."""

import json
import re

import pytest

from horovod_dpsgd.experiments.launch import horovodrun_command
from launch import BIN, run

pytestmark = pytest.mark.mpi

TRAIN = ["-m", "horovod_dpsgd.experiments.cli", "train", "--batch-size", "100", "--lr", "0.5", "--log-every", "5",
         "--quiet"]


def train(*args, timeout=240):
    return run(horovodrun_command(2, TRAIN + [str(a) for a in args]), timeout=timeout, np_=2)


def test_resuming_from_an_empty_learner_file_stops_every_rank_naming_the_file(tmp_path):
    first = train("--epochs", "1", "--checkpoint-dir", tmp_path)
    assert first.returncode == 0, first.stdout[-4000:]
    (rank1,) = (tmp_path / "last").glob("learner-00001-of-00002*.pt")
    rank1.write_bytes(b"")
    resumed = train("--epochs", "2", "--checkpoint-dir", tmp_path)
    assert resumed.returncode != 0
    out = resumed.stdout
    for rank in (0, 1):  # horovodrun tags each line with [1,RANK]
        line = next((l for l in out.splitlines() if re.match(rf"\[1,{rank}\]<std(err|out)>:Error: cannot resume", l)),
                    None)
        assert line is not None, f"rank {rank} gave no clear error:\n{out[-4000:]}"
        assert f"rank 1: {rank1}" in line and "does not match its checksum" in line, line
    assert "MPI_FINALIZE" not in out and "Aborted!" not in out, out[-4000:]


def test_a_run_that_diverges_exits_non_zero_and_records_it(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    proc = train("--epochs", "1", "--max-steps", "10", "--lr", "1e30", "--metrics-file", metrics)
    assert proc.returncode != 0, proc.stdout[-4000:]
    assert re.search(r"Exit code:\s+3\n", proc.stdout), proc.stdout[-4000:]  # mpirun names the ranks' status
    end = [json.loads(line) for line in metrics.read_text().splitlines()][-1]
    assert end["kind"] == "end" and end["diverged"]


def test_compare_reports_a_diverged_run_as_diverged_not_as_a_failure(tmp_path):
    proc = run([str(BIN / "horovod-dpsgd"), "compare", "--np", "2", "--run", "boom:algorithm=ssgd,lr=1e30",
                "--epochs", "1", "--max-steps", "6", "--batch-size", "250", "--out", str(tmp_path)], timeout=300, np_=2)
    assert proc.returncode == 0, proc.stdout[-4000:]
    assert "| boom | 1 | yes |" in proc.stdout, proc.stdout[-3000:]
