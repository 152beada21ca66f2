"""The training loop behind ``horovod-dpsgd train``; runs inside a horovodrun job.

Rank 0 prints a progress bar and one line per epoch, writes TensorBoard scalars to
``log_dir`` and, if ``metrics_file`` is set, JSON lines that ``horovod-dpsgd compare`` reads:
``{"kind": "start" | "step" | "epoch" | "diag" | "end", "step": ..., ...}``. The ``start`` record holds
the exact configuration of the run (``config``) and the number of learners; a run resumed from a
checkpoint appends to the file, beginning with a ``start`` record with ``"resumed": true`` at the
checkpoint's step (:func:`horovod_dpsgd.experiments.reports.read_metrics` reads that as one run). The
configuration is also written as ``config.json`` into ``log_dir`` and ``checkpoint_dir``.
"""

import json
import math
import os
import sys
import time
from typing import Tuple

import click
import torch
import torch.nn.functional as F
import horovod.torch as hvd

from horovod_dpsgd import checkpoint, topology
from horovod_dpsgd.callbacks import GaussianNoise
from horovod_dpsgd.experiments.config import TrainConfig
from horovod_dpsgd.experiments.data import shard
from horovod_dpsgd.optimizer import DistributedOptimizer
from horovod_dpsgd.experiments.recipes import lr_multiplier, scaled_lr

__all__ = ["TrainConfig", "train"]


class _Metrics:
    """Rank 0's outputs: the JSON-lines file, TensorBoard and the console.

    A resumed run (``append``) appends to the metrics file, so the records before the interruption stay.
    """

    def __init__(self, cfg: TrainConfig, rank: int, append: bool):
        self.active = rank == 0
        self.quiet = cfg.quiet
        self.file = self.writer = None
        if self.active and cfg.metrics_file:
            os.makedirs(os.path.dirname(os.path.abspath(cfg.metrics_file)), exist_ok=True)
            self.file = open(cfg.metrics_file, "a" if append else "w")
            if self.file.tell() and not _ends_with_newline(cfg.metrics_file):
                self.file.write("\n")  # a record cut short by a kill stays a line of its own
        if self.active and cfg.log_dir:
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(cfg.log_dir)

    def start(self, cfg: TrainConfig, step: int, epoch: int, resumed: bool, learners: int) -> None:
        """Record the exact configuration: first record of the metrics file, ``config.json`` in the output
        directories, text in TensorBoard."""
        if not self.active:
            return
        config = cfg.to_dict()
        self.record("start", step, epoch=epoch, resumed=resumed, learners=learners, config=config)
        for directory in (cfg.log_dir, cfg.checkpoint_dir):
            if directory:
                os.makedirs(directory, exist_ok=True)
                cfg.save(os.path.join(directory, "config.json"))
        if self.writer:
            self.writer.add_text("config", "```\n" + json.dumps(config, indent=1) + "\n```", step)

    def record(self, kind: str, step: int, **values) -> None:
        if not self.active:
            return
        if self.file:
            self.file.write(json.dumps({"kind": kind, "step": step, **values}) + "\n")
            self.file.flush()
        if self.writer and kind in ("step", "epoch"):
            for key, value in values.items():
                if isinstance(value, (int, float)) and key not in ("epoch",):
                    self.writer.add_scalar(f"{'train' if kind == 'step' else 'test'}/{key}", value, step)

    def say(self, text: str) -> None:
        if self.active and not self.quiet:
            click.echo(text)
            sys.stdout.flush()

    def close(self) -> None:
        if self.file:
            self.file.close()
        if self.writer:
            self.writer.close()


def _ends_with_newline(path: str) -> bool:
    with open(path, "rb") as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1) == b"\n"


