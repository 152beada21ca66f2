"""``horovod_dpsgd.sim.DistributedOptimizer``: the plugin's optimizer over ``n`` stacked learners, in one process.

It builds the same class as :func:`horovod_dpsgd.DistributedOptimizer`, ``type(name, (..., Algorithm,
type(optimizer)), {})``, with the same algorithm mixin (:class:`~horovod_dpsgd.algorithms.dpsgd.DPSGD` or
:class:`~horovod_dpsgd.algorithms.ssgd.SSGD`), so one place defines each algorithm's step. What differs is
only how weights move (:class:`~horovod_dpsgd.sim.averaging.StackedAverager` multiplies by ``W(t)`` where the
MPI averager exchanges messages; :class:`~horovod_dpsgd.sim.averaging.StackedGradientMean` averages rows where
Horovod allreduces) and :class:`Stacked`, which makes one optimizer stand for ``n`` learners: callbacks see
each learner ``j`` as MPI rank ``j`` would, and the non-finite policy applies per learner.

The user's optimizer updates all learners at once, over the stacked parameters. That equals each learner's
own update (momentum, weight decay, Adam's moments per learner) when the update is *elementwise*; see
:data:`ELEMENTWISE_OPTIMIZERS`.
"""

import dataclasses
import functools
from typing import Iterator, List, Sequence, Tuple, Union

import numpy as np
import torch

from horovod_dpsgd import topology as topologies
from horovod_dpsgd.algorithms.base import Algorithm, named_trainable
from horovod_dpsgd.algorithms.dpsgd import DPSGD
from horovod_dpsgd.algorithms.ssgd import SSGD
from horovod_dpsgd.callbacks import Callback, StepContext
from horovod_dpsgd.errors import NonFiniteError
from horovod_dpsgd.optimizer import _subclass
from horovod_dpsgd.options import Options
from horovod_dpsgd.sim.averaging import StackedAverager, StackedGradientMean, StackedScreen
from horovod_dpsgd.sim.learners import Learners

__all__ = ["DistributedOptimizer", "Stacked", "LearnerContext", "ELEMENTWISE_OPTIMIZERS"]

#: ``torch.optim`` classes whose update treats every element on its own (given its gradient, its state and the
#: step count), so that updating the stacked parameters equals updating each learner's. Not elementwise, hence
#: refused: ``LBFGS`` (line search and curvature pairs over all parameters), ``SparseAdam`` (sparse gradients),
#: ``Adafactor`` (factored second moments over a tensor's last two dimensions: a stacked vector would be factored
#: as a matrix), ``Muon`` (orthogonalises whole matrices).
ELEMENTWISE_OPTIMIZERS = tuple(getattr(torch.optim, name) for name in (
    "SGD", "Adam", "AdamW", "Adamax", "NAdam", "RAdam", "Adagrad", "RMSprop", "Adadelta", "Rprop", "ASGD")
    if hasattr(torch.optim, name))


@dataclasses.dataclass
class LearnerContext(StepContext):
    """The :class:`~horovod_dpsgd.StepContext` of learner ``rank`` of a simulated run.

    :meth:`parameters` yields learner ``rank``'s views of the stacked parameters (their ``.grad`` its rows of the
    stacked gradients): what MPI rank ``rank`` sees. ``optimizer`` is the simulator's optimizer of all learners.
    """

    learner_parameters: Tuple[torch.Tensor, ...] = ()

    def parameters(self) -> Iterator[torch.Tensor]:
        yield from self.learner_parameters


