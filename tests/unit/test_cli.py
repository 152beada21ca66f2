"""The click CLI's argument handling, recipes and compare summaries (no MPI)."""

import dataclasses
import json
import math
import subprocess
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from horovod_dpsgd.experiments import cli, recipes, reports as compare, training
from horovod_dpsgd.experiments.cli import main
from horovod_dpsgd.experiments.config import ConfigError, TrainConfig, parse_assignments, setting_names


def invoke(*args):
    return CliRunner().invoke(main, list(args))


def test_topology_command_prints_neighbours_and_gap():
    r = invoke("topology", "ring:2", "--size", "6")
    assert r.exit_code == 0, r.output
    assert "ring (k=2): 6 learners" in r.output and "spectral gap" in r.output
    r = invoke("topology", "random_peer", "--size", "4", "--step", "3")
    assert r.exit_code == 0 and "W(3) =" in r.output


@pytest.mark.parametrize("args,words", [
    (["topology", "torus", "--size", "4"], "unknown topology"),
    (["topology", "ring"], "give --size N or --hosts HxL"),
    (["train", "--batch-size", "0"], "Invalid value for '--batch-size'"),
    (["train", "--algorithm", "adam"], "Invalid value for '--algorithm'"),
    (["train", "--decay-epochs", "1,x"], "comma-separated float values"),
    (["train", "--checkpoint-every", "0"], "Invalid value for '--checkpoint-every'"),
    (["compare", "--run", "d:lr=fast"], "lr: 'fast' is not a valid float"),
    (["compare", "--run", "d:speed=2"], "unknown key 'speed'; valid keys: task, model, algorithm"),
    (["compare", "--run", "d:seed=2"], "unknown key 'seed'"),
    (["compare", "--run", "d:algorithm=ssgd", "--run", "d:algorithm=dpsgd"], "run names must differ"),
    (["compare", "--run", "dpsgd:topology"], "NAME:KEY=VALUE"),
    (["train", "--noise-sigma", "-1"], "Invalid value for '--noise-sigma'"),
])
def test_bad_options_get_click_errors_not_tracebacks(args, words):
    r = invoke(*args)
    assert r.exit_code == 2, r.output
    assert words in r.output
    assert "Traceback" not in r.output


def test_every_option_has_help_text():
    for command in main.commands.values():
        for param in command.params:
            if param.param_type_name == "option":
                assert param.help, f"{command.name} {param.name} has no help"


@pytest.fixture
def launched(monkeypatch):
    """`train` as under horovodrun, with the training loop replaced by a list of the configurations it got."""
    configs = []
    monkeypatch.setattr(training, "train", configs.append)
    monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "2")
    return configs


def test_train_has_one_option_per_config_field_and_no_other():
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    options = {p.name for p in main.commands["train"].params if isinstance(p, click.Option)}
    assert options - {"config_file"} == fields
    compare_options = {p.name for p in main.commands["compare"].params if isinstance(p, click.Option)}
    assert set(cli.COMPARE_KEYS) <= compare_options and set(cli.COMPARE_KEYS) == set(setting_names()) - {"seed", "np"}
    for name in fields:  # every option and its default come from the field
        option = next(p for p in main.commands["train"].params if p.name == name)
        assert TrainConfig(**{name: option.type_cast_value(None, option.default)}) == TrainConfig(), name


def test_every_train_option_is_documented():
    text = (Path(__file__).resolve().parents[2] / "docs" / "cli.md").read_text()
    for f in dataclasses.fields(TrainConfig):
        assert f"--{f.name.replace('_', '-')}" in text, f.name


