"""`train --engine sim` and `compare --engine sim`: the toolkit's runs with all learners in one process.

The tests marked mpi run the same configuration through horovodrun and through the simulator and compare what
they record: metrics, TensorBoard tags, checkpoints.
"""

import json
import sys

import pytest
import torch
from click.testing import CliRunner

from horovod_dpsgd.experiments.cli import main
from horovod_dpsgd.experiments.config import TrainConfig
from horovod_dpsgd.experiments.launch import horovodrun_command
from launch import run

CLI = ["-m", "horovod_dpsgd.experiments.cli"]
TRAIN = ["train", "--batch-size", "100", "--lr", "0.3", "--momentum", "0.5", "--epochs", "2", "--max-steps", "16",
         "--diag-every", "4", "--log-every", "2", "--topology", "random_peer", "--noise-sigma", "0.002", "--seed", "3"]


def read(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def tensorboard_scalars(directory):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(directory))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def close(a, b, rel):
    return abs(a - b) <= rel * max(abs(a), abs(b), 1e-12)


# -- against the MPI run ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def both(tmp_path_factory):
    """The same run through horovodrun (np 2) and through the simulator, each with logs and a checkpoint."""
    out = tmp_path_factory.mktemp("engines")
    for engine in ("mpi", "sim"):
        extra = ["--metrics-file", str(out / engine / "metrics.jsonl"), "--log-dir", str(out / engine / "tb"),
                 "--checkpoint-dir", str(out / engine / "ckpt")]
        if engine == "mpi":
            proc = run(horovodrun_command(2, CLI + TRAIN + extra), timeout=240, np_=2)
        else:
            proc = run([sys.executable, *CLI, *TRAIN, "--engine", "sim", "--np", "2", *extra], timeout=240)
        assert proc.returncode == 0, proc.stdout[-4000:]
    return out


@pytest.mark.mpi
def test_the_simulated_run_records_what_the_mpi_run_records(both):
    mpi, simulated = read(both / "mpi" / "metrics.jsonl"), read(both / "sim" / "metrics.jsonl")
    assert [(r["kind"], r["step"]) for r in mpi] == [(r["kind"], r["step"]) for r in simulated]
    assert [r["kind"] for r in mpi].count("diag") == 4 and mpi[-1]["steps"] == 16
    assert simulated[0]["config"]["engine"] == "sim" and simulated[0]["learners"] == 2
    for a, b in zip(mpi[1:], simulated[1:]):
        assert sorted(a) == sorted(b)
        for key, value in a.items():
            if isinstance(value, float):
                assert close(value, b[key], 1e-3 if a["kind"] == "diag" else 1e-5), (a["kind"], a["step"], key)


@pytest.mark.mpi
def test_the_simulated_run_writes_the_same_tensorboard_tags_and_values(both):
    mpi, simulated = tensorboard_scalars(both / "mpi" / "tb"), tensorboard_scalars(both / "sim" / "tb")
    assert sorted(mpi) == sorted(simulated)
    assert {"train/loss", "test/accuracy", "noise/alpha_e_over_alpha", "noise/delta", "consensus/distance"} <= set(mpi)
    for tag, values in mpi.items():
        assert [s for s, _ in values] == [s for s, _ in simulated[tag]], tag
        rel = 1e-3 if tag.split("/")[0] in ("noise", "grad", "consensus", "diag") else 1e-5
        assert all(close(a, b, rel) for (_, a), (_, b) in zip(values, simulated[tag])), tag


@pytest.mark.mpi
def test_checkpoints_have_the_mpi_format_and_either_engine_resumes_the_other(both, tmp_path):
    mpi_files = sorted(p.name for p in (both / "mpi" / "ckpt" / "last").iterdir())
    assert mpi_files == sorted(p.name for p in (both / "sim" / "ckpt" / "last").iterdir())
    manifests = [json.loads((both / engine / "ckpt" / "last" / "manifest.json").read_text())
                 for engine in ("mpi", "sim")]
    assert [(m["format"], m["size"], m["generation"], m["step"], [f["name"] for f in m["files"]]) for m in manifests] \
        == [(2, 2, 1, 16, [f"learner-0000{j}-of-00002.s000001.pt" for j in range(2)])] * 2
    for name in (n for n in mpi_files if n.endswith(".pt")):
        a = torch.load(both / "mpi" / "ckpt" / "last" / name, weights_only=False)
        b = torch.load(both / "sim" / "ckpt" / "last" / name, weights_only=False)
        assert (a["rank"], a["size"], a["extra"]) == (b["rank"], b["size"], b["extra"])
        for key, value in a["model"].items():
            torch.testing.assert_close(b["model"][key], value, rtol=1e-4, atol=1e-6)
        for index, state in a["optimizer"]["state"].items():
            torch.testing.assert_close(b["optimizer"]["state"][index]["momentum_buffer"], state["momentum_buffer"],
                                       rtol=1e-4, atol=1e-6)
        assert b["optimizer"]["horovod_dpsgd"] == a["optimizer"]["horovod_dpsgd"]
    # the simulator resumes the MPI run's checkpoint, and horovodrun the simulator's
    for engine, other in (("sim", "mpi"), ("mpi", "sim")):
        extra = ["--epochs", "3", "--max-steps", "24", "--checkpoint-dir", str(both / other / "ckpt"),
                 "--metrics-file", str(tmp_path / f"{engine}.jsonl")]
        if engine == "mpi":
            proc = run(horovodrun_command(2, CLI + TRAIN + extra), timeout=240, np_=2)
        else:
            proc = run([sys.executable, *CLI, *TRAIN, "--engine", "sim", "--np", "2", *extra], timeout=240)
        assert proc.returncode == 0, proc.stdout[-4000:]
        records = read(tmp_path / f"{engine}.jsonl")
        assert records[0]["resumed"] and records[0]["step"] == 16 and records[-1]["steps"] == 24