class Stacked(Algorithm):
    """Mixin before the algorithm: one optimizer holds all ``n`` learners, stacked along dim 0.

    Args:
        learners: the :class:`~horovod_dpsgd.sim.Learners` whose stacked parameters the optimizer trains.
        other keywords: see the algorithm mixin.
    """

    def __init__(self, params, *, learners: Learners, **kwargs):
        super().__init__(params, **kwargs)
        self._learners = learners
        self._skipped_by_learner = [0] * learners.n
        self._held: List[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    @property
    def learners(self) -> Learners:
        """The stacked learners this optimizer trains."""
        return self._learners

    def _contexts(self) -> Sequence[StepContext]:
        t, n, algorithm = self._progress.t, self._size, self._options.algorithm
        views = self._learners.learner_parameters(list(self._names))
        return [LearnerContext(self, t, j, n, algorithm, tuple(v)) for j, v in enumerate(views)]

    @torch.no_grad()
    def _gradients_finite(self) -> bool:
        """The non-finite policy, per learner: ``raise`` names the learner, ``skip`` skips only its update."""
        if self._options.nonfinite == "ignore":
            return True
        grads = [(name, p.grad) for p, name in self._names.items() if p.grad is not None]
        if not grads:
            return True
        n = self._size
        sums = torch.stack([g.reshape(n, -1).sum(1, dtype=torch.promote_types(g.dtype, torch.float32))
                            .to(grads[0][1].device) for _, g in grads])
        finite = sums.isfinite().all(0)
        if bool(finite.all()):
            return True
        bad = torch.nonzero(~finite).flatten()
        if self._options.nonfinite == "skip":
            self._hold(bad)
            return True
        j = int(bad[0])
        name = next(name for name, g in grads if not bool(g[j].isfinite().all()))
        raise NonFiniteError(
            f"learner {j}: the gradient of {name!r} is NaN or infinite at step {self._progress.t} (the loss "
            "or the weights are not finite); lower the learning rate or add gradient clipping, or pass "
            "nonfinite='skip' to skip such updates")

    def _hold(self, learners: torch.Tensor) -> None:
        """Keep ``learners``' rows of the parameters and of their optimizer state as they are through this update."""
        for j in learners.tolist():
            self._skipped_by_learner[j] += 1
        self._progress.skipped += 1
        for p in self._names:
            tensors = [p.data] + [s for s in self.state[p].values()
                                  if isinstance(s, torch.Tensor) and s.shape == p.shape]
            for t in tensors:
                index = learners.to(t.device)
                self._held.append((t, index, t.index_select(0, index)))
            if p.grad is not None:
                p.grad.index_fill_(0, learners.to(p.grad.device), 0.0)

    def _update(self, closure):
        self._held = []
        loss = super()._update(closure)
        with torch.no_grad():
            for t, index, rows in self._held:
                t.index_copy_(0, index, rows)
        self._held = []
        return loss

    @property
    def skipped_steps(self) -> int:
        """Steps in which some learner's update was skipped (``nonfinite='skip'``)."""
        return self._progress.skipped

    @property
    def skipped_by_learner(self) -> List[int]:
        """Updates skipped per learner (``nonfinite='skip'``): what MPI rank ``j``'s ``skipped_steps`` counts."""
        return list(self._skipped_by_learner)


def _check_elementwise(optimizer: torch.optim.Optimizer, elementwise: bool) -> None:
    if elementwise or type(optimizer) in ELEMENTWISE_OPTIMIZERS:
        return
    names = ", ".join(c.__name__ for c in ELEMENTWISE_OPTIMIZERS)
    raise TypeError(
        f"the simulator applies {type(optimizer).__name__}'s update to all learners' stacked parameters at once, "
        f"which equals each learner's own update only if the update is elementwise (no norms, line searches or "
        f"factorisations across elements). Use one of torch.optim's {names}; or, if your optimizer's update "
        "treats every element on its own, pass elementwise=True")


def _named(optimizer: torch.optim.Optimizer, learners: Learners) -> List[Tuple[str, torch.Tensor]]:
    stacked = list(learners.stacked_parameters())
    ids = {id(p) for _, p in stacked}
    if any(id(p) not in ids for group in optimizer.param_groups for p in group["params"]):
        raise ValueError("build the optimizer on the learners' stacked parameters, "
                         "torch.optim.SGD(learners.parameters(), ...), not on the model's")
    return named_trainable(optimizer.param_groups, stacked)


def DistributedOptimizer(optimizer: torch.optim.Optimizer, learners: Learners, *,
                         algorithm: str = "dpsgd",
                         topology: Union[str, topologies.Topology, np.ndarray] = "random_peer",
                         callbacks: Sequence[Callback] = (),
                         seed: int = 0,
                         nonfinite: str = "raise",
                         backward_passes_per_step: int = 1,
                         elementwise: bool = False) -> torch.optim.Optimizer:
    """Wrap ``optimizer`` (built on ``learners.parameters()``) for DPSGD or SSGD over the stacked learners.

    The settings mean what they mean in :func:`horovod_dpsgd.DistributedOptimizer` (:class:`horovod_dpsgd.Options`);
    with the same ``seed`` and ``topology``, learner ``j`` mixes with the same neighbours and weights at every step
    as MPI rank ``j``. Returns an instance of a class made for the user's optimizer class (``isinstance(opt,
    torch.optim.SGD)`` holds), stepping all learners at once.

    Args:
        optimizer: an optimizer over ``learners.parameters()`` whose update is elementwise
            (:data:`ELEMENTWISE_OPTIMIZERS`).
        learners: the stacked learners (:class:`~horovod_dpsgd.sim.Learners`).
        algorithm, topology, callbacks, seed, nonfinite: as in :class:`horovod_dpsgd.Options`.
        backward_passes_per_step: backward passes accumulated before each step (Horovod's).
        elementwise: accept an optimizer outside :data:`ELEMENTWISE_OPTIMIZERS`, promising that its update is
            elementwise.
    """
    options = Options(algorithm=algorithm, topology=topology, callbacks=tuple(callbacks or ()), seed=seed,
                      nonfinite=nonfinite)
    if not isinstance(learners, Learners):
        raise TypeError(f"learners must be horovod_dpsgd.sim.Learners, got {type(learners).__name__}")
    _check_elementwise(optimizer, elementwise)
    if backward_passes_per_step <= 0:
        raise ValueError("backward_passes_per_step must be > 0")
    named = _named(optimizer, learners)
    n = learners.n
    base = dict(named_parameters=named, options=options, rank=0, size=n, learners=learners)
    if options.algorithm == "ssgd":
        gradients = functools.partial(StackedGradientMean, n=n, backward_passes_per_step=backward_passes_per_step)
        return _subclass(optimizer, Stacked, SSGD)(optimizer.param_groups, gradients=gradients, **base)
    screen = None if options.nonfinite == "ignore" else StackedScreen(options.nonfinite, n)
    averager = StackedAverager([p for _, p in named], topologies.from_name(options.topology, n, options.seed), screen)
    return _subclass(optimizer, Stacked, DPSGD)(optimizer.param_groups, averager=averager,
                                                backward_passes_per_step=backward_passes_per_step, **base)
