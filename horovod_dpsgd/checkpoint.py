"""Checkpoints of every learner, and export of the averaged model.

Under DPSGD each learner holds different weights, so a checkpoint is one file per learner::

    checkpoint.save("ckpt/epoch-3", model, optimizer)          # on every rank
    ...
    checkpoint.load("ckpt/epoch-3", model, optimizer)          # on every rank, same world size

Each file holds the learner's model and optimizer state (which includes the step counter that
drives dynamic topologies such as the random peer schedule) and the torch RNG state, so a
resumed run continues bit for bit like the uninterrupted one. A checkpoint is committed as a whole:
the learners write their files into ``DIR.partial``, and once all of them have, it replaces ``DIR``.
A job that dies while saving (a learner killed, a host lost, a link cut) leaves the previous
checkpoint in ``DIR`` complete, never a mix of files from two steps.

:func:`average_model` gives the learners' average ``w_a`` for evaluation and inference.
"""

import copy
import os
import shutil
from typing import Any, Dict, Optional, Tuple

import torch
import horovod.torch as hvd

from horovod_dpsgd.comm.exchange import DEFAULT_TIMEOUT, timed_barrier
from horovod_dpsgd.errors import DPSGDError

__all__ = ["save", "load", "load_average", "average_model", "CheckpointError"]

_FORMAT = 1


class CheckpointError(DPSGDError, ValueError):
    """A checkpoint is missing, incomplete, or was made with another world size."""


def _learner_file(directory: str, rank: int, size: int) -> str:
    return os.path.join(directory, f"learner-{rank:05d}-of-{size:05d}.pt")


def _barrier(optimizer, what: str) -> None:
    """Wait until every learner arrives here, at most the optimizer's ``timeout`` (a dead learner must not
    make the others wait forever); Horovod's allreduce where the job has no MPI world (``--gloo``)."""
    timeout = getattr(getattr(optimizer, "options", None), "timeout", None) or \
        float(os.environ.get("HOROVOD_DPSGD_TIMEOUT", DEFAULT_TIMEOUT))
    if not timed_barrier(hvd.size(), timeout, what):
        hvd.allreduce(torch.zeros(1), name=f"horovod_dpsgd.checkpoint.{what}")


def save(directory: str, model: torch.nn.Module, optimizer: Optional[torch.optim.Optimizer] = None,
         extra: Optional[Dict[str, Any]] = None) -> str:
    """Write this learner's checkpoint into ``directory``; call on every rank. Returns the file.

    The files go into ``directory.partial`` first; when every learner has written its file, rank 0 puts that
    directory in place of ``directory`` (the previous checkpoint, if any, is kept until then).
    """
    rank, size = hvd.rank(), hvd.size()
    directory = os.path.normpath(directory)
    partial = directory + ".partial"
    state = {
        "format": _FORMAT, "rank": rank, "size": size,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "torch_rng": torch.get_rng_state(),
        "extra": extra or {},
    }
    if rank == 0:  # what a job that died while saving left behind
        shutil.rmtree(partial, ignore_errors=True)
        os.makedirs(partial)
    _barrier(optimizer, f"checkpoint.save({directory!r}): not every learner started saving")
    path = _learner_file(partial, rank, size)
    tmp = f"{path}.tmp-{os.getpid()}"
    torch.save(state, tmp)
    os.replace(tmp, path)
    _barrier(optimizer, f"checkpoint.save({directory!r}): not every learner wrote its file; the previous "
                        f"checkpoint in {directory} is kept")
    if rank == 0:
        old = directory + ".old"
        shutil.rmtree(old, ignore_errors=True)
        if os.path.exists(directory):
            os.rename(directory, old)
        os.rename(partial, directory)
        shutil.rmtree(old, ignore_errors=True)
    _barrier(optimizer, f"checkpoint.save({directory!r}): rank 0 did not commit the checkpoint")
    return _learner_file(directory, rank, size)


