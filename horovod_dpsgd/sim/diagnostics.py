"""The noise diagnostics (paper Eq. 3-4) of simulated learners: the plugin's own, once per learner.

:class:`NoiseDiagnostics` holds one :class:`horovod_dpsgd.NoiseDiagnostics` per learner ``j``, built on learner
``j``'s model (:meth:`~horovod_dpsgd.sim.Learners.learner`), exactly as rank ``j`` of an MPI run holds one. Each
measures what rank ``j`` measures, with the same code; where the MPI ranks average over Horovod, the simulated
learners average among themselves (:class:`LearnerGroup`). So the logged values, tags and steps are the MPI
run's. On a diagnostic step the learners' measurements run in turn, one thread per learner that hands over at
each average; other steps cost nothing.
"""

import threading
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch

from horovod_dpsgd import diagnostics
from horovod_dpsgd.callbacks import Callback, StepContext
from horovod_dpsgd.errors import DPSGDError
from horovod_dpsgd.sim.learners import Learners

__all__ = ["NoiseDiagnostics", "LearnerGroup"]

Batches = Sequence[Tuple[Any, Any]]


class LearnerGroup:
    """Collectives among the threads of ``n`` simulated learners, as Horovod's among MPI ranks.

    Learner ``j``'s thread calls ``member(j).average_(tensors, name)``: once every learner has arrived, the tensors
    are replaced by their mean over learners (summed in learner order). One thread computes at a time: a thread
    holds the group's turn while it runs and hands it over only while it waits for the others, so the learners'
    work is not run in parallel (no oversubscription of the cores, nor of the global random state).

    Args:
        n: number of learners.
        timeout: seconds a learner waits for the others before the step fails.
    """

    def __init__(self, n: int, timeout: float = 300.0):
        self.n = n
        self._barrier = threading.Barrier(n, timeout=timeout)
        self._turn = threading.Lock()
        self._slots: List[Any] = [None] * n

    def member(self, j: int) -> "_Member":
        """Learner ``j``'s side of the collectives (a :class:`horovod_dpsgd.diagnostics.Collectives`)."""
        return _Member(self, j)

    def _wait(self) -> None:
        self._turn.release()
        try:
            self._barrier.wait()
        finally:
            self._turn.acquire()

    def _average_(self, j: int, tensors: List[torch.Tensor]) -> None:
        self._slots[j] = tensors
        self._wait()
        if j == 0:  # every learner's tensors are in: average them, then let everyone go on
            with torch.no_grad():
                for i in range(len(tensors)):
                    total = self._slots[0][i].clone()
                    for k in range(1, self.n):
                        total.add_(self._slots[k][i])
                    total.div_(self.n)
                    for k in range(self.n):
                        self._slots[k][i].copy_(total)
        self._wait()

    def _allgather(self, j: int, obj: Any) -> List[Any]:
        self._slots[j] = obj
        self._wait()
        gathered = list(self._slots)
        self._wait()
        return gathered

    def run(self, calls: Sequence[Callable[[], None]]) -> None:
        """Run ``calls[j]`` as learner ``j``, all to completion; re-raise the first learner's error."""
        errors: List[Optional[BaseException]] = [None] * self.n

        def learner(j: int) -> None:
            with self._turn:
                try:
                    calls[j]()
                except BaseException as exc:  # noqa: BLE001 - handed to the caller below
                    errors[j] = exc
                    self._barrier.abort()  # the others stop waiting for this learner

        threads = [threading.Thread(target=learner, args=(j,), name=f"sim-learner-{j}", daemon=True)
                   for j in range(self.n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        self._barrier.reset()
        self._slots = [None] * self.n
        first = next((e for e in errors if e is not None and not isinstance(e, threading.BrokenBarrierError)),
                     next((e for e in errors if e is not None), None))
        if isinstance(first, threading.BrokenBarrierError):
            raise DPSGDError("the simulated learners' diagnostics did not all reach the same average (a learner "
                             "waited longer than the timeout)") from first
        if first is not None:
            raise first


class _Member:
    """Learner ``j``'s :class:`~horovod_dpsgd.diagnostics.Collectives` in a :class:`LearnerGroup`."""

    __slots__ = ("group", "j")

    def __init__(self, group: LearnerGroup, j: int):
        self.group, self.j = group, j

    def average_(self, tensors: List[torch.Tensor], name: str) -> None:
        self.group._average_(self.j, tensors)

    def allgather_object(self, obj: Any, name: str) -> List[Any]:
        return self.group._allgather(self.j, obj)


class NoiseDiagnostics(Callback):
    """:class:`horovod_dpsgd.NoiseDiagnostics` for the learners of a simulated run.

    Takes the arguments of :class:`horovod_dpsgd.NoiseDiagnostics`, with the stacked ``learners`` in place of the
    model; learner 0 logs (as rank 0), and :attr:`last` and :attr:`count` are its. Call :meth:`observe` after the
    backward pass with the stacked batch and the learners' losses, as ``learners(inputs)`` takes them.
    """

    def __init__(self, learners: Learners, loss_fn: Callable[[Any, Any], torch.Tensor],
                 probe: Union[Batches, Callable[[int], Batches]], every: int = 50, log_dir: Any = None,
                 hessian: bool = False, reuse_grad: bool = False):
        if not isinstance(learners, Learners):
            raise TypeError(f"learners must be horovod_dpsgd.sim.Learners, got {type(learners).__name__}")
        self.learners = learners
        self.group = LearnerGroup(learners.n)
        #: Learner ``j``'s diagnostics, what MPI rank ``j`` runs.
        self.per_learner = [
            diagnostics.NoiseDiagnostics(learners.learner(j), loss_fn, probe, every=every,
                                         log_dir=log_dir if j == 0 else None, hessian=hessian, reuse_grad=reuse_grad,
                                         collectives=self.group.member(j))
            for j in range(learners.n)]
        self.every = self.per_learner[0].every
        self._contexts: Dict[int, StepContext] = {}
        self._measuring = False

    @property
    def last(self) -> Dict[str, float]:
        """The values of the last diagnostic step (learner 0's, as rank 0's), see
        :attr:`horovod_dpsgd.NoiseDiagnostics.last`."""
        return self.per_learner[0].last

    @property
    def count(self) -> int:
        return self.per_learner[0].count

    def observe(self, inputs: Any, targets: Any, losses: Any = None) -> None:
        """Record this iteration's stacked minibatch (``(n, B, ...)``) and the ``n`` losses."""
        self.learners.learner_parameters()  # learner j's .grad views, whose versions reuse_grad checks
        for j, diag in enumerate(self.per_learner):
            diag.observe(inputs[j], targets[j], None if losses is None else losses[j])

    def on_before_mixing(self, ctx: StepContext) -> None:
        self._measuring = (ctx.step + 1) % self.every == 0
        self._dispatch("on_before_mixing", ctx, parallel=self._measuring)

    def on_step_end(self, ctx: StepContext) -> None:
        self._dispatch("on_step_end", ctx, parallel=self._measuring)

    def _dispatch(self, hook: str, ctx: StepContext, parallel: bool) -> None:
        """Learner ``ctx.rank``'s hook; on a diagnostic step, held until every learner's context is in, then all
        learners' hooks run together (they average among themselves)."""
        diag = self.per_learner[ctx.rank]
        diag.model = self.learners.learner(ctx.rank)  # current, should the stacked storage have been replaced
        if not parallel:
            getattr(diag, hook)(ctx)
            return
        self._contexts[ctx.rank] = ctx
        if len(self._contexts) < self.learners.n:
            return
        contexts, self._contexts = self._contexts, {}
        self.group.run([lambda j=j: getattr(self.per_learner[j], hook)(contexts[j]) for j in range(self.learners.n)])

    def close(self) -> None:
        """Flush learner 0's TensorBoard events (see :meth:`horovod_dpsgd.NoiseDiagnostics.close`)."""
        self.per_learner[0].close()