# -- the simulator's own runs -------------------------------------------------------------------------------------

def sim_train(tmp_path, name, *args):
    proc = run([sys.executable, *CLI, *TRAIN, "--engine", "sim", "--np", "3", "--metrics-file",
                str(tmp_path / f"{name}.jsonl"), *args], timeout=240)
    assert proc.returncode == 0, proc.stdout[-4000:]
    return read(tmp_path / f"{name}.jsonl")


def test_a_resumed_simulated_run_continues_exactly_like_the_uninterrupted_one(tmp_path):
    straight = sim_train(tmp_path, "straight")
    ckpt = ["--checkpoint-dir", str(tmp_path / "ckpt")]
    sim_train(tmp_path, "interrupted", "--epochs", "1", *ckpt)  # stops after epoch 1, with a checkpoint
    resumed = sim_train(tmp_path, "resumed", *ckpt)
    first_epoch = next(r["step"] for r in straight if r["kind"] == "epoch")
    assert resumed[0]["resumed"] and resumed[0]["step"] == first_epoch
    later = {(r["kind"], r["step"]): r for r in straight if r["step"] > first_epoch}
    assert [(r["kind"], r["step"]) for r in resumed[1:]] == list(later)
    for r in resumed[1:]:
        assert r == later[(r["kind"], r["step"])]


@pytest.mark.parametrize("args,words", [
    (["train", "--engine", "sim"], "--engine sim needs the number of learners, e.g. --np 5"),
    (["train", "--engine", "sim", "--np", "4", "--topology", "random_graph:0.01"], "does not fit 4 learners"),
])
def test_simulated_train_errors_name_the_fix(args, words, monkeypatch):
    for name in ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK", "MPI_LOCALNRANKS", "HOROVOD_RANK"):
        monkeypatch.delenv(name, raising=False)
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 2, r.output
    assert words in r.output and "Traceback" not in r.output


def test_simulated_train_under_horovodrun_is_refused(monkeypatch):
    monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "2")
    r = CliRunner().invoke(main, ["train", "--engine", "sim", "--np", "2"])
    assert r.exit_code == 2 and "not under horovodrun" in r.output


def test_plain_dpsgd_train_suggests_the_simulator(monkeypatch):
    for name in ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK", "MPI_LOCALNRANKS", "HOROVOD_RANK"):
        monkeypatch.delenv(name, raising=False)
    r = CliRunner().invoke(main, ["train"])
    assert r.exit_code == 2 and "--engine sim --np N" in r.output


def test_compare_with_the_simulator_runs_every_configuration_in_this_process(tmp_path):
    r = CliRunner().invoke(main, ["compare", "--engine", "sim", "--np", "3", "--seeds", "0,1", "--batch-size", "100",
                                  "--epochs", "1", "--max-steps", "4", "--diag-every", "2", "--out", str(tmp_path),
                                  "--run", "ssgd:algorithm=ssgd", "--run", "dpsgd:topology=ring"])
    assert r.exit_code == 0, r.output
    assert "horovodrun" not in r.output
    for name in ("ssgd-seed0", "ssgd-seed1", "dpsgd-seed0", "dpsgd-seed1"):
        cfg = TrainConfig.load(str(tmp_path / name / "config.json"))
        assert (cfg.engine, cfg.np) == ("sim", 3)
        records = read(tmp_path / name / "metrics.jsonl")
        assert records[0]["learners"] == 3 and records[-1]["steps"] == 4
    assert (tmp_path / "summary.json").exists() and (tmp_path / "alpha_e.png").exists()


def test_the_simulator_study_example_runs_and_draws_its_figure(tmp_path):
    proc = run([sys.executable, "examples/simulator_study.py", "--quick", "--out", str(tmp_path), "--ns", "4",
                "--lrs", "0.3", "1.0", "--lr-n", "4", "--topologies", "ring", "full"], timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:]
    study = json.loads((tmp_path / "study.json").read_text())
    assert set(study["by_n"]) == {"ring", "full", "ssgd"} and [r["n"] for r in study["by_n"]["ring"]] == [4]
    assert [r["lr"] for r in study["by_lr"]["full"]] == [0.3, 1.0]
    assert (tmp_path / "simulator_study.png").stat().st_size > 10_000 and "| ring |" in proc.stdout
