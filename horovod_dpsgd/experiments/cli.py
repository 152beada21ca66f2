"""``horovod-dpsgd``: train, compare algorithms, inspect topologies and loss landscapes.

    horovodrun -np 4 horovod-dpsgd train --algorithm dpsgd --topology ring
    horovod-dpsgd train --engine sim --np 4 --algorithm dpsgd --topology ring   # the same run, simulated
    horovod-dpsgd compare --np 4                # SSGD vs DPSGD vs SSGD*, as separate horovodrun jobs
    horovod-dpsgd compare --np 4 --engine sim   # ... each simulated in this process
    horovod-dpsgd compare --recipe sec2.1       # the paper's Sec. 2.1 experiment (recipes.py)
    horovod-dpsgd figure2 runs/sec2.1 runs/sec2.2   # its Fig. 2 and tables
    horovod-dpsgd topology ring:2 --size 6

The options of ``train`` and ``compare`` are generated from :class:`~.config.TrainConfig`, the one schema of a
run; ``compare`` hands each run its configuration as a file (``train --config RUN_DIR/config.json``).
"""

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import click

from horovod_dpsgd.errors import MPIEnvironmentError
from horovod_dpsgd.experiments.cluster.cli import cluster
from horovod_dpsgd.experiments.config import (CommaSeparated, ConfigError, TopologySpec, TrainConfig, click_options,
                                              output_names, parse_assignments, resolve, setting_names)
from horovod_dpsgd.experiments.launch import horovodrun_command, horovodrun_env, started_by_launcher
from horovod_dpsgd.experiments.recipes import RECIPES

#: ``train`` has an option for every field of TrainConfig.
TRAIN_KEYS = setting_names() + output_names()
#: What ``compare --run`` may vary, and ``compare``'s options for all runs: the settings but the seed (each seed
#: of ``--seeds`` is a run of its own) and the number of learners (``compare --np``); the outputs are placed in
#: ``--out`` for each run.
COMPARE_KEYS = tuple(name for name in setting_names() if name not in ("seed", "np"))
_TRAIN_HINT = "horovodrun -np N horovod-dpsgd train ..."
#: Exit status of ``train`` when the run diverged (NaN/inf training loss or weights).
EXIT_DIVERGED = 3


def _config_file_option(f):
    return click.option("--config", "config_file", type=click.Path(exists=True, dir_okay=False), default=None,
                        help="A JSON configuration (the config.json that train and compare write); options "
                             "given on the command line override its values.")(f)


def _config(ctx: click.Context, config_file: Optional[str], values: Dict) -> TrainConfig:
    """The configuration: ``--config`` (or the defaults), overridden by the options given explicitly."""
    try:
        base = TrainConfig.load(config_file) if config_file else TrainConfig()
    except ConfigError as exc:
        raise click.BadParameter(str(exc), ctx, param_hint="--config") from None
    return resolve(base, values, ctx)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main():
    """Decentralized Parallel SGD for Horovod: train, compare, inspect."""


@main.command()
@_config_file_option
@click_options(TRAIN_KEYS)
@click.pass_context
def train(ctx, config_file, **values):
    """Train one configuration. Run it under horovodrun: horovodrun -np 4 horovod-dpsgd train ...; or simulate
    the learners in this process: horovod-dpsgd train --engine sim --np 4 ...

    The exact configuration is written as config.json into --log-dir and --checkpoint-dir, and as the first
    record of --metrics-file."""
    cfg = _config(ctx, config_file, values)
    if cfg.engine == "mpi" and cfg.algorithm == "dpsgd" and not started_by_launcher():
        raise click.UsageError(
            "this is a single plain process, so DPSGD has no neighbours to average with: start one process per "
            f"learner with horovodrun, e.g. `{_TRAIN_HINT}`, or simulate all learners in this process with "
            "--engine sim --np N (or pass --algorithm ssgd to train one learner here)", ctx)
    from horovod_dpsgd.checkpoint import CheckpointError
    from horovod_dpsgd.experiments import training
    try:
        result = training.train(cfg)
    except MPIEnvironmentError as exc:
        raise click.ClickException(f"{exc}\nThe command line runs as `{_TRAIN_HINT}` (MPI, not --gloo).") from None
    except CheckpointError as exc:  # raised on every rank alike: each says it and exits, no rank is left waiting
        raise click.ClickException(str(exc)) from None
    if result and result["diverged"]:
        sys.exit(EXIT_DIVERGED)  # a NaN/inf model is not a success; compare reads the run's "end" record


