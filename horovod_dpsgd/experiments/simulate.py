"""``train --engine sim``: all learners of a run in this process, with :mod:`horovod_dpsgd.sim`.

:class:`SimRun` is the simulated counterpart of the MPI engine in :mod:`.training`: learner ``j`` gets the shard
and batches rank ``j`` would (the same :func:`~.training.shard_loader`), the same initial weights (the model
built after the same seeding), the same optimizer settings, callbacks, topology and seed, so the run equals the
``horovodrun`` one to float rounding; :func:`~.training.train` drives both and records the same metrics and
TensorBoard tags.
"""

from typing import Iterator, Tuple

import click
import torch
import torch.nn.functional as F

from horovod_dpsgd import sim
from horovod_dpsgd.experiments.config import TrainConfig
from horovod_dpsgd.experiments.training import check_topology, evaluation_totals, probe_batches, shard_loader
from horovod_dpsgd.sim import checkpoint as sim_checkpoint

__all__ = ["SimRun"]


class SimRun:
    """The ``cfg.np`` learners of a run, stacked in this process (``rank`` 0 of ``size`` records)."""

    def __init__(self, cfg: TrainConfig):
        from horovod_dpsgd.experiments.data import get_dataset
        from horovod_dpsgd.experiments.launch import started_by_launcher
        from horovod_dpsgd.experiments.models import get_model
        if cfg.np is None:
            raise click.BadParameter("--engine sim needs the number of learners, e.g. --np 5", param_hint="--np")
        if started_by_launcher():
            raise click.UsageError("--engine sim runs every learner in one process: start it as a plain process "
                                   "(horovod-dpsgd train --engine sim --np N ...), not under horovodrun or mpirun")
        self.rank, self.size = 0, cfg.np
        if cfg.algorithm == "dpsgd":
            check_topology(cfg, self.size)
        torch.manual_seed(cfg.seed)
        train_set, test_set = get_dataset(cfg.task, data_dir=cfg.data_dir, download=cfg.download,
                                          pixel_max=cfg.pixel_max)
        self.shards = [shard_loader(cfg, train_set, j, self.size) for j in range(self.size)]
        self.test_loader = torch.utils.data.DataLoader(test_set, batch_size=max(cfg.batch_size, 256))
        self.probe = probe_batches(cfg, train_set)
        self.learners = sim.Learners(get_model(cfg.model), self.size)  # every learner starts from rank 0's weights
        self.steps_per_epoch = len(self.shards[0][1])
        self.optimizer = self.diagnostics = None

    def build(self, cfg: TrainConfig, lr: float, callbacks: list, writer) -> None:
        """The simulator's optimizer, with the noise diagnostics (logging to ``writer``) if ``cfg.diag_every``."""
        if cfg.diag_every:
            self.diagnostics = sim.NoiseDiagnostics(self.learners, F.cross_entropy, self.probe, every=cfg.diag_every,
                                                    log_dir=writer)
            callbacks = callbacks + [self.diagnostics]
        optimizer = torch.optim.SGD(self.learners.parameters(), lr=lr, momentum=cfg.momentum,
                                    weight_decay=cfg.weight_decay)
        self.optimizer = sim.DistributedOptimizer(optimizer, self.learners, algorithm=cfg.algorithm,
                                                  topology=cfg.topology, callbacks=callbacks, seed=cfg.seed,
                                                  nonfinite="ignore")

    def set_epoch(self, epoch: int) -> None:
        for sampler, _ in self.shards:
            sampler.set_epoch(epoch)

    def batches(self) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        """Every learner's batch of the step, stacked: ``(n, B, ...)`` inputs and ``(n, B)`` targets."""
        for per_learner in zip(*(loader for _, loader in self.shards)):
            data, target = zip(*per_learner)
            yield torch.stack(data), torch.stack(target)

    def step(self, batch) -> torch.Tensor:
        """One optimizer step of every learner; returns ``[sum of the learners' losses, n]`` (float64)."""
        data, target = batch
        self.optimizer.zero_grad()
        losses = self.learners.losses(F.cross_entropy, self.learners(data), target)
        losses.sum().backward()
        if self.diagnostics is not None:
            self.diagnostics.observe(data, target, losses)
        self.optimizer.step()
        return torch.tensor([losses.detach().double().sum().item(), float(self.size)], dtype=torch.float64)

    def total(self, values: torch.Tensor, name: str) -> torch.Tensor:
        """``values``, which already sum over every learner (a copy, as an allreduce's result)."""
        return values.clone()

    def evaluate(self) -> Tuple[float, float]:
        """Test loss and accuracy of the averaged model ``w_a`` on the whole test set."""
        totals = evaluation_totals(self.learners.average(), self.test_loader)
        return float(totals[0] / totals[2]), float(totals[1] / totals[2])

    @torch.no_grad()
    def finite(self) -> bool:
        """Whether every learner's parameters and floating-point buffers are finite."""
        return all(bool(t.isfinite().all()) for t in self.learners.state_dict().values() if t.is_floating_point())

    def save(self, directory: str, extra: dict) -> None:
        sim_checkpoint.save(directory, self.learners, self.optimizer, extra=extra)

    def load(self, directory: str) -> dict:
        return sim_checkpoint.load(directory, self.learners, self.optimizer)