def test_config_values_are_checked_however_they_arrive(tmp_path):
    cfg = TrainConfig(lr=1, decay_epochs=[160, 240], topology="ring:2")
    assert cfg.lr == 1.0 and isinstance(cfg.lr, float) and cfg.decay_epochs == (160.0, 240.0)
    path = tmp_path / "config.json"
    cfg.save(str(path))
    assert TrainConfig.load(str(path)) == cfg
    assert json.loads(path.read_text())["decay_epochs"] == [160.0, 240.0]
    for bad, words in [(dict(batch_size=0), "batch_size: 0 is not in the range x>=1"),
                       (dict(batch_size=1.5), "batch_size: expected an integer, got 1.5"),
                       (dict(epochs=True), "epochs: expected an integer"),
                       (dict(linear_scaling="maybe"), "linear_scaling: 'maybe' is not a valid boolean"),
                       (dict(topology="torus"), "unknown topology"),
                       (dict(algorithm="adam"), "algorithm: 'adam' is not one of"),
                       (dict(lr=None), "lr: a value is required"),
                       (dict(pixel_max=0), "pixel_max: 0.0 is not in the range x>0"),
                       (dict(task="synthetic_seq", pixel_max=1.5), "pixel_max scales MNIST's pixels")]:
        with pytest.raises(ConfigError, match=words.replace("(", r"\(")):
            TrainConfig(**bad)
    with pytest.raises(ConfigError, match="unknown key 'speed'; valid keys: task, model"):
        TrainConfig.from_dict({"speed": 2})


def test_key_value_assignments_are_parsed_by_the_field_types():
    assert parse_assignments("lr=0.5,decay_epochs=160,240,linear-scaling=true,topology=ring:2,max_steps=7",
                             setting_names()) == {"lr": 0.5, "decay_epochs": (160.0, 240.0), "linear_scaling": True,
                                                  "topology": "ring:2", "max_steps": 7}
    with pytest.raises(ConfigError, match=r"epochs: 'ten' is not a valid integer"):
        parse_assignments("epochs=ten", setting_names())
    with pytest.raises(ConfigError, match="lr is given twice"):
        parse_assignments("lr=1,lr=2", setting_names())


def test_train_config_file_is_overridden_by_explicit_options(tmp_path, launched):
    path = tmp_path / "run.json"
    TrainConfig(lr=0.25, epochs=3, linear_scaling=True, decay_epochs=(1.0,)).save(str(path))
    r = invoke("train", "--config", str(path), "--epochs", "5", "--no-linear-scaling")
    assert r.exit_code == 0, r.output
    assert launched[-1] == TrainConfig(lr=0.25, epochs=5, linear_scaling=False, decay_epochs=(1.0,))
    r = invoke("train", "--epochs", "10", "--config", str(path))  # an option equal to its default still overrides
    assert launched[-1].epochs == 10 and launched[-1].lr == 0.25
    path.write_text(json.dumps({"lr": -1}))
    r = invoke("train", "--config", str(path))
    assert r.exit_code == 2, r.output
    assert "Invalid value for --config" in r.output and "lr: -1.0 is not in the range" in r.output


def test_compare_hands_each_run_its_configuration_as_a_file(tmp_path, monkeypatch):
    """compare writes RUN_DIR/config.json and launches `train --config` on it; `train` reads back exactly the
    configuration compare meant (bools and lists included). The job itself is replaced by that parse."""
    launched = []

    def fake_run(cmd, **kwargs):
        assert cmd[1:3] == ["-np", "2"] and cmd[-3:-1] == ["train", "--config"], cmd
        r = CliRunner().invoke(main, cmd[cmd.index("train"):])  # what the job's `train` parses
        assert r.exit_code == 0, r.output
        cfg = launched[-1]
        Path(cfg.metrics_file).write_text(json.dumps({"kind": "end", "step": 3, "steps": 3, "diverged": False}))
        return subprocess.CompletedProcess(cmd, 0, "ok", None)

    monkeypatch.setattr(training, "train", launched.append)
    monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "2")
    monkeypatch.setattr(cli.subprocess, "run", fake_run)
    monkeypatch.setattr(compare, "plot", lambda *a: [])
    r = invoke("compare", "--np", "2", "--seeds", "0,1", "--epochs", "2", "--linear-scaling", "--out", str(tmp_path),
               "--run", "a:algorithm=ssgd",
               "--run", "b:linear_scaling=false,decay_epochs=1,1.5,topology=random_graph:0.05")
    assert r.exit_code == 0, r.output
    assert len(launched) == 4
    b1 = TrainConfig.load(str(tmp_path / "b-seed1" / "config.json"))
    assert launched[3] == b1 == TrainConfig(epochs=2, linear_scaling=False, decay_epochs=(1.0, 1.5),
                                           topology="random_graph:0.05", seed=1, np=2, quiet=True,
                                           metrics_file=str(tmp_path / "b-seed1" / "metrics.jsonl"),
                                           log_dir=str(tmp_path / "b-seed1" / "tb"))
    assert launched[0].algorithm == "ssgd" and launched[0].linear_scaling and launched[0].seed == 0