DEFAULT_RUNS = ("ssgd:algorithm=ssgd", "dpsgd:algorithm=dpsgd,topology=full", "ssgd*:algorithm=ssgd,noise_sigma=0.01")


class RunSpec(click.ParamType):
    """``NAME:KEY=VALUE,...`` -> ``(NAME, {key: typed value})``; keys are :data:`COMPARE_KEYS`."""

    name = "run"

    def convert(self, value, param, ctx):
        if isinstance(value, tuple):
            return value
        name, colon, assignments = value.partition(":")
        try:
            if not name.strip() or not colon:
                raise ConfigError("no NAME")
            return name.strip(), parse_assignments(assignments, COMPARE_KEYS)
        except ConfigError as exc:
            self.fail(f"{value!r}: {exc} (expected NAME:KEY=VALUE,KEY=VALUE, e.g. "
                      "dpsgd:algorithm=dpsgd,topology=ring)", param, ctx)


@main.command()
@_config_file_option
@click.option("--recipe", type=click.Choice(list(RECIPES)), default=None,
              help="Start from one of the paper's experiments (horovod_dpsgd/experiments/recipes.py): its settings, "
                   "--np, --run list and --seeds; options given here override them. "
                   + "; ".join(f"{r.name}: {r.summary}" for r in RECIPES.values()))
@click_options(COMPARE_KEYS)
@click.option("--np", "np_", type=click.IntRange(min=1), default=None, help="Learners per run [default: 4, or the recipe's].")
@click.option("--run", "runs", type=RunSpec(), multiple=True, metavar="NAME:KEY=VAL,...",
              help="A configuration (repeatable): the options of compare (or --config) with these train settings "
                   "changed, e.g. 'dpsgd:algorithm=dpsgd,topology=ring'. Default: the recipe's, or "
                   + " ".join(DEFAULT_RUNS))
@click.option("--seeds", type=CommaSeparated(click.INT), default=None,
              help="Comma-separated seeds; each run is repeated per seed [default: 0, or the recipe's].")
@click.option("--keep-checkpoints", is_flag=True,
              help="Save each run's final learners in RUN_DIR/checkpoint/last (for the landscape and hessian commands).")
@click.option("--target-accuracy", type=click.FloatRange(0, 1), default=0.9, show_default=True,
              help="Report the first step whose test accuracy reaches this.")
@click.option("--out", type=click.Path(file_okay=False), default="runs/compare", show_default=True,
              help="Directory for each run's config.json, metrics, TensorBoard logs and output, and the plots.")
@click.option("--timeout", type=click.IntRange(min=1), default=1800, show_default=True, help="Seconds per run.")
@click.pass_context
def compare(ctx, config_file, recipe, np_, runs, seeds, keep_checkpoints, target_accuracy, out, timeout, **values):
    """Run several configurations as separate horovodrun jobs (or, with --engine sim, simulated in this process)
    and compare them."""
    from horovod_dpsgd.experiments import reports as cmp
    if recipe is not None:
        if config_file:
            raise click.UsageError("give --recipe or --config, not both (a recipe is a configuration)", ctx)
        recipe = RECIPES[recipe]
        base = resolve(TrainConfig().replace(**recipe.settings), values, ctx)
    else:
        base = _config(ctx, config_file, values)
    default_runs = recipe.runs if recipe else DEFAULT_RUNS
    np_ = np_ if np_ is not None else recipe.np if recipe else 4
    seeds = seeds if seeds is not None else recipe.seeds if recipe else (0,)
    specs: List[Tuple[str, dict]] = list(runs) or [RunSpec().convert(r, None, None) for r in default_runs]
    names = [name for name, _ in specs]
    if len(set(names)) < len(names):
        raise click.BadParameter(f"run names must differ (each names its directory in --out): {', '.join(names)}",
                                 ctx, param_hint="--run")
    if not seeds:
        raise click.BadParameter("give at least one seed", ctx, param_hint="--seeds")
    results: List[dict] = []
    for name, changes in specs:
        for seed in seeds:
            run_dir = Path(out) / f"{name}-seed{seed}"
            results.append(_compare_run(base, name, changes, seed, run_dir, np_, timeout, target_accuracy,
                                        keep_checkpoints))
            click.echo("   " + cmp.one_line(results[-1]))
    click.echo("\n" + cmp.table(results, target_accuracy))
    click.echo("\nTest error % of the averaged model w_a, per seed:\n" + cmp.seed_table(results))
    plots = cmp.plot(out, [r["name"] for r in results], [r["seed"] for r in results])
    if base.diag_every or any(changes.get("diag_every") for _, changes in specs):
        plots.append(cmp.plot_diagnostics(out, names, seeds[0]))
    (Path(out) / "summary.json").write_text(json.dumps(results, indent=1))
    click.echo(f"\nplots: {', '.join(str(p) for p in plots)}\nTensorBoard: tensorboard --logdir {out}\n"
               f"summary: {Path(out) / 'summary.json'}")