class _Progress:
    """Rank 0's progress through an epoch: a bar on a terminal; under horovodrun, whose output is a pipe,
    a line at each quarter of an epoch of 20 steps or more."""

    def __init__(self, active: bool, total: int, label: str):
        self.bar = click.progressbar(length=total, label=label, file=sys.stderr) \
            if active and sys.stderr.isatty() else None
        self.marks = {total * q // 4 for q in (1, 2, 3)} if active and self.bar is None and total >= 20 else set()
        self.total, self.label, self.done = total, label, 0

    def update(self, loss: float) -> None:
        self.done += 1
        if self.bar is not None:
            self.bar.update(1)
        elif self.done in self.marks:
            click.echo(f"  {self.label}: {self.done}/{self.total} steps, loss {loss:.4f} (rank 0)")
            sys.stdout.flush()

    def finish(self) -> None:
        if self.bar is not None:
            self.bar.render_finish()


def _loaders(cfg: TrainConfig, train_set, test_set):
    rank, size = hvd.rank(), hvd.size()
    sampler = shard(train_set, rank, size, seed=cfg.seed)  # same number of steps on every learner
    if isinstance(train_set, torch.utils.data.TensorDataset):  # in memory: fetch a whole batch in one indexing op
        train_loader = torch.utils.data.DataLoader(
            train_set, sampler=torch.utils.data.BatchSampler(sampler, cfg.batch_size, drop_last=True), batch_size=None)
    else:
        train_loader = torch.utils.data.DataLoader(train_set, batch_size=cfg.batch_size, sampler=sampler,
                                                   drop_last=True)
    if len(train_loader) == 0:
        raise click.UsageError(f"{len(train_set)} training samples give no full batch of {cfg.batch_size} per learner "
                               f"on {size} learners; lower --batch-size")
    test_shard = torch.utils.data.Subset(test_set, range(rank, len(test_set), size))
    test_loader = torch.utils.data.DataLoader(test_shard, batch_size=max(cfg.batch_size, 256))
    # g = grad L(w_a) of Eq. 3 is the gradient of the training loss: a fixed sample of the training set, the
    # same on every rank (docs/diagnostics.md).
    probe_sampler = torch.utils.data.RandomSampler(train_set, generator=torch.Generator().manual_seed(cfg.seed))
    probe_loader = torch.utils.data.DataLoader(train_set, batch_size=cfg.batch_size, sampler=probe_sampler)
    probe = [b for _, b in zip(range(cfg.probe_batches), probe_loader)]
    return sampler, train_loader, test_loader, probe


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader) -> Tuple[float, float]:
    """Test loss and accuracy of ``model`` over all ranks' shards (collective)."""
    model.eval()
    totals = torch.zeros(3, dtype=torch.float64)
    for data, target in loader:
        output = model(data)
        totals += torch.tensor([F.cross_entropy(output, target, reduction="sum").item(),
                                (output.argmax(1) == target).sum().item(), len(target)], dtype=torch.float64)
    totals = hvd.allreduce(totals, op=hvd.Sum, name="horovod_dpsgd.evaluate")
    model.train()
    return float(totals[0] / totals[2]), float(totals[1] / totals[2])


def _check_topology(cfg: TrainConfig, size: int) -> None:
    """Build the topology for the job's world size; the command line checked only its syntax."""
    try:
        topology.from_name(cfg.topology, size=size, seed=cfg.seed)
    except topology.TopologyError as exc:
        raise click.BadParameter(f"{cfg.topology!r} does not fit {size} learners: {exc}",
                                 param_hint="--topology") from None


def _end_of_epoch_evaluation(model, test_loader, epoch_sum: torch.Tensor, metrics: _Metrics, epoch: int, step: int,
                             started: float) -> dict:
    """Training loss of the epoch and test loss/accuracy of the averaged model ``w_a`` (collective)."""
    epoch_sum = hvd.allreduce(epoch_sum, op=hvd.Sum, name="horovod_dpsgd.epoch_loss")
    train_loss = float(epoch_sum[0] / epoch_sum[1])
    test_loss, accuracy = evaluate(checkpoint.average_model(model), test_loader)
    metrics.record("epoch", step, epoch=epoch, loss=test_loss, accuracy=accuracy)
    metrics.say(f"epoch {epoch}: train loss {train_loss:.4f}  test loss {test_loss:.4f}  "
                f"test accuracy {100 * accuracy:.2f}%  ({time.time() - started:.1f} s)")
    return {"test_loss": test_loss, "test_accuracy": accuracy, "train_loss": train_loss}


@torch.no_grad()
def finite_everywhere(model: torch.nn.Module) -> bool:
    """Whether every learner's parameters and floating-point buffers are finite (collective)."""
    mine = all(bool(t.isfinite().all()) for t in model.state_dict().values() if t.is_floating_point())
    return bool(hvd.allreduce(torch.tensor([float(mine)]), op=hvd.Min, name="horovod_dpsgd.finite_everywhere"))


