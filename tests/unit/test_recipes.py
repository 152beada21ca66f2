"""The paper's experiments as compare recipes, compare --recipe, and the Sec. 2 tables and Fig. 2 (no MPI)."""

import json
import math

import pytest
from click.testing import CliRunner

from horovod_dpsgd.experiments import cli, recipes, reports
from horovod_dpsgd.experiments.cli import COMPARE_KEYS, main
from horovod_dpsgd.experiments.config import ConfigError, TrainConfig, parse_assignments


def invoke(*args):
    return CliRunner().invoke(main, list(args))


@pytest.mark.parametrize("recipe", list(recipes.RECIPES.values()), ids=list(recipes.RECIPES))
def test_every_recipe_is_a_valid_configuration_with_valid_runs(recipe):
    base = TrainConfig().replace(**recipe.settings)
    for spec in recipe.runs:
        name, _, assignments = spec.partition(":")
        base.replace(**parse_assignments(assignments, COMPARE_KEYS))
    assert recipe.np >= 2 and recipe.seeds


def test_the_full_recipes_have_three_seeds_and_the_demo_ones_are_reductions_of_them():
    assert len(recipes.SEC21.seeds) >= 3 and len(recipes.SEC22.seeds) >= 3
    for demo, full in ((recipes.DEMO21, recipes.SEC21), (recipes.DEMO22, recipes.SEC22)):
        assert (demo.np, demo.runs) == (full.np, full.runs)
        changed = {k for k in full.settings if demo.settings[k] != full.settings[k]}
        assert changed <= {"max_steps"} and demo.settings["max_steps"] <= full.settings["max_steps"]


def test_sec2_recipes_have_the_papers_settings():
    """Sec. 2: 784-50-50-10 MLP on MNIST, plain SGD, nB = 2000 (2.1: n = 5, alpha = 1, full averaging;
    2.2: n = 6, alpha = 0.2, ring with 2 neighbours per side; nB = 6 x 333 = 1998, the nearest multiple)."""
    for recipe, n, lr, topology in ((recipes.SEC21, 5, 1.0, "full"), (recipes.SEC22, 6, 0.2, "ring:2")):
        cfg = TrainConfig().replace(**recipe.settings)
        assert (cfg.task, cfg.model, cfg.momentum, cfg.weight_decay, cfg.lr) == ("mnist", "mlp", 0.0, 0.0, lr)
        assert recipe.np == n and abs(cfg.batch_size * n - 2000) < n and not cfg.linear_scaling
        assert 3990 <= cfg.probe_batches * cfg.batch_size <= 4000  # g of Eq. 3 on the whole training sample
        runs = dict(spec.split(":", 1) for spec in recipe.runs)
        assert set(runs) == {"ssgd", "dpsgd", "ssgd*"}
        assert f"topology={topology}" in runs["dpsgd"] and "noise_sigma=" in runs["ssgd*"]


def test_get_recipe_names_the_recipes_there_are():
    assert recipes.get_recipe("sec2.1") is recipes.SEC21
    with pytest.raises(KeyError, match="sec2.1, sec2.2, demo2.1, demo2.2"):
        recipes.get_recipe("sec3")


def test_a_reduced_recipe_changes_only_what_it_says():
    small = recipes.SEC21.reduced("tiny", "a test", max_steps=4)
    assert small.settings["max_steps"] == 4 and recipes.SEC21.settings["max_steps"] != 4
    assert {k: v for k, v in small.settings.items() if k != "max_steps"} == \
        {k: v for k, v in recipes.SEC21.settings.items() if k != "max_steps"}
    assert (small.np, small.runs, small.seeds) == (recipes.SEC21.np, recipes.SEC21.runs, recipes.SEC21.seeds)
    assert recipes.SEC21.reduced("one", "a test", seeds=(0,)).seeds == (0,)


@pytest.fixture
def compare_calls(monkeypatch):
    """compare with each run replaced by a record of its arguments (and a finished metrics file)."""
    calls = []

    def fake_run(base, name, changes, seed, run_dir, np_, timeout, target, keep_checkpoint=False):
        calls.append(dict(cfg=base.replace(**changes, seed=seed), name=name, np=np_, keep=keep_checkpoint))
        return {"name": name, "seed": seed, "steps": 1, "diverged": False, "final_train_loss": 0.1,
                "test_error": 0.05, "best_test_error": 0.05, "steps_to_target": 1, "early_alpha_e_over_alpha": None}

    monkeypatch.setattr(cli, "_compare_run", fake_run)
    monkeypatch.setattr(reports, "plot", lambda *a: [])
    monkeypatch.setattr(reports, "plot_diagnostics", lambda *a: "diagnostics.png")
    return calls


