"""Ranks agree before they talk: on the settings when the optimizer is built, on the step when training starts.

**At construction**, each rank describes what decides its exchange (:func:`describe`): the algorithm, the
topology's name and the mixing plans it yields, the seed, ``backward_passes_per_step``, the timeout, the wire
format (``compression``), Horovod's reduction settings, and the trainable parameters' names, dtypes and shapes.
A rank whose arguments are invalid sends its error instead. :func:`agree` gathers every rank's description in
one collective and raises the same error on every rank, naming the rank and the differing values, or the rank
that failed and why: no rank raises alone while the others wait for it.

**At the first exchange** after construction, the ranks compare their step counters (:func:`resolve_step`):
the step drives the message tags and dynamic topologies, so it must be the same everywhere. Ranks that restored
a plugin state (``load_state_dict``) take precedence over fresh ones: this makes Horovod's resume pattern work
(rank 0 loads a checkpoint; ``hvd.broadcast_optimizer_state`` carries only the wrapped optimizer's state, and
nothing at all for a stateless one). Restored ranks that disagree raise
:class:`~horovod_dpsgd.errors.StepMismatchError` on every rank. Later, every message carries its step (its
tag), so ranks that fall out of step are named by their first exchange with each other
(:mod:`horovod_dpsgd.comm.exchange`).
"""

import hashlib
import pickle
import warnings
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch

from horovod_dpsgd.errors import DPSGDError, ParameterMismatchError, SettingsMismatchError, StepMismatchError

__all__ = ["describe", "plans_digest", "check", "agree", "agree_at_construction", "resolve_step",
           "warn_if_order_unchecked"]

#: Steps of a dynamic topology whose plans are compared at construction.
FINGERPRINT_STEPS = 4

Description = Dict[str, Any]


def plans_digest(topology, steps: int = FINGERPRINT_STEPS) -> List[str]:
    """One digest per step of every learner's mixing plan (who with whom, with what weights to 9 decimals, and
    whether by allreduce, to whom it sends, over which hosts it averages): equal plans give equal digests, whatever arithmetic built the matrix."""
    digests = []
    for step in range(steps if topology.dynamic else 1):
        h = hashlib.sha256()
        for rank in range(topology.size):
            plan = topology.plan(rank, step)
            h.update(repr((round(plan.self_weight, 9), tuple(plan.peers), tuple(round(w, 9) for w in plan.peer_weights),
                           bool(plan.collective), plan.send_to, tuple(plan.hosts))).encode())
        digests.append(h.hexdigest()[:16])
    return digests


def describe(*, options, topology, named: Sequence[Tuple[str, torch.Tensor]], compression,
             backward_passes_per_step: int, op, gradient_predivide_factor: float) -> Description:
    """What decides this rank's exchange, as plain comparable values (the order is the order of the checks)."""
    return {
        "algorithm": options.algorithm,
        "topology": topology.name if topology is not None else None,
        "mixing plans": plans_digest(topology) if topology is not None else None,
        "seed": options.seed,
        "backward_passes_per_step": backward_passes_per_step,
        "timeout": options.timeout,
        "compression": getattr(compression, "__name__", type(compression).__name__),
        "op": _op_name(op),
        "gradient_predivide_factor": gradient_predivide_factor,
        "parameters": [(n, str(p.dtype), tuple(p.shape)) for n, p in named],
    }


def _op_name(op) -> str:
    from horovod.torch.mpi_ops import Adasum, Average, Sum
    return {Average: "Average", Sum: "Sum", Adasum: "Adasum"}.get(op, str(op))