def train(cfg: TrainConfig) -> dict:
    """Train as ``cfg`` says; returns the final metrics (on every rank). ``diverged`` is True when the training
    loss became NaN/inf or, at the end, any learner's weights are not finite."""
    from horovod_dpsgd.experiments.data import get_dataset
    from horovod_dpsgd.experiments.models import get_model

    if not hvd.is_initialized():
        hvd.init()
    rank, size = hvd.rank(), hvd.size()
    if cfg.algorithm == "dpsgd":
        _check_topology(cfg, size)
    torch.manual_seed(cfg.seed)
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // hvd.local_size()))
    train_set, test_set = get_dataset(cfg.task, data_dir=cfg.data_dir, download=cfg.download)
    sampler, train_loader, test_loader, probe = _loaders(cfg, train_set, test_set)
    steps_per_epoch = len(train_loader)
    total_steps = min(cfg.epochs * steps_per_epoch, cfg.max_steps or math.inf)

    model = get_model(cfg.model)
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    peak = scaled_lr(cfg.lr, cfg.batch_size * size, cfg.base_batch, cfg.linear_scaling)
    optimizer = torch.optim.SGD(model.parameters(), lr=peak, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    callbacks, diagnostics = [], None
    if cfg.noise_sigma:
        callbacks.append(GaussianNoise(cfg.noise_sigma, seed=cfg.seed))
    last_checkpoint = os.path.join(cfg.checkpoint_dir, "last") if cfg.checkpoint_dir else None
    resuming = last_checkpoint is not None and os.path.isdir(last_checkpoint)
    metrics = _Metrics(cfg, rank, append=resuming)
    if cfg.diag_every:
        from horovod_dpsgd.diagnostics import NoiseDiagnostics
        diagnostics = NoiseDiagnostics(model, F.cross_entropy, probe, every=cfg.diag_every, log_dir=metrics.writer)
        callbacks.append(diagnostics)
    optimizer = DistributedOptimizer(optimizer, named_parameters=model.named_parameters(), algorithm=cfg.algorithm,
                                     topology=cfg.topology, callbacks=callbacks, seed=cfg.seed, nonfinite="ignore")
    start_lr = min(1.0, cfg.lr / peak) if cfg.warmup_epochs else 1.0
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_multiplier(steps_per_epoch, start_lr, cfg.warmup_epochs, cfg.decay_epochs, cfg.decay_factor))
    first_epoch = 0
    if resuming:
        first_epoch = checkpoint.load(last_checkpoint, model, optimizer)["epoch"]
        scheduler.last_epoch = optimizer.step_count
        metrics.say(f"resumed from {last_checkpoint} at epoch {first_epoch}")
    metrics.start(cfg, optimizer.step_count, first_epoch, resumed=resuming, learners=size)

    what = f"{cfg.algorithm}" + (f" ({cfg.topology})" if cfg.algorithm == "dpsgd" else "") + \
        (f" + Gaussian noise sigma={cfg.noise_sigma:g}" if cfg.noise_sigma else "")
    metrics.say(f"{what}: {cfg.model} on {cfg.task}, {size} learners x batch {cfg.batch_size} = {size * cfg.batch_size}, "
                f"lr {peak:g}, {steps_per_epoch} steps/epoch")
    result = {"diverged": False, "steps": optimizer.step_count}
    for epoch in range(first_epoch, cfg.epochs):
        if optimizer.step_count >= total_steps:
            break
        sampler.set_epoch(epoch)
        started = time.time()
        running, epoch_sum = torch.zeros(2, dtype=torch.float64), torch.zeros(2, dtype=torch.float64)
        progress = _Progress(rank == 0 and not cfg.quiet, steps_per_epoch, f"epoch {epoch + 1}")
        for data, target in train_loader:
            optimizer.zero_grad()
            loss = F.cross_entropy(model(data), target)
            loss.backward()
            if diagnostics is not None:
                diagnostics.observe(data, target, loss)
            optimizer.step()
            scheduler.step()
            observed = torch.tensor([loss.item(), 1.0], dtype=torch.float64)
            running += observed
            epoch_sum += observed
            step = optimizer.step_count
            if step % cfg.log_every == 0 or step == total_steps:
                mean = hvd.allreduce(running, op=hvd.Sum, name="horovod_dpsgd.train_loss")
                running.zero_()
                step_loss = float(mean[0] / mean[1])
                metrics.record("step", step, loss=step_loss, lr=optimizer.param_groups[0]["lr"])
                if not math.isfinite(step_loss):
                    result["diverged"] = True
            if diagnostics is not None and diagnostics.last and diagnostics.last.get("step") == step:
                metrics.record("diag", step, **{k: v for k, v in diagnostics.last.items() if k != "step"})
            progress.update(float(observed[0]))
            if result["diverged"] or step >= total_steps:
                break
        progress.finish()
        if result["diverged"]:
            metrics.say(f"epoch {epoch + 1}: training loss is NaN/inf: diverged at step {optimizer.step_count}")
            break
        last_epoch = epoch + 1 == cfg.epochs or optimizer.step_count >= total_steps
        if (epoch + 1) % cfg.eval_every == 0 or last_epoch:
            result.update(_end_of_epoch_evaluation(model, test_loader, epoch_sum, metrics, epoch + 1,
                                                   optimizer.step_count, started))
        if last_checkpoint and ((epoch + 1) % cfg.checkpoint_every == 0 or last_epoch):
            checkpoint.save(last_checkpoint, model, optimizer,
                            extra={"epoch": epoch + 1, "task": cfg.task, "model": cfg.model})
    result["steps"] = optimizer.step_count
    if not finite_everywhere(model):
        result["diverged"] = True
        metrics.say(f"the weights of some learner are NaN/inf after step {optimizer.step_count}: the run failed")
    metrics.record("end", optimizer.step_count, **result)
    metrics.close()
    return result