def test_compare_recipe_sets_runs_seeds_learners_and_settings_that_options_override(compare_calls, tmp_path):
    r = invoke("compare", "--recipe", "sec2.2", "--max-steps", "7", "--out", str(tmp_path))
    assert r.exit_code == 0, r.output
    assert [c["name"] for c in compare_calls] == ["ssgd"] * 3 + ["dpsgd"] * 3 + ["ssgd*"] * 3
    assert {c["np"] for c in compare_calls} == {6}
    assert [c["cfg"].seed for c in compare_calls[:3]] == list(recipes.SEC22.seeds)
    dpsgd = compare_calls[3]["cfg"]
    assert (dpsgd.lr, dpsgd.batch_size, dpsgd.topology, dpsgd.engine) == (0.2, 333, "ring:2", "sim")
    assert dpsgd.max_steps == 7 and dpsgd.pixel_max == recipes.SEC22.settings["pixel_max"]
    assert "| seed 0 | seed 1 | seed 2 | mean |" in r.output and "| dpsgd | 5.0 | 5.0 | 5.0 | 5.0 |" in r.output

    compare_calls.clear()
    r = invoke("compare", "--recipe", "sec2.1", "--np", "3", "--seeds", "4", "--run", "x:algorithm=ssgd",
               "--out", str(tmp_path))
    assert r.exit_code == 0, r.output
    assert [(c["name"], c["np"], c["cfg"].seed, c["cfg"].lr) for c in compare_calls] == [("x", 3, 4, 1.0)]


def test_compare_without_a_recipe_keeps_its_defaults(compare_calls, tmp_path):
    r = invoke("compare", "--out", str(tmp_path), "--run", "a:algorithm=ssgd")
    assert r.exit_code == 0, r.output
    assert [(c["np"], c["cfg"].seed, c["cfg"]) for c in compare_calls] == [(4, 0, TrainConfig(algorithm="ssgd"))]


def test_compare_refuses_a_recipe_and_a_config_file(tmp_path):
    TrainConfig().save(str(tmp_path / "c.json"))
    r = invoke("compare", "--recipe", "sec2.1", "--config", str(tmp_path / "c.json"))
    assert r.exit_code == 2 and "not both" in r.output


def test_keep_checkpoints_saves_only_the_final_learners(monkeypatch, tmp_path):
    ran = []
    monkeypatch.setattr(cli, "_simulated_run", lambda cfg, *a: ran.append(cfg))
    monkeypatch.setattr(reports, "read_metrics", lambda path: [])
    base = TrainConfig().replace(**recipes.SEC21.settings)
    cli._compare_run(base, "dpsgd", {}, 0, tmp_path / "d", 5, 10, 0.9, keep_checkpoint=True)
    cli._compare_run(base, "dpsgd", {}, 0, tmp_path / "e", 5, 10, 0.9)
    assert ran[0].checkpoint_dir == str(tmp_path / "d" / "checkpoint") and ran[0].checkpoint_every == base.epochs
    assert ran[1].checkpoint_dir is None


def _write_run(root, name, seed, losses, finished=True, diverged=False, accuracy=0.9, diag=None):
    d = root / f"{name}-seed{seed}"
    d.mkdir(parents=True)
    records = [{"kind": "step", "step": i + 1, "loss": v} for i, v in enumerate(losses)]
    records += [{"kind": "diag", "step": i + 1, **row} for i, row in enumerate(diag or [])]
    records.append({"kind": "epoch", "step": len(losses), "accuracy": accuracy})
    if finished:
        records.append({"kind": "end", "step": len(losses), "steps": len(losses), "diverged": diverged})
    (d / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in records))


def test_collect_reads_every_finished_run_and_the_seed_table_shows_each_seed(tmp_path):
    _write_run(tmp_path, "dpsgd", 0, [2.0, 0.1], accuracy=0.95)
    _write_run(tmp_path, "dpsgd", 1, [2.0, 0.2], accuracy=0.93)
    _write_run(tmp_path, "ssgd*0.01", 0, [2.0, 1.5], accuracy=0.5)
    _write_run(tmp_path, "ssgd", 0, [2.0, math.nan], diverged=True)
    _write_run(tmp_path, "ssgd", 1, [2.0, 2.0], finished=False)  # still running: left out
    results = reports.collect(tmp_path)
    assert [(r["name"], r["seed"]) for r in results] == [("dpsgd", 0), ("dpsgd", 1), ("ssgd", 0), ("ssgd*0.01", 0)]
    text = reports.seed_table(results)
    assert text.splitlines()[0] == "| run | seed 0 | seed 1 | mean |"
    assert "| dpsgd | 5.0 | 7.0 | 6.0 |" in text
    assert "| ssgd | diverged | - | - |" in text and "| ssgd*0.01 | 50.0 | - | 50.0 |" in text


def test_the_papers_colours_go_by_the_run_names_prefix():
    assert [reports.algorithm_color(n) for n in ("ssgd", "dpsgd", "ssgd*", "ssgd*0.003", "dpsgd-ring", "x")] == \
        ["tab:red", "tab:green", "tab:blue", "tab:blue", "tab:green", "tab:gray"]