def _compare_run(base: TrainConfig, name: str, changes: dict, seed: int, run_dir: Path, np_: int, timeout: int,
                 target_accuracy: float, keep_checkpoint: bool = False) -> dict:
    """One run of ``compare``: writes RUN_DIR/config.json and runs ``train --config`` on it, as a horovodrun job
    (or, with ``engine=sim``, in this process); summarizes its metrics. ``keep_checkpoint``: the final learners
    are saved in RUN_DIR/checkpoint."""
    from horovod_dpsgd.experiments import reports as cmp
    cfg = base.replace(**changes, seed=seed, np=np_, metrics_file=str(run_dir / "metrics.jsonl"),
                       log_dir=str(run_dir / "tb"), checkpoint_dir=None, quiet=True)
    if keep_checkpoint:  # the last epoch is always saved; no checkpoint before it
        cfg = cfg.replace(checkpoint_dir=str(run_dir / "checkpoint"), checkpoint_every=cfg.epochs)
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg.save(str(run_dir / "config.json"))
    if cfg.engine == "sim":
        _simulated_run(cfg, name, seed, run_dir)
    else:
        _horovodrun_job(name, seed, run_dir, np_, timeout)
    return cmp.summarize(name, seed, cmp.read_metrics(run_dir / "metrics.jsonl"), target_accuracy)


def _horovodrun_job(name: str, seed: int, run_dir: Path, np_: int, timeout: int) -> None:
    from horovod_dpsgd.experiments import reports as cmp
    cmd = horovodrun_command(np_, ["-m", "horovod_dpsgd.experiments.cli", "train", "--config",
                                   str(run_dir / "config.json")])
    click.echo(f"[{name} seed {seed}] {' '.join(shlex.quote(c) for c in cmd)}")
    try:
        proc = subprocess.run(cmd, timeout=timeout, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env=horovodrun_env(np_))
    except subprocess.TimeoutExpired:
        raise click.ClickException(f"run {name} seed {seed} did not finish in {timeout} s") from None
    (run_dir / "output.log").write_text(proc.stdout)
    records = cmp.read_metrics(run_dir / "metrics.jsonl") if (run_dir / "metrics.jsonl").exists() else []
    diverged = any(r.get("kind") == "end" and r.get("diverged") for r in records)
    if proc.returncode != 0 and not diverged:  # a diverged run exits non-zero (EXIT_DIVERGED) but is a result
        raise click.ClickException(f"run {name} seed {seed} failed (exit {proc.returncode}); "
                                   f"its output is in {run_dir / 'output.log'}:\n{proc.stdout[-3000:]}")


def _simulated_run(cfg: TrainConfig, name: str, seed: int, run_dir: Path) -> None:
    """``train --config RUN_DIR/config.json`` with ``engine=sim``, in this process (no start-up per run)."""
    import contextlib
    import io
    import traceback
    from horovod_dpsgd.experiments import training
    click.echo(f"[{name} seed {seed}] horovod-dpsgd train --config {shlex.quote(str(run_dir / 'config.json'))}")
    output = io.StringIO()
    try:
        with contextlib.redirect_stdout(output):
            training.train(cfg)
    except Exception as exc:  # a failed run stops compare, with its message and output
        output.write(traceback.format_exc())
        (run_dir / "output.log").write_text(output.getvalue())
        raise click.ClickException(f"run {name} seed {seed} failed: {exc}; its output is in "
                                   f"{run_dir / 'output.log'}") from None
    (run_dir / "output.log").write_text(output.getvalue())


@main.command()
@click.argument("sec21_dir", type=click.Path(exists=True, file_okay=False))
@click.argument("sec22_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--seed", type=int, default=0, show_default=True, help="The seed whose runs are drawn.")
@click.option("--out", type=click.Path(dir_okay=False), default="figure2.png", show_default=True, help="PNG to write.")
@click.option("--target-accuracy", type=click.FloatRange(0, 1), default=0.9, show_default=True,
              help="For the tables' steps-to-accuracy column.")