def warn_if_order_unchecked(named_parameters, named: Sequence[Tuple[str, torch.Tensor]], rank: int,
                            size: int) -> None:
    """Without names, only the sequence of shapes can be compared across ranks: rank 0 warns when it cannot tell a
    different order of same-shaped parameters apart (they would be averaged with the wrong tensors)."""
    if named_parameters is not None or rank != 0 or size == 1:
        return
    seen: Dict[Tuple[str, Tuple[int, ...]], int] = {}
    for _, p in named:
        key = (str(p.dtype), tuple(p.shape))
        seen[key] = seen.get(key, 0) + 1
    shared = {k: c for k, c in seen.items() if c > 1}
    if shared:
        (dtype, shape), count = max(shared.items(), key=lambda kv: kv[1])
        warnings.warn(
            f"named_parameters=None: horovod-dpsgd checks that every rank lists parameters of the same shapes in the "
            f"same order, but {sum(shared.values())} trainable parameters share their shape with another one (e.g. "
            f"{count} of shape {shape}, {dtype}): if a rank listed them in another order, their weights would be "
            "averaged with the wrong tensors, without an error. Pass named_parameters=model.named_parameters() so "
            "that the names are compared too.",
            UserWarning, stacklevel=4)  # the caller of DistributedOptimizer


# --- the construction collective ---------------------------------------------------------------------------

def _wire(mine: Union[Description, BaseException]) -> Dict[str, Any]:
    if not isinstance(mine, BaseException):
        return {"settings": mine}
    try:
        error = pickle.loads(pickle.dumps(mine))
    except Exception:  # an exception that does not travel: keep its type's name and its message
        error = DPSGDError(f"{type(mine).__name__}: {mine}")
    return {"error": error}


def _same_error(error: BaseException, rank: int, failed: Sequence[int]) -> BaseException:
    """``error`` of ``rank`` as raised on every rank: the same type, the message naming the rank."""
    also = f" (ranks {', '.join(map(str, failed))} failed)" if len(failed) > 1 else ""
    message = f"rank {rank} could not build horovod_dpsgd.DistributedOptimizer{also}: {error}"
    try:
        return type(error)(message)
    except Exception:
        return DPSGDError(f"{type(error).__name__}: {message}")


def _differences(a: Description, b: Description) -> List[str]:
    return [key for key in a if key != "parameters" and a[key] != b.get(key)]


def _parameter_detail(mine: list, theirs: list, rank: int) -> str:
    if len(mine) != len(theirs):
        return f"{len(mine)} trainable parameters on rank 0 but {len(theirs)} on rank {rank}"
    a, b = next((a, b) for a, b in zip(mine, theirs) if a != b)
    return f"parameter #{mine.index(a)}: rank 0 has {a}, rank {rank} has {b}"


def check(everyone: Sequence[Dict[str, Any]]) -> Optional[Tuple[int, int]]:
    """Raise the error every rank must raise for the gathered descriptions ``everyone``, except for a mismatch
    of the mixing plans, returned as ``(other rank, step index)`` so that the ranks can name the difference."""
    failed = [r for r, entry in enumerate(everyone) if "error" in entry]
    if failed:
        error = _same_error(everyone[failed[0]]["error"], failed[0], failed)
        raise error
    first = everyone[0]["settings"]
    for other, entry in enumerate(everyone):
        theirs = entry["settings"]
        keys = _differences(first, theirs)
        if keys == ["mixing plans"]:
            step = next(i for i, (a, b) in enumerate(zip(first[keys[0]], theirs[keys[0]])) if a != b)
            return other, step
        if keys:
            values = "; ".join(f"{k} is {first[k]!r} on rank 0 but {theirs[k]!r} on rank {other}"
                               for k in keys if k != "mixing plans")
            raise SettingsMismatchError(
                f"the ranks built DistributedOptimizer with different settings: {values}. Every rank must pass the "
                "same algorithm, topology, seed, backward_passes_per_step, timeout, compression and op (they decide "
                "who exchanges what with whom, and when)")
        if theirs["parameters"] != first["parameters"]:
            raise ParameterMismatchError(
                f"models differ across ranks ({_parameter_detail(first['parameters'], theirs['parameters'], other)}"
                "); DPSGD averages weights element by element, so every rank must build the same model with the same "
                "parameter order, shapes and dtypes")
    return None