def test_figure2_draws_both_sections_and_prints_their_tables(tmp_path):
    for section in ("a", "b"):
        for name, final in (("ssgd", 1.5), ("dpsgd", 0.01), ("ssgd*", 0.3)):
            _write_run(tmp_path / section, name, 0, [2.0, 1.0, final],
                       diag=[{"alpha_e_over_alpha": 0.5, "delta": 0.1}, {"alpha_e_over_alpha": 0.9, "delta": 0.0}])
    r = invoke("figure2", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "fig" / "f.png"),
               "--diagnostics-out", str(tmp_path / "fig" / "d.png"))
    assert r.exit_code == 0, r.output
    assert (tmp_path / "fig" / "f.png").stat().st_size > 10_000 and (tmp_path / "fig" / "d.png").stat().st_size > 10_000
    assert r.output.count("| seed 0 | mean |") == 2 and "Sec. 2.1" in r.output and "Sec. 2.2" in r.output
    assert r.output.count("| run | seed | step 500 | step 1000 | step 2000 | step 3000 |") == 2
    assert "Median alpha_e_over_alpha by steps" in r.output and "Median delta by steps" in r.output
    assert r.output.count("Median training loss by steps") == 2


def test_figure2_on_a_directory_without_finished_runs_says_what_to_run(tmp_path):
    (tmp_path / "a").mkdir()
    r = invoke("figure2", str(tmp_path / "a"), str(tmp_path / "a"))
    assert r.exit_code == 2 and "no finished run" in r.output and "horovod-dpsgd compare" in r.output


def test_the_steps_table_gives_the_test_error_of_the_last_evaluation_at_each_step(tmp_path):
    d = tmp_path / "dpsgd-seed0"
    d.mkdir()
    records = [{"kind": "epoch", "step": 100, "accuracy": 0.5}, {"kind": "epoch", "step": 200, "accuracy": 0.9},
               {"kind": "end", "step": 200, "steps": 200, "diverged": False}]
    (d / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in records))
    text = reports.steps_table(tmp_path, [50, 100, 150, 200, 300])
    assert text.splitlines()[0] == "| run | seed | step 50 | step 100 | step 150 | step 200 | step 300 |"
    assert "| dpsgd | 0 | - | 50.0 | 50.0 | 10.0 | - |" in text


def test_an_optional_setting_is_unset_with_none_so_a_recipe_can_be_varied_back_to_the_default():
    assert parse_assignments("pixel_max=none,max_steps=None", COMPARE_KEYS) == {"pixel_max": None, "max_steps": None}
    with pytest.raises(ConfigError, match="lr: .none. is not a valid float"):  # lr has no None
        parse_assignments("lr=none", COMPARE_KEYS)


def test_summaries_give_the_median_alpha_e_of_the_first_and_the_last_quarter(tmp_path):
    _write_run(tmp_path, "dpsgd", 0, [1.0], diag=[{"alpha_e_over_alpha": a} for a in (0.1, 0.3, 0.5, 0.6, 0.9, 1.1,
                                                                                       0.95, 1.0)])
    (result,) = reports.collect(tmp_path)
    assert result["early_alpha_e_over_alpha"] == pytest.approx(0.2)
    assert result["late_alpha_e_over_alpha"] == pytest.approx(0.975)
    assert "| 0.2 | 0.975 |" in reports.table([result], 0.9)


def test_the_windows_table_gives_the_median_of_a_diagnostic_between_steps(tmp_path):
    _write_run(tmp_path, "dpsgd", 0, [1.0], diag=[{"alpha_e_over_alpha": a} for a in (0.1, 0.3, 0.5, 2.0, math.nan)])
    text = reports.windows_table(tmp_path, "alpha_e_over_alpha", [0, 2, 4, 10, 20])
    assert text.splitlines()[0] == "| run | seed | steps 0-2 | steps 2-4 | steps 4-10 | steps 10-20 |"
    assert "| dpsgd | 0 | 0.2 | 1.25 | - | - |" in text  # steps 1-2, 3-4; step 5 is NaN


def test_the_windows_table_of_the_training_loss_reads_the_step_records(tmp_path):
    _write_run(tmp_path, "dpsgd", 0, [4.0, 2.0, 1.0, 3.0, math.nan], diag=[{"loss": 100.0}])  # a diag "loss" is ignored
    text = reports.windows_table(tmp_path, "loss", [0, 2, 5], kind="step")
    assert "| dpsgd | 0 | 3 | 2 |" in text  # steps 1-2: median of 4, 2; steps 3-5: of 1, 3 (NaN left out)


def test_figure2_draws_only_the_runs_named_in_draw(tmp_path, monkeypatch):
    drawn = []
    monkeypatch.setattr(reports, "plot_figure2", lambda a, b, out, n21, n22, seed: drawn.append((n21, n22)) or out)
    for name in ("ssgd", "dpsgd", "ssgd*0.01", "ssgd*0.003"):
        _write_run(tmp_path / "a", name, 0, [1.0])
    _write_run(tmp_path / "b", "ssgd*", 0, [1.0])
    r = invoke("figure2", str(tmp_path / "a"), str(tmp_path / "b"), "--draw", "ssgd,ssgd*0.003,ssgd*")
    assert r.exit_code == 0, r.output
    assert drawn == [(["ssgd", "ssgd*0.003"], ["ssgd*"])] and "| ssgd*0.01 |" in r.output
