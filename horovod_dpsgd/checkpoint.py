"""Checkpoints of every learner, and export of the averaged model.

Under DPSGD each learner holds different weights, so a checkpoint is one file per learner plus a manifest::

    checkpoint.save("ckpt/last", model, optimizer)          # on every rank
    ...
    checkpoint.load("ckpt/last", model, optimizer)          # on every rank, same world size

Each learner's file holds its model and optimizer state (which includes the step counter that drives
dynamic topologies such as the random peer schedule) and the torch RNG state, so a resumed run continues
bit for bit like the uninterrupted one.

A checkpoint cannot lie:

* **Checksums.** The SHA-256 of every learner's file is computed while it is written and recorded in
  ``manifest.json``; :func:`load` verifies it before unpickling anything. A damaged, truncated, empty or
  foreign file raises :class:`CheckpointError` naming the file and the rank. (A whole-file digest rather
  than ``zipfile.testzip()``: the zip's CRC-32s cover each entry's bytes but not a file swapped for another
  valid checkpoint, from another save or another rank, nor the archive's directory; SHA-256 covers all of
  it at the cost of one pass over the bytes, about 1 GB/s here.)
* **One save, atomically.** Each save writes new files under a new name (``learner-R-of-N.sGGGGGG.pt``,
  ``G`` counting saves), then rank 0 writes the manifest naming them, last: to a temporary file, fsynced,
  then renamed over the old one. Until that rename the previous checkpoint is intact, so a crash at any
  moment of a save leaves a consistent checkpoint (the old or the new one); files of other saves are
  removed after it.
* **Ranks agree.** Rank 0 reads the manifest and hands it to every rank; each rank verifies its own file and
  the ranks exchange verdicts before anything is loaded, so every rank raises the same error, or none does.
  A save or load that fails on one rank fails on all of them (no rank is left waiting in a collective).

:func:`average_model` gives the learners' average ``w_a`` for evaluation and inference.
"""

import copy
import hashlib
import json
import os
import re
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import horovod.torch as hvd

from horovod_dpsgd.errors import DPSGDError

__all__ = ["save", "load", "load_average", "average_model", "CheckpointError", "MANIFEST"]

_FORMAT = 2
#: Name of the file, written last, that makes a directory of learner files a checkpoint.
MANIFEST = "manifest.json"
_LEARNER = re.compile(r"^learner-(\d{5})-of-(\d{5})(?:\.s(\d{6}))?\.pt$")


class CheckpointError(DPSGDError, ValueError):
    """A checkpoint is missing, damaged, inconsistent, or was made with another world size."""


def _learner_file(rank: int, size: int, generation: int) -> str:
    return f"learner-{rank:05d}-of-{size:05d}.s{generation:06d}.pt"


class _Digest:
    """A binary file wrapper that hashes what is written through it (``torch.save`` only calls ``write``)."""

    def __init__(self, file):
        self.file, self.sha256, self.nbytes = file, hashlib.sha256(), 0

    def write(self, data) -> int:
        self.sha256.update(data)
        self.nbytes += len(data)
        return self.file.write(data)

    def flush(self) -> None:
        self.file.flush()


def _sha256(path: str) -> Tuple[str, int]:
    digest, nbytes = hashlib.sha256(), 0
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
            nbytes += len(chunk)
    return digest.hexdigest(), nbytes


def _fsync_directory(directory: str) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # pragma: no cover - e.g. platforms without directory descriptors
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def _write_atomically(path: str, write: Callable[[Any], Any]) -> Any:
    """``write(file)`` into a temporary file beside ``path``, fsync it, rename it to ``path``."""
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            result = write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    _fsync_directory(os.path.dirname(path) or ".")
    return result


def _read_manifest(directory: str) -> Dict[str, Any]:
    """The manifest of ``directory``; raises CheckpointError saying what is wrong with it."""
    path = os.path.join(directory, MANIFEST)
    if not os.path.isdir(directory):
        raise CheckpointError(f"no checkpoint directory {directory!r}")
    if not os.path.exists(path):
        old = sorted(f for f in os.listdir(directory) if _LEARNER.match(f))
        if old:
            raise CheckpointError(
                f"{directory} holds learner files but no {MANIFEST}: a save into a new directory that did not finish, "
                f"or files of horovod-dpsgd 0.2's format, which carry no checksums. Start from scratch, or read a file with torch.load({os.path.join(directory, old[0])!r})")
        raise CheckpointError(f"no checkpoint in {directory!r} (no {MANIFEST})")
    try:
        with open(path, "rb") as f:
            manifest = json.loads(f.read().decode("utf-8"))
        if manifest.get("format") != _FORMAT:
            raise ValueError(f"format {manifest.get('format')!r}, expected {_FORMAT}")
        size, files = int(manifest["size"]), manifest["files"]
        if len(files) != size or [int(e["rank"]) for e in files] != list(range(size)):
            raise ValueError(f"it lists {len(files)} files for {size} learners")
        for e in files:
            if os.path.basename(e["name"]) != e["name"] or not re.fullmatch(r"[0-9a-f]{64}", e["sha256"]) \
                    or int(e["bytes"]) < 0:
                raise ValueError(f"bad entry {e}")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{path} is damaged ({exc}); the checkpoint cannot be verified") from None
    return manifest


