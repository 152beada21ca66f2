"""`make demo` end to end in reduced form: the Makefile's own commands (the Sec. 2.1 and 2.2 recipes and the Fig. 2
drawing), with a few steps and one seed. The paper's numbers are not asserted here (docs/reproduction.md has them)."""

import shlex
import subprocess
import sys

from launch import REPO, run

#: Appended to each compare command of the demo: later options override the recipe and the Makefile's.
REDUCED = ["--max-steps", "4", "--seeds", "0", "--diag-every", "2", "--eval-every", "1"]


def demo_commands(out_dir) -> list:
    """The horovod-dpsgd commands `make demo` runs (as `make -n` prints them), writing under ``out_dir``."""
    printed = subprocess.run(["make", "-n", "demo", f"VENV={sys.prefix}"], cwd=REPO, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, timeout=60, check=True).stdout
    commands = [shlex.split(line.replace("runs/demo", str(out_dir))) for line in printed.splitlines()
                if "horovod-dpsgd " in line]
    return [cmd + REDUCED if cmd[1] == "compare" else cmd for cmd in commands]


def test_make_demo_runs_both_recipes_and_draws_figure_2(tmp_path):
    commands = demo_commands(tmp_path)
    assert [cmd[1] for cmd in commands] == ["compare", "compare", "figure2"], commands
    assert all("--recipe" in cmd for cmd in commands[:2])  # the settings live in recipes.py, not in the Makefile
    outputs = []
    for cmd in commands:
        proc = run(cmd, timeout=300)
        assert proc.returncode == 0, proc.stdout[-4000:]
        outputs.append(proc.stdout)
    for compare_output in outputs[:2]:
        assert "| run | seed 0 | mean |" in compare_output
        for name in ("ssgd", "dpsgd", "ssgd*"):
            assert f"| {name} |" in compare_output
    assert outputs[2].count("| run | seed 0 | mean |") == 2
    figure = next(tmp_path.rglob("figure2.png"))
    assert figure.stat().st_size > 10_000
