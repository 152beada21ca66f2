"""The click CLI's argument handling, recipes and compare summaries (no MPI)."""

import json
import math

import pytest
from click.testing import CliRunner

from horovod_dpsgd.experiments import recipes, reports as compare
from horovod_dpsgd.experiments.cli import _parse_run, _train_command, main


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
    (["topology", "ring"], "Missing option '--size'"),
    (["train", "--batch-size", "0"], "Invalid value for '--batch-size'"),
    (["train", "--algorithm", "adam"], "Invalid value for '--algorithm'"),
    (["train", "--decay-epochs", "1,x"], "comma-separated numbers"),
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


def test_run_specs_become_train_commands():
    spec = _parse_run("ssgd*:algorithm=ssgd,noise_sigma=0.01")
    assert spec == {"name": "ssgd*", "algorithm": "ssgd", "noise-sigma": "0.01"}
    cmd = _train_command(4, {"algorithm": "ssgd", "noise-sigma": "0.01", "linear-scaling": False,
                             "download": False, "decay-epochs": (1.0, 2.0), "data-dir": None})
    assert cmd[1:3] == ["-np", "4"] and cmd[-7:] == ["--algorithm", "ssgd", "--noise-sigma", "0.01",
                                                      "--no-linear-scaling", "--decay-epochs", "1.0,2.0"]


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
    assert good["early_alpha_e_over_alpha"] == pytest.approx(0.4)
    assert bad["diverged"] and math.isnan(bad["test_error"])
    text = compare.table([good, bad], 0.9)
    assert "| dpsgd | 1 | no |" in text and "| ssgd | 1 | yes |" in text
    assert [p.name for p in compare.plot(tmp_path, ["dpsgd", "ssgd"], [0, 0])] == ["loss.png", "accuracy.png",
                                                                                  "alpha_e.png"]