@click.option("--at-steps", type=CommaSeparated(click.IntRange(min=1)), default="500,1000,2000,3000", show_default=True,
              help="Also print each run's test error at these steps.")
@click.option("--windows", type=CommaSeparated(click.IntRange(min=0)), default="0,100,300,1000,3000", show_default=True,
              help="Also print the median alpha_e/alpha (Sec. 2.1) or Delta (Sec. 2.2), and the median training loss, "
                   "between these steps.")
@click.option("--draw", type=CommaSeparated(click.STRING), default=None,
              help="Comma-separated run names to draw (default: every run; the tables always list every run).")
@click.option("--diagnostics-out", type=click.Path(dir_okay=False), default=None,
              help="Also draw all noise diagnostics (alpha_e/alpha, Delta, Delta^(2), consensus distance) of the "
                   "Sec. 2.1 runs of --seed here.")
def figure2(sec21_dir, sec22_dir, seed, out, target_accuracy, at_steps, windows, draw, diagnostics_out):
    """The paper's Fig. 2 and the Sec. 2 tables from `compare --recipe sec2.1` and `--recipe sec2.2` outputs."""
    from horovod_dpsgd.experiments import reports as cmp
    names = []
    for title, directory, key in (("Sec. 2.1", sec21_dir, "alpha_e_over_alpha"), ("Sec. 2.2", sec22_dir, "delta")):
        results = cmp.collect(directory, target_accuracy)
        if not results:
            raise click.BadParameter(f"no finished run (NAME-seedS/metrics.jsonl with an end record) under "
                                     f"{directory}: run horovod-dpsgd compare --out {directory} first")
        names.append([name for name in dict.fromkeys(r["name"] for r in results) if not draw or name in draw])
        click.echo(f"\n{title} ({directory}):\n{cmp.table(results, target_accuracy)}\n\n"
                   f"Test error % of the averaged model w_a, per seed:\n{cmp.seed_table(results)}\n\n"
                   f"Test error % by training length:\n{cmp.steps_table(directory, at_steps)}\n\n"
                   f"Median {key} by steps:\n{cmp.windows_table(directory, key, windows)}\n\n"
                   f"Median training loss by steps:\n{cmp.windows_table(directory, 'loss', windows, kind='step')}")
    click.echo(f"\nwrote {cmp.plot_figure2(sec21_dir, sec22_dir, out, names[0], names[1], seed)}")
    if diagnostics_out:
        click.echo(f"wrote {cmp.plot_diagnostics(sec21_dir, names[0], seed, target=diagnostics_out)}")


@main.command()
@click.argument("spec", type=TopologySpec())
@click.option("--size", type=click.IntRange(min=1), default=None,
              help="World size (number of learners); with --hosts, the layout's.")
@click.option("--hosts", default=None,
              help="Host layout, for 'auto' and 'hierarchical': HxL (H hosts of L consecutive ranks) or L1,L2,...")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of random topologies.")
@click.option("--step", "steps", type=click.IntRange(min=0), multiple=True,
              help="For dynamic topologies, also print W at these steps.")
def topology(spec, size, hosts, seed, steps):
    """Print a topology: neighbours, mixing matrix, spectral gap."""
    import numpy as np
    from horovod_dpsgd import topology as T
    try:
        layout = T.HostLayout.parse(hosts) if hosts else None
        if size is None and layout is None:
            raise click.UsageError("give --size N or --hosts HxL")
        topo = T.from_name(spec, size=size or layout.size, seed=seed, layout=layout)
    except T.TopologyError as exc:
        raise click.BadParameter(str(exc), param_hint="SPEC") from None
    click.echo(str(topo))
    for step in steps:
        with np.printoptions(precision=3, suppress=True):
            click.echo(f"W({step}) =\n{topo.mixing_matrix(step)}")


def _landscape_options(grid_default: int, grid_help: str):
    def wrap(f):
        for option in reversed([
            click.argument("checkpoint_dir", type=click.Path(exists=True, file_okay=False)),
            click.option("--learner", type=click.IntRange(min=0), default=None,
                         help="Use this learner's weights instead of the learners' average w_a."),
            click.option("--grid", type=click.IntRange(min=2), default=grid_default, show_default=True, help=grid_help),
            click.option("--span", type=click.FloatRange(min=0, min_open=True), default=0.1, show_default=True,
                         help="Directions are scaled over [-span, span]."),
            click.option("--batches", type=click.IntRange(min=1), default=2, show_default=True,
                         help="Test batches the loss is averaged over."),
            click.option("--batch-size", type=click.IntRange(min=1), default=500, show_default=True,
                         help="Test batch size."),
            click.option("--data-dir", type=click.Path(file_okay=False), default=None, help="Dataset root."),
            click.option("--seed", type=int, default=0, show_default=True, help="Seed of the random directions."),
            click.option("--out", type=click.Path(dir_okay=False), default=None,
                         help="Output path without extension (default: CHECKPOINT_DIR/<command>)."),
        ]):
            f = option(f)
        return f
    return wrap