def _plan_difference(comm, topology, other: int, step: int) -> SettingsMismatchError:
    """Collective: the first learner whose plan differs between rank 0's topology and rank ``other``'s.

    ``step`` indexes :func:`plans_digest`'s list, which is the step itself."""
    mine = [tuple(topology.plan(j, step)) for j in range(topology.size)]
    base = comm.bcast(mine if comm.Get_rank() == 0 else None, root=0)
    theirs = comm.bcast(mine if comm.Get_rank() == other else None, root=other)
    j = next((j for j, (a, b) in enumerate(zip(base, theirs)) if a != b), 0)

    def show(plan) -> str:
        self_weight, peers, weights = plan[:3]
        return "{" + ", ".join(f"{k}: {w:.4g}" for k, w in [(j, self_weight), *zip(peers, weights)]) + "}"

    return SettingsMismatchError(
        f"the ranks built DistributedOptimizer with different mixing matrices: at step {step}, learner {j} averages "
        f"with weights {show(base[j])} on rank 0 but {show(theirs[j])} on rank {other}. Every rank must pass the "
        "same topology (name or matrix) and seed; otherwise the combined mixing is not doubly stochastic")


def agree(comm, mine: Union[Description, BaseException], topology=None) -> None:
    """Gather every rank's description (or error) in one collective; raise the same error on every rank.

    ``comm`` is the plugin's MPI communicator, or None to gather through Horovod (e.g. SSGD under Gloo).
    """
    wire = _wire(mine)
    if comm is not None:
        everyone = comm.allgather(wire)
    else:
        import horovod.torch as hvd
        everyone = hvd.allgather_object(wire, name="horovod_dpsgd.settings")
    try:
        mismatch = check(everyone)
    except BaseException as exc:
        if isinstance(mine, BaseException):
            raise exc from mine
        raise
    if mismatch is not None:
        if comm is None or topology is None:
            raise SettingsMismatchError(f"rank {mismatch[0]} builds other mixing plans than rank 0 (at step "
                                        f"{mismatch[1]}); every rank must pass the same topology and seed")
        raise _plan_difference(comm, topology, *mismatch)


def agree_at_construction(mine: Union[Description, BaseException], rank: int, size: int, timeout: float,
                          topology=None, over_world: bool = True, comm=None):
    """The construction collective; returns the plugin's MPI communicator, or None without one.

    Over MPI when MPI's world is Horovod's (always, for DPSGD); through Horovod's ``allgather_object`` otherwise
    (SSGD under Gloo); ``comm``: the plugin's communicator, if already built. ``over_world=False`` (SSGD over a process set) compares nothing: ranks outside the set do not
    build this optimizer.
    """
    from horovod_dpsgd.comm.exchange import communicator, mpi_world_size
    if not over_world:
        if isinstance(mine, BaseException):
            raise mine
        return None
    if mpi_world_size() == size:
        comm = comm if comm is not None else communicator(rank, size, timeout)
        agree(comm, mine, topology)
        return comm
    if isinstance(mine, BaseException):
        raise mine
    if mine["algorithm"] == "dpsgd":
        communicator(rank, size, timeout)  # raises MPIEnvironmentError naming the fix
    agree(None, mine)
    return None


# --- the step --------------------------------------------------------------------------------------------------

def resolve_step(steps: Sequence[int], restored: Sequence[bool]) -> int:
    """The step every rank continues from, given each rank's step counter and whether it restored a state.

    Equal steps are kept. Fresh ranks (step 0, nothing restored) take the step of the ranks that restored one,
    if those agree. Anything else raises :class:`StepMismatchError` naming every rank's step.
    """
    if len(set(steps)) == 1:
        return int(steps[0])
    loaded = {s for s, r in zip(steps, restored) if r}
    if len(loaded) == 1 and all(r or s == 0 for s, r in zip(steps, restored)):
        return int(loaded.pop())
    groups: Dict[Tuple[int, bool], List[int]] = {}
    for rank, (s, r) in enumerate(zip(steps, restored)):
        groups.setdefault((int(s), bool(r)), []).append(rank)
    where = "; ".join(f"rank{'s' if len(ranks) > 1 else ''} {', '.join(map(str, ranks))} at step {s}"
                      f"{' (restored from a state_dict)' if r else ''}" for (s, r), ranks in sorted(groups.items()))
    raise StepMismatchError(
        f"the ranks disagree on the step count at their first exchange: {where}. The step decides the message tags "
        "and the random topologies, so it must be the same on every rank: resume every rank from the same "
        "checkpoint (checkpoint.load on every rank, or load on rank 0 and call hvd.broadcast_optimizer_state), "
        "and call load_state_dict on every rank or on none")

