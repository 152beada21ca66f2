"""What every algorithm mixin shares: the step, its counter, callbacks, the non-finite policy, state.

:func:`horovod_dpsgd.DistributedOptimizer` builds ``type(name, (Algorithm, type(optimizer)), {})``: the
algorithm mixin comes *before* the user's optimizer class in the method resolution order, so plain
``super()`` reaches the user's ``step``, ``zero_grad`` and ``state_dict``, and ``isinstance`` and ``help()``
tell the truth. A step reads, for every algorithm::

    self.synchronize()              # finish this step's communication (algorithm-specific)
    loss = self._update(closure)    # the wrapped optimizer's update, under the non-finite policy
    self._end_step()                # callbacks observe, t <- t + 1
"""

import warnings
import weakref
from contextlib import contextmanager
from typing import Dict, List, Sequence, Tuple

import torch
from horovod.torch.optimizer import _DistributedOptimizer as _HorovodOptimizer

from horovod_dpsgd.callbacks import StepContext
from horovod_dpsgd.errors import NonFiniteError
from horovod_dpsgd.options import Options

__all__ = ["Algorithm", "named_trainable", "STATE_KEY"]

#: Key of the plugin's own entry in ``optimizer.state_dict()``.
STATE_KEY = "horovod_dpsgd"

Named = Sequence[Tuple[str, torch.Tensor]]


def named_trainable(param_groups, named_parameters) -> List[Tuple[str, torch.Tensor]]:
    """Validate ``named_parameters`` as Horovod does; return (name, param) of the trainable parameters."""
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


class _Progress:
    """Where this learner is: the step counter ``t``, and how far the current step has come."""

    __slots__ = (
        "t",                   # optimizer steps completed: the t of the paper's equations
        "trained",             # a backward pass has happened since the optimizer was built
        "backward",            # ... since the last step: this step's communication has started
        "synchronized",        # synchronize() has finished this step's communication
        "should_synchronize",  # False inside skip_synchronize()
        "skipped",             # updates skipped by nonfinite="skip"
        "restored",            # t was loaded by load_state_dict (takes precedence over fresh ranks' t = 0)
        "agreed",              # the ranks have agreed on t (at the first exchange after construction)
    )

    def __init__(self) -> None:
        self.t, self.skipped = 0, 0
        self.trained = self.backward = self.synchronized = self.restored = self.agreed = False
        self.should_synchronize = True


def _remove_hooks(handles) -> None:
    for handle in handles:
        handle.remove()