def _checkpoint_model(checkpoint_dir, learner, batches, batch_size, data_dir):
    """The checkpoint's model (averaged or one learner), test batches, and (rank, size, writer)."""
    import torch
    from horovod_dpsgd import checkpoint
    from horovod_dpsgd.experiments.data import get_dataset
    from horovod_dpsgd.experiments.models import get_model
    try:
        state, extra = checkpoint.load_average(checkpoint_dir, learner)
    except checkpoint.CheckpointError as exc:
        raise click.BadParameter(str(exc), param_hint="CHECKPOINT_DIR") from None
    model = get_model(extra.get("model", "mlp"))
    model.load_state_dict(state)
    _, test_set = get_dataset(extra.get("task", "mnist"), data_dir=data_dir, pixel_max=extra.get("pixel_max"))
    loader = torch.utils.data.DataLoader(test_set, batch_size=batch_size, shuffle=False)
    data = [b for _, b in zip(range(batches), loader)]
    rank, size = 0, 1
    if "OMPI_COMM_WORLD_SIZE" in os.environ or "HOROVOD_RANK" in os.environ:  # under horovodrun: share the grid
        import horovod.torch as hvd
        hvd.init()
        rank, size = hvd.rank(), hvd.size()
    return model, data, rank, size


@main.command()
@_landscape_options(21, "Grid points per axis (the paper's Fig. 3 uses 50).")
def landscape(checkpoint_dir, learner, grid, span, batches, batch_size, data_dir, seed, out):
    """2-D test-loss contour around a checkpoint along two filter-normalised directions (paper Fig. 3)."""
    import torch.nn.functional as F
    from horovod_dpsgd.experiments.landscape import loss_contour, save_contour
    model, data, rank, size = _checkpoint_model(checkpoint_dir, learner, batches, batch_size, data_dir)
    result = loss_contour(model, F.cross_entropy, data, steps=grid, span=span, seed=seed, rank=rank, size=size)
    if rank == 0:
        files = _save_with_tensorboard(save_contour, result, out or os.path.join(checkpoint_dir, "landscape"))
        click.echo(f"loss at the centre {result.values[grid // 2, grid // 2]:.4f}, range "
                   f"{result.values.min():.4f}..{result.values.max():.4f}; wrote {', '.join(map(str, files))}")


@main.command()
@_landscape_options(4, "Grid points per axis (the paper's Fig. 4 uses 4).")
@click.option("--iters", type=click.IntRange(min=2), default=30, show_default=True, help="Lanczos iterations per point.")
def hessian(checkpoint_dir, learner, grid, span, batches, batch_size, data_dir, seed, out, iters):
    """Heat map of |lambda_min| / |lambda_max| of the loss Hessian on a grid around a checkpoint (paper Fig. 4)."""
    import torch.nn.functional as F
    from horovod_dpsgd.experiments.landscape import hessian_ratio_map, save_heatmap
    model, data, rank, size = _checkpoint_model(checkpoint_dir, learner, batches, batch_size, data_dir)
    result = hessian_ratio_map(model, F.cross_entropy, data, steps=grid, span=span, seed=seed, iters=iters,
                               rank=rank, size=size)
    if rank == 0:
        files = _save_with_tensorboard(save_heatmap, result, out or os.path.join(checkpoint_dir, "hessian"))
        click.echo(f"|lambda_min|/|lambda_max| from {result.values.min():.3f} to {result.values.max():.3f}; "
                   f"wrote {', '.join(map(str, files))}")


def _save_with_tensorboard(save, result, path):
    from torch.utils.tensorboard import SummaryWriter
    writer = SummaryWriter(os.path.join(os.path.dirname(os.path.abspath(path)), "tb"))
    files = save(result, path, writer=writer)
    writer.close()
    return list(files.values()) + [writer.log_dir]


main.add_command(cluster)

if __name__ == "__main__":
    main()