def load(directory: str, model: torch.nn.Module, optimizer: Optional[torch.optim.Optimizer] = None,
         restore_rng: bool = True) -> Dict[str, Any]:
    """Restore this learner from ``directory`` (made by :func:`save`); returns the saved ``extra``."""
    rank, size = hvd.rank(), hvd.size()
    directory = os.path.normpath(directory)
    if not os.path.exists(directory) and os.path.isdir(directory + ".old"):
        directory += ".old"  # a job died between putting the previous checkpoint aside and the new one in place
    path = _learner_file(directory, rank, size)
    if not os.path.exists(path):
        found = sorted(f for f in os.listdir(directory) if f.startswith("learner-")) if os.path.isdir(directory) else []
        if found:
            saved_size = int(found[0].rsplit("-of-", 1)[1].split(".")[0])
            raise CheckpointError(
                f"{directory} holds a checkpoint of {saved_size} learners but this job has {size}: resume with "
                f"-np {saved_size}, or start a new run from the averaged model (checkpoint.average_model) of "
                f"the old one")
        raise CheckpointError(f"no checkpoint for rank {rank} in {directory!r} (expected {path})")
    state = torch.load(path, map_location="cpu", weights_only=False)
    if state.get("format") != _FORMAT or state.get("size") != size or state.get("rank") != rank:
        raise CheckpointError(f"{path} is not a horovod-dpsgd checkpoint of rank {rank} of {size}")
    model.load_state_dict(state["model"])
    if optimizer is not None:
        if state["optimizer"] is None:
            raise CheckpointError(f"{path} was saved without optimizer state; pass optimizer=None")
        optimizer.load_state_dict(state["optimizer"])
    if restore_rng:
        torch.set_rng_state(state["torch_rng"])
    return state["extra"]


def load_average(directory: str, learner: Optional[int] = None) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
    """The model state of a checkpoint without MPI: the mean over all learners' files (``w_a``),
    or one learner's (``learner=j``). Returns ``(state_dict, extra)`` for offline evaluation."""
    files = sorted(f for f in os.listdir(directory) if f.startswith("learner-") and f.endswith(".pt")) \
        if os.path.isdir(directory) else []
    if not files:
        raise CheckpointError(f"no learner-*.pt files in {directory!r}; write them with checkpoint.save "
                              "(horovod-dpsgd train --checkpoint-dir DIR writes DIR/last)")
    if learner is not None:
        if not 0 <= learner < len(files):
            raise CheckpointError(f"--learner {learner}: the checkpoint has learners 0..{len(files) - 1}")
        files = [files[learner]]
    states = [torch.load(os.path.join(directory, f), map_location="cpu", weights_only=False) for f in files]
    average = {}
    for key, value in states[0]["model"].items():
        if value.is_floating_point():
            average[key] = sum(s["model"][key] for s in states) / len(states)
        else:
            average[key] = value
    return average, states[0]["extra"]


@torch.no_grad()
def average_model(model: torch.nn.Module, name: str = "horovod_dpsgd.average_model") -> torch.nn.Module:
    """A copy of ``model`` whose floating-point state is the mean over all learners.

    Under DPSGD every learner holds different weights ``w_j``; the paper's average weight
    ``w_a = n^-1 sum_j w_j`` is the model to evaluate or ship. Parameters and floating-point
    buffers (e.g. BatchNorm running statistics) are averaged with one grouped allreduce;
    integer buffers are taken from this rank. Collective: call it on every rank.
    """
    averaged = copy.deepcopy(model)
    tensors = [t for t in list(averaged.parameters()) + list(averaged.buffers()) if t.is_floating_point()]
    if tensors and hvd.size() > 1:
        means = hvd.grouped_allreduce([t.detach() for t in tensors], op=hvd.Average, name=name)
        for t, mean in zip(tensors, means):
            t.copy_(mean)
    return averaged
