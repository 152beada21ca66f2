"""Checkpoints of simulated learners, in the MPI run's format: one file per learner and a manifest.

:func:`save` writes what :func:`horovod_dpsgd.checkpoint.save` writes on every rank of an ``n``-process job:
``learner-JJJJJ-of-NNNNN.sGGGGGG.pt`` holding learner ``j``'s model state, its share of the optimizer state
(row ``j`` of every stacked state tensor: momentum, Adam's moments; the step counter), the RNG state and
``extra``; then ``manifest.json`` with every file's SHA-256, written last and atomically, and the files of
older saves removed. :func:`load` verifies every file against the manifest before loading anything. So a
simulated run resumes an MPI run's checkpoint and the other way round, and the toolkit's ``landscape`` and
``hessian`` commands read either (:func:`horovod_dpsgd.checkpoint.load_average`).
"""

import json
import os
import time
from typing import Any, Dict, List, Optional

import torch

from horovod_dpsgd.checkpoint import (_FORMAT, MANIFEST, CheckpointError, _Digest, _describe, _learner_file,
                                      _next_generation, _read_learner, _read_manifest, _remove_other_saves,
                                      _step_of, _write_atomically)
from horovod_dpsgd.sim.learners import Learners

__all__ = ["save", "load"]


def _stacked_params(optimizer: torch.optim.Optimizer) -> List[torch.Tensor]:
    return [p for group in optimizer.param_groups for p in group["params"]]


def _learner_optimizer_state(state: Dict[str, Any], params: List[torch.Tensor], j: int) -> Dict[str, Any]:
    """Learner ``j``'s optimizer state: row ``j`` of each state tensor shaped like its stacked parameter."""
    rows = {}
    for index, entries in state["state"].items():
        shape = params[index].shape
        rows[index] = {k: v[j].clone(memory_format=torch.contiguous_format)
                       if isinstance(v, torch.Tensor) and v.shape == shape else v for k, v in entries.items()}
    return {**state, "state": rows}


def _stacked_optimizer_state(states: List[Dict[str, Any]], params: List[torch.Tensor]) -> Dict[str, Any]:
    """The inverse of :func:`_learner_optimizer_state` over all learners' states."""
    stacked = {}
    for index, entries in states[0]["state"].items():
        shape = params[index].shape[1:]
        stacked[index] = {
            k: torch.stack([s["state"][index][k] for s in states])
            if isinstance(v, torch.Tensor) and v.shape == shape else v for k, v in entries.items()}
    return {**states[0], "state": stacked}


def save(directory: str, learners: Learners, optimizer: Optional[torch.optim.Optimizer] = None,
         extra: Optional[Dict[str, Any]] = None) -> List[str]:
    """Write every learner's checkpoint into ``directory`` (the MPI run's files and manifest); returns the files.

    As over MPI, the previous checkpoint in ``directory`` stays the valid one until the new manifest is in place;
    a failed write raises :class:`CheckpointError` and keeps it.
    """
    n = learners.n
    try:
        generation = _next_generation(directory)
        os.makedirs(directory, exist_ok=True)
    except OSError as exc:
        raise CheckpointError(f"cannot save into {directory!r}: {_describe(exc)}") from None
    model_state = learners.module.state_dict()
    optimizer_state = optimizer.state_dict() if optimizer is not None else None
    params = _stacked_params(optimizer) if optimizer is not None else []
    step, rng, entries = _step_of(optimizer), torch.get_rng_state(), []
    for j in range(n):
        state = {
            "format": _FORMAT, "rank": j, "size": n, "generation": generation, "step": step,
            "model": {k: v[j].clone(memory_format=torch.contiguous_format) for k, v in model_state.items()},
            "optimizer": _learner_optimizer_state(optimizer_state, params, j) if optimizer is not None else None,
            "torch_rng": rng,
            "extra": extra or {},
        }
        name = _learner_file(j, n, generation)

        def write(f, state=state):
            digest = _Digest(f)
            torch.save(state, digest)
            return digest

        try:
            digest = _write_atomically(os.path.join(directory, name), write)
        except Exception as exc:
            raise CheckpointError(f"checkpoint {directory} not saved; the previous one there, if any, is kept: "
                                  f"writing {os.path.join(directory, name)} failed: {_describe(exc)}") from None
        entries.append({"rank": j, "name": name, "sha256": digest.sha256.hexdigest(), "bytes": digest.nbytes,
                        "step": step})
    manifest = {"format": _FORMAT, "size": n, "generation": generation, "step": step,
                "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "files": entries}
    text = json.dumps(manifest, indent=1).encode("utf-8")
    try:
        _write_atomically(os.path.join(directory, MANIFEST), lambda f: f.write(text))
    except Exception as exc:
        raise CheckpointError(f"checkpoint {directory} not saved; the previous one there, if any, is kept: "
                              f"writing {os.path.join(directory, MANIFEST)} failed: {_describe(exc)}") from None
    _remove_other_saves(directory, keep={e["name"] for e in entries}, rank=0)
    return [os.path.join(directory, e["name"]) for e in entries]


def load(directory: str, learners: Learners, optimizer: Optional[torch.optim.Optimizer] = None,
         restore_rng: bool = True) -> Dict[str, Any]:
    """Restore every learner from ``directory`` (written by :func:`save` or by an MPI run of as many learners);
    returns the saved ``extra``. Every file is verified against the manifest before anything is loaded."""
    n = learners.n
    manifest = _read_manifest(directory)
    if manifest["size"] != n:
        raise CheckpointError(f"{directory} holds a checkpoint of {manifest['size']} learners but this run has {n}: "
                              f"resume with --np {manifest['size']}")
    states = [_read_learner(directory, manifest["files"][j], j, n, manifest["generation"]) for j in range(n)]
    if optimizer is not None and any(s["optimizer"] is None for s in states):
        raise CheckpointError(f"{directory} was saved without optimizer state; pass optimizer=None")
    try:
        module_state = learners.module.state_dict()
        learners.module.load_state_dict({k: torch.stack([s["model"][k] for s in states]).to(v.device)
                                         for k, v in module_state.items()})
        if optimizer is not None:
            optimizer.load_state_dict(_stacked_optimizer_state([s["optimizer"] for s in states],
                                                               _stacked_params(optimizer)))
    except Exception as exc:
        raise CheckpointError(f"cannot resume from {directory}: the saved state does not fit this model or "
                              f"optimizer: {_describe(exc)}") from None
    if optimizer is not None and _step_of(optimizer) not in (None, manifest["step"]):
        raise CheckpointError(f"cannot resume from {directory}: the optimizer is at step {_step_of(optimizer)} "
                              f"after loading, the manifest says {manifest['step']}")
    if restore_rng:
        torch.set_rng_state(states[0]["torch_rng"])
    return states[0]["extra"]
