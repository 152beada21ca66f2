"""What every algorithm class shares: step counting, callbacks, backward detection, state.

The algorithm classes are not subclassed by the user's optimizer class: like Horovod,
:func:`horovod_dpsgd.DistributedOptimizer` copies their methods into a dynamic subclass of the
user's optimizer class, so every method here reaches the wrapped optimizer through
``super(self.__class__, self)``.
"""

import weakref
from typing import List, Sequence, Tuple

import torch
import horovod.torch as hvd
from horovod.torch.optimizer import _DistributedOptimizer as _HorovodOptimizer

from horovod_dpsgd.callbacks import Callback, StepContext
from horovod_dpsgd.errors import NonFiniteError

STATE_KEY = "horovod_dpsgd"


def named_trainable(param_groups, named_parameters) -> List[Tuple[str, torch.Tensor]]:
    """Validate ``named_parameters`` as Horovod does; return (name, param) of trainable params."""
    if named_parameters is not None:
        named_parameters = list(named_parameters)
    else:
        named_parameters = [(f"allreduce.noname.{i}.{j}", v) for i, group in enumerate(param_groups)
                            for j, v in enumerate(group["params"])]
    if any(not isinstance(p, tuple) for p in named_parameters):
        raise ValueError("named_parameters should be a sequence of tuples (name, parameter), "
                         "usually produced by model.named_parameters().")
    dups = _HorovodOptimizer.find_duplicates([k for k, _ in named_parameters])
    if dups:
        raise ValueError("Parameter names in named_parameters must be unique. Found duplicates: %s" % ", ".join(dups))
    names = {id(v): k for k, v in named_parameters}
    unnamed = [id(v) for group in param_groups for v in group["params"] if id(v) not in names]
    if unnamed:
        raise ValueError("named_parameters was specified, but one or more model parameters were not named. "
                         "Python object ids: %s" % ", ".join(str(i) for i in unnamed))
    return [(names[id(p)], p) for group in param_groups for p in group["params"] if p.requires_grad]


def _remove_hooks(handles) -> None:
    for handle in handles:
        handle.remove()


class StepTracking(torch.optim.Optimizer):
    """What both algorithms share: step counting, callbacks, backward detection, state."""

    def _init_tracking(self, named: Sequence[Tuple[str, torch.Tensor]], callbacks: Sequence[Callback],
                       algorithm: str, nonfinite: str) -> None:
        trainable = [p for _, p in named]
        self._trainable_names = [n for n, _ in named]
        self._algorithm = algorithm
        self._nonfinite = nonfinite
        self._skipped_steps = 0
        self._callbacks = list(callbacks)
        self._step_count = 0
        self._pending = False  # a backward pass happened since the last step
        self._passes = {p: 0 for p in trainable}
        # The hooks live on the parameters; holding the optimizer weakly lets it (and its communication
        # thread) go when the user drops it, and its hooks go with it.
        optimizer = weakref.ref(self)

        def on_grad(p: torch.Tensor) -> None:
            opt = optimizer()
            if opt is not None:
                opt._on_grad(p)

        self._hook_handles = [p.register_post_accumulate_grad_hook(on_grad) for p in trainable]
        weakref.finalize(self, _remove_hooks, self._hook_handles).atexit = False

    def _on_grad(self, p: torch.Tensor) -> None:
        self._pending = True

    @torch.no_grad()
    def _gradients_finite(self) -> bool:
        """Apply the policy ``nonfinite`` to this learner's gradients; True if the update may proceed."""
        if self._nonfinite == "ignore":
            return True
        grads = [p.grad.coalesce()._values() if p.grad.is_sparse else p.grad for p in self._passes
                 if p.grad is not None]
        # A NaN or infinity anywhere makes the sum non-finite (+inf + -inf is NaN). One pass over the gradients,
        # summed in at least float32 so that fp16 gradients do not overflow.
        sums = [g.sum(dtype=torch.promote_types(g.dtype, torch.float32)).to(grads[0].device) for g in grads]
        if not grads or bool(torch.stack(sums).isfinite().all()):
            return True
        if self._nonfinite == "skip":
            self._skipped_steps += 1
            return False
        name = next(n for n, p in zip(self._trainable_names, self._passes)
                    if p.grad is not None and not bool(p.grad.isfinite().all()))
        raise NonFiniteError(
            f"rank {hvd.rank()}: the gradient of {name!r} is NaN or infinite at step {self._step_count} (the loss or "
            "the weights are not finite); lower the learning rate or add gradient clipping, or pass "
            "nonfinite='skip' to skip such updates")

    @property
    def skipped_steps(self) -> int:
        """Updates skipped for non-finite gradients (``nonfinite='skip'``)."""
        return self._skipped_steps

    def _run_callbacks(self, hook: str) -> None:
        if self._callbacks:
            ctx = StepContext(self, self._step_count, hvd.rank(), hvd.size(), self._algorithm)
            for cb in self._callbacks:
                getattr(cb, hook)(ctx)

    @property
    def step_count(self) -> int:
        """Optimizer steps taken (the ``t`` of the paper's equations)."""
        return self._step_count

    def state_dict(self):
        state = super(self.__class__, self).state_dict()
        state[STATE_KEY] = {"step": self._step_count, "algorithm": self._algorithm}
        return state

    def _load_tracking(self, state_dict) -> dict:
        state_dict = dict(state_dict)
        extra = state_dict.pop(STATE_KEY, None)
        if extra is not None:
            self._step_count = int(extra["step"])
        self._pending = False
        for p in self._passes:
            self._passes[p] = 0
        return state_dict
