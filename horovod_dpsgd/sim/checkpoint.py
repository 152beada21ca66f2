"""Checkpoints of simulated learners, in the MPI run's format: one file per learner.

:func:`save` writes ``learner-JJJJJ-of-NNNNN.pt`` files exactly as :func:`horovod_dpsgd.checkpoint.save` does on
rank ``j`` of an ``n``-process job: learner ``j``'s model state, its share of the optimizer state (row ``j`` of
every stacked state tensor: momentum, Adam's moments; the step counter), the RNG state and ``extra``. So a
simulated run resumes an MPI run's checkpoint and the other way round, and the toolkit's ``landscape`` and
``hessian`` commands read either (:func:`horovod_dpsgd.checkpoint.load_average`).
"""

import os
from typing import Any, Dict, List, Optional

import torch

from horovod_dpsgd.checkpoint import _FORMAT, CheckpointError, _learner_file
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
    """Write every learner's checkpoint into ``directory`` (the MPI run's files); returns the files."""
    os.makedirs(directory, exist_ok=True)
    n = learners.n
    model_state = learners.module.state_dict()
    optimizer_state = optimizer.state_dict() if optimizer is not None else None
    params = _stacked_params(optimizer) if optimizer is not None else []
    rng = torch.get_rng_state()
    files = []
    for j in range(n):
        state = {
            "format": _FORMAT, "rank": j, "size": n,
            "model": {k: v[j].clone(memory_format=torch.contiguous_format) for k, v in model_state.items()},
            "optimizer": _learner_optimizer_state(optimizer_state, params, j) if optimizer is not None else None,
            "torch_rng": rng,
            "extra": extra or {},
        }
        path = _learner_file(directory, j, n)
        tmp = f"{path}.tmp-{os.getpid()}"
        torch.save(state, tmp)
        os.replace(tmp, path)
        files.append(path)
    return files


def load(directory: str, learners: Learners, optimizer: Optional[torch.optim.Optimizer] = None,
         restore_rng: bool = True) -> Dict[str, Any]:
    """Restore every learner from ``directory`` (written by :func:`save` or by an MPI run of as many learners);
    returns the saved ``extra``."""
    n = learners.n
    states = []
    for j in range(n):
        path = _learner_file(directory, j, n)
        if not os.path.exists(path):
            found = sorted(f for f in os.listdir(directory) if f.startswith("learner-")) \
                if os.path.isdir(directory) else []
            if found:
                saved = int(found[0].rsplit("-of-", 1)[1].split(".")[0])
                raise CheckpointError(f"{directory} holds a checkpoint of {saved} learners but this run has {n}: "
                                      f"resume with --np {saved}")
            raise CheckpointError(f"no checkpoint of learner {j} in {directory!r} (expected {path})")
        state = torch.load(path, map_location="cpu", weights_only=False)
        if state.get("format") != _FORMAT or state.get("size") != n or state.get("rank") != j:
            raise CheckpointError(f"{path} is not a horovod-dpsgd checkpoint of learner {j} of {n}")
        states.append(state)
    module_state = learners.module.state_dict()
    learners.module.load_state_dict({k: torch.stack([s["model"][k] for s in states]).to(v.device)
                                     for k, v in module_state.items()})
    if optimizer is not None:
        if any(s["optimizer"] is None for s in states):
            raise CheckpointError(f"{directory} was saved without optimizer state; pass optimizer=None")
        optimizer.load_state_dict(_stacked_optimizer_state([s["optimizer"] for s in states],
                                                           _stacked_params(optimizer)))
    if restore_rng:
        torch.set_rng_state(states[0]["torch_rng"])
    return states[0]["extra"]