def test_linear_scaling_warmup_and_step_decay():
    assert recipes.scaled_lr(0.1, 8192, 1024, True) == pytest.approx(0.8)  # paper Table 3
    assert recipes.scaled_lr(0.1, 8192, 1024, False) == 0.1
    m = recipes.lr_multiplier(steps_per_epoch=10, start_fraction=0.125, warmup_epochs=2, decay_epochs=[5, 8])
    assert m(0) == pytest.approx(0.125) and m(10) == pytest.approx(0.5625) and m(20) == 1.0
    assert m(49) == 1.0 and m(50) == pytest.approx(0.1) and m(80) == pytest.approx(0.01)
    with pytest.raises(ValueError, match="steps_per_epoch"):
        recipes.lr_multiplier(0)


def test_summaries_and_table(tmp_path):
    def write(name, records):
        d = tmp_path / f"{name}-seed0"
        d.mkdir()
        (d / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in records))
        return compare.summarize(name, 0, compare.read_metrics(d / "metrics.jsonl"), 0.9)

    good = write("dpsgd", [{"kind": "step", "step": 1, "loss": 2.0}, {"kind": "step", "step": 2, "loss": 0.5},
                           {"kind": "epoch", "step": 1, "accuracy": 0.8}, {"kind": "epoch", "step": 2, "accuracy": 0.95},
                           {"kind": "diag", "step": 1, "alpha_e_over_alpha": 0.4},
                           {"kind": "end", "step": 2, "steps": 2, "diverged": False}])
    bad = write("ssgd", [{"kind": "step", "step": 1, "loss": float("nan")},
                         {"kind": "end", "step": 1, "steps": 1, "diverged": True}])
    assert good["steps_to_target"] == 2 and good["test_error"] == pytest.approx(0.05)
    assert good["early_alpha_e_over_alpha"] == pytest.approx(0.4) == good["late_alpha_e_over_alpha"]
    assert bad["diverged"] and math.isnan(bad["test_error"])
    text = compare.table([good, bad], 0.9)
    assert "| dpsgd | 1 | no |" in text and "| ssgd | 1 | yes |" in text
    assert [p.name for p in compare.plot(tmp_path, ["dpsgd", "ssgd"], [0, 0])] == ["loss.png", "accuracy.png",
                                                                                  "alpha_e.png"]


def test_plain_train_without_horovodrun_is_a_click_error_naming_the_command():
    """issue 15: `horovod-dpsgd train` started as one plain process (no launcher) must not print a traceback."""
    import os
    import subprocess
    import sys
    from launch import REPO
    launcher = ("OMPI_COMM_WORLD", "PMI_", "PMIX_", "HOROVOD_RANK", "HOROVOD_SIZE", "MPI_LOCALNRANKS")
    env = {k: v for k, v in os.environ.items() if not k.startswith(launcher)}
    proc = subprocess.run([sys.executable, "-m", "horovod_dpsgd.experiments.cli", "train", "--max-steps", "1"],
                          cwd=REPO, env={**env, "PYTHONPATH": str(REPO)}, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=120)
    assert proc.returncode == 2, proc.stdout[-3000:]
    assert "Traceback" not in proc.stdout
    assert "horovodrun -np N horovod-dpsgd train" in proc.stdout and "python ..." not in proc.stdout


def test_topology_is_checked_for_syntax_only_at_parse_time(monkeypatch):
    """issue 15: random_graph:0.05 has no connected graph on 8 nodes, but is valid at np = 2: the option accepts it
    (the job validates it for its world size); malformed specs are still usage errors."""
    from horovod_dpsgd.experiments import training
    ran = []
    monkeypatch.setattr(training, "train", ran.append)
    monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "2")  # as under horovodrun
    r = invoke("train", "--topology", "random_graph:0.05")
    assert r.exit_code == 0, r.output
    assert ran[0].topology == "random_graph:0.05"
    for bad, words in [("torus", "unknown topology"), ("ring:x", "bad argument"), ("random_graph:2", "(0, 1]")]:
        r = invoke("train", "--topology", bad)
        assert r.exit_code == 2 and words in r.output, r.output