class Algorithm(torch.optim.Optimizer):
    """Mixin placed before the user's optimizer class. Subclasses define ``synchronize()``.

    Args:
        params: the wrapped optimizer's ``param_groups``.
        named_parameters: ``(name, parameter)`` of the trainable parameters (see :func:`named_trainable`).
        options: the plugin's settings.
        rank, size: this learner's index and the number of learners.
    """

    def __init__(self, params, *, named_parameters: Named, options: Options, rank: int, size: int):
        super().__init__(params)
        self._options = options
        self._rank, self._size = rank, size
        self._names: Dict[torch.Tensor, str] = {p: n for n, p in named_parameters}
        self._progress = _Progress()
        # The hooks live on the parameters; holding the optimizer weakly lets it (and what it composes, e.g. a
        # communication thread) go when the user drops it, and its hooks go with it.
        optimizer = weakref.ref(self)

        def on_grad(p: torch.Tensor) -> None:
            opt = optimizer()
            if opt is not None:
                opt._progress.trained = True
                opt._on_backward(p)

        handles = [p.register_post_accumulate_grad_hook(on_grad) for p in self._names]
        weakref.finalize(self, _remove_hooks, handles).atexit = False

    def _on_backward(self, p: torch.Tensor) -> None:
        """``p``'s gradient has been accumulated (called during ``backward()``)."""
        self._progress.backward = True

    def synchronize(self) -> None:  # pragma: no cover - every algorithm defines it
        raise NotImplementedError

    @contextmanager
    def skip_synchronize(self):
        """Context in which ``step()`` does not call ``synchronize()`` (Horovod's API)."""
        self._progress.should_synchronize = False
        try:
            yield
        finally:
            self._progress.should_synchronize = True

    def step(self, closure=None):
        progress = self._progress
        if not progress.trained:
            # No backward pass yet: hvd.broadcast_optimizer_state() filling empty optimizer state with zero
            # gradients. Update locally; communicate nothing, count nothing. Once training has begun, every
            # step communicates, so that the learners' step counters never drift apart.
            return super().step(closure)
        if progress.should_synchronize:
            if progress.synchronized:
                warnings.warn("optimizer.step() called without optimizer.skip_synchronize() context after "
                              "optimizer.synchronize(). This can cause training slowdown. You may want to consider "
                              "using optimizer.skip_synchronize() context if you use optimizer.synchronize() in "
                              "your code.")
            self.synchronize()
        loss = self._update(closure)
        self._end_step()
        return loss

    def _update(self, closure):
        """The wrapped optimizer's update, unless the non-finite policy skips it."""
        return super().step(closure) if self._gradients_finite() else None

    def _end_step(self) -> None:
        self._run_callbacks("on_after_update")
        self._run_callbacks("on_step_end")
        progress = self._progress
        progress.t += 1
        progress.backward = progress.synchronized = False

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zero the gradients (``set_to_none`` as in PyTorch; Horovod's ``zero_grad`` takes no argument)."""
        super().zero_grad(set_to_none=set_to_none)

    @torch.no_grad()
    def _gradients_finite(self) -> bool:
        """Apply the policy ``nonfinite`` to this learner's gradients; True if the update may proceed."""
        if self._options.nonfinite == "ignore":
            return True
        grads = [p.grad.coalesce()._values() if p.grad.is_sparse else p.grad for p in self._names
                 if p.grad is not None]
        if not grads:
            return True
        # A NaN or infinity anywhere makes the sum non-finite (+inf + -inf is NaN). One pass over the gradients,
        # summed in at least float32 so that fp16 gradients do not overflow.
        sums = [g.sum(dtype=torch.promote_types(g.dtype, torch.float32)).to(grads[0].device) for g in grads]
        if bool(torch.stack(sums).isfinite().all()):
            return True
        if self._options.nonfinite == "skip":
            self._progress.skipped += 1
            return False
        name = next(n for p, n in self._names.items() if p.grad is not None and not bool(p.grad.isfinite().all()))
        raise NonFiniteError(
            f"rank {self._rank}: the gradient of {name!r} is NaN or infinite at step {self._progress.t} (the loss "
            "or the weights are not finite); lower the learning rate or add gradient clipping, or pass "
            "nonfinite='skip' to skip such updates")

    def _run_callbacks(self, hook: str) -> None:
        if self._options.callbacks:
            ctx = StepContext(self, self._progress.t, self._rank, self._size, self._options.algorithm)
            for cb in self._options.callbacks:
                getattr(cb, hook)(ctx)

    @property
    def step_count(self) -> int:
        """Optimizer steps taken: the ``t`` of the paper's equations."""
        return self._progress.t

    @property
    def skipped_steps(self) -> int:
        """Updates skipped for non-finite gradients (``nonfinite='skip'``)."""
        return self._progress.skipped

    @property
    def options(self) -> Options:
        """The plugin's settings of this optimizer."""
        return self._options

    def state_dict(self):
        state = super().state_dict()
        state[STATE_KEY] = {"step": self._progress.t, "algorithm": self._options.algorithm}
        return state

    def load_state_dict(self, state_dict) -> None:
        state_dict = dict(state_dict)
        extra = state_dict.pop(STATE_KEY, None)
        super().load_state_dict(state_dict)
        progress = self._progress
        if extra is not None:
            progress.t = int(extra["step"])
        progress.restored = extra is not None
        progress.backward = progress.synchronized = False