def _agree(verdict: Optional[str], what: str, name: str) -> None:
    """Exchange every rank's verdict (None: fine); raise the same CheckpointError on every rank if any failed."""
    verdicts = hvd.allgather_object(verdict, name=name)
    failed = [(r, v) for r, v in enumerate(verdicts) if v is not None]
    if failed:
        raise CheckpointError(f"{what}: " + "; ".join(f"rank {r}: {v}" for r, v in failed))


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def _step_of(optimizer) -> Optional[int]:
    return getattr(optimizer, "step_count", None)


def save(directory: str, model: torch.nn.Module, optimizer: Optional[torch.optim.Optimizer] = None,
         extra: Optional[Dict[str, Any]] = None) -> str:
    """Write this learner's checkpoint into ``directory``; call on every rank. Returns this rank's file.

    Returns once every learner's file is written and rank 0 has committed the manifest that names them;
    raises :class:`CheckpointError` on every rank if any rank failed to write (the previous checkpoint in
    ``directory`` then stays the valid one).
    """
    rank, size = hvd.rank(), hvd.size()
    generation = None
    if rank == 0:
        try:
            generation = _next_generation(directory)
        except OSError as exc:
            generation = _describe(exc)
    generation = hvd.broadcast_object(generation, root_rank=0, name="horovod_dpsgd.checkpoint.generation")
    if isinstance(generation, str):
        raise CheckpointError(f"cannot save into {directory!r}: rank 0: {generation}")

    name, entry, verdict = _learner_file(rank, size, generation), None, None
    try:
        os.makedirs(directory, exist_ok=True)
        state = {
            "format": _FORMAT, "rank": rank, "size": size, "generation": generation, "step": _step_of(optimizer),
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict() if optimizer is not None else None,
            "torch_rng": torch.get_rng_state(),
            "extra": extra or {},
        }

        def write(f):
            digest = _Digest(f)
            torch.save(state, digest)
            return digest

        digest = _write_atomically(os.path.join(directory, name), write)
        entry = {"rank": rank, "name": name, "sha256": digest.sha256.hexdigest(), "bytes": digest.nbytes,
                 "step": state["step"]}
    except Exception as exc:
        verdict = f"writing {os.path.join(directory, name)} failed: {_describe(exc)}"
    entries = hvd.allgather_object((entry, verdict), name="horovod_dpsgd.checkpoint.entries")
    failed = [(r, v) for r, (_, v) in enumerate(entries) if v is not None]
    steps = {e["step"] for e, _ in entries if e is not None}
    if not failed and len(steps) > 1:
        failed = [(r, f"at step {e['step']}") for r, (e, _) in enumerate(entries)]
    if failed:
        raise CheckpointError(f"checkpoint {directory} not saved; the previous one there, if any, is kept: " +
                              "; ".join(f"rank {r}: {v}" for r, v in failed))

    commit = None
    if rank == 0:
        manifest = {"format": _FORMAT, "size": size, "generation": generation, "step": steps.pop(),
                    "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "files": [e for e, _ in entries]}
        try:
            text = json.dumps(manifest, indent=1).encode("utf-8")
            _write_atomically(os.path.join(directory, MANIFEST), lambda f: f.write(text))
        except Exception as exc:
            commit = f"writing {os.path.join(directory, MANIFEST)} failed: {_describe(exc)}"
    _agree(commit, f"checkpoint {directory} not saved; the previous one there, if any, is kept",
           name="horovod_dpsgd.checkpoint.commit")
    _remove_other_saves(directory, keep={e["name"] for e, _ in entries}, rank=rank)
    return os.path.join(directory, name)


def _next_generation(directory: str) -> int:
    """One more than any save found in ``directory`` (its manifest or its learner files)."""
    latest = 0
    if os.path.isdir(directory):
        for f in os.listdir(directory):
            match = _LEARNER.match(f)
            if match and match.group(3):
                latest = max(latest, int(match.group(3)))
        try:
            latest = max(latest, int(_read_manifest(directory)["generation"]))
        except (CheckpointError, KeyError, ValueError, TypeError):
            pass
    return latest + 1


def _remove_other_saves(directory: str, keep, rank: int) -> None:
    """After the manifest is committed: this rank's files of other saves, and (rank 0, which sees the whole
    directory on a shared file system) every learner file and leftover temporary file not in the manifest."""
    try:
        names = os.listdir(directory)
    except OSError:
        return
    for f in names:
        match = _LEARNER.match(f.split(".tmp-")[0])
        if f in keep or not match or (rank != 0 and int(match.group(1)) != rank):
            continue
        try:
            os.remove(os.path.join(directory, f))
        except OSError:
            pass


def _read_learner(directory: str, entry: Dict[str, Any], rank: int, size: int, generation: int) -> Dict[str, Any]:
    """Rank ``rank``'s state, verified against its manifest entry; raises CheckpointError naming the file."""
    path = os.path.join(directory, entry["name"])
    if not os.path.exists(path):
        raise CheckpointError(f"{path} is missing")
    digest, nbytes = _sha256(path)
    if nbytes != entry["bytes"] or digest != entry["sha256"]:
        raise CheckpointError(
            f"{path} does not match its checksum in {MANIFEST} ({nbytes} bytes, sha256 {digest[:12]}..., expected "
            f"{entry['bytes']} bytes, sha256 {entry['sha256'][:12]}...): the file was damaged or changed after it "
            "was saved, or comes from another save")
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # the bytes are the saved ones, so this is a torch version problem
        raise CheckpointError(f"{path} matches its checksum but torch.load failed: {_describe(exc)}") from None
    if not isinstance(state, dict) or (state.get("format"), state.get("rank"), state.get("size"),
                                       state.get("generation")) != (_FORMAT, rank, size, generation):
        raise CheckpointError(f"{path} is not the file of rank {rank} of {size} of save {generation}")
    return state


def load(directory: str, model: torch.nn.Module, optimizer: Optional[torch.optim.Optimizer] = None,
         restore_rng: bool = True) -> Dict[str, Any]:
    """Restore this learner from ``directory`` (made by :func:`save`); returns the saved ``extra``.

    Collective: call on every rank, with the world size of the save. Every file is verified against the
    manifest before anything is loaded into the model; on any problem every rank raises the same
    :class:`CheckpointError`, naming the rank and the file.
    """
    rank, size = hvd.rank(), hvd.size()
    manifest = None
    if rank == 0:
        try:
            manifest = _read_manifest(directory)
        except CheckpointError as exc:
            manifest = str(exc)
    manifest = hvd.broadcast_object(manifest, root_rank=0, name="horovod_dpsgd.checkpoint.manifest")
    if isinstance(manifest, str):
        raise CheckpointError(manifest)
    if manifest["size"] != size:
        raise CheckpointError(
            f"{directory} holds a checkpoint of {manifest['size']} learners but this job has {size}: resume with "
            f"-np {manifest['size']}, or start a new run from the averaged model (checkpoint.load_average, "
            f"checkpoint.average_model) of the old one")

    state, verdict = None, None
    try:
        state = _read_learner(directory, manifest["files"][rank], rank, size, manifest["generation"])
        if optimizer is not None and state["optimizer"] is None:
            raise CheckpointError(f"{os.path.join(directory, manifest['files'][rank]['name'])} was saved without "
                                  "optimizer state; pass optimizer=None")
    except CheckpointError as exc:
        verdict = str(exc)
    except Exception as exc:  # pragma: no cover - e.g. a permission error
        verdict = f"reading {directory} failed: {_describe(exc)}"
    _agree(verdict, f"cannot resume from {directory} (step {manifest['step']})",
           name="horovod_dpsgd.checkpoint.verify")

    try:
        model.load_state_dict(state["model"])
        if optimizer is not None:
            optimizer.load_state_dict(state["optimizer"])
            if _step_of(optimizer) not in (None, manifest["step"]):
                raise CheckpointError(f"the optimizer is at step {_step_of(optimizer)} after loading, "
                                      f"the manifest says {manifest['step']}")
        verdict = None
    except Exception as exc:
        verdict = f"the saved state does not fit this model or optimizer: {_describe(exc)}"
    _agree(verdict, f"cannot resume from {directory}", name="horovod_dpsgd.checkpoint.apply")
    if restore_rng:
        torch.set_rng_state(state["torch_rng"])
    return state["extra"]


def load_average(directory: str, learner: Optional[int] = None) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
    """The model state of a checkpoint without MPI: the mean over all learners' files (``w_a``),
    or one learner's (``learner=j``). Returns ``(state_dict, extra)`` for offline evaluation.
    Every file read is verified against the manifest."""
    try:
        manifest = _read_manifest(directory)
    except CheckpointError as exc:
        raise CheckpointError(f"{exc} (horovod-dpsgd train --checkpoint-dir DIR writes DIR/last)") from None
    size = manifest["size"]
    ranks: List[int] = list(range(size))
    if learner is not None:
        if not 0 <= learner < size:
            raise CheckpointError(f"--learner {learner}: the checkpoint has learners 0..{size - 1}")
        ranks = [learner]
    states = [_read_learner(directory, manifest["files"][r], r, size, manifest["generation"]) for r in ranks]
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
