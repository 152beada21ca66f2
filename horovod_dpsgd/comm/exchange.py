"""The MPI exchange: moves flat parameter buffers between neighbours with mpi4py.

The plugin talks over its own communicator (a split of ``MPI.COMM_WORLD`` ordered by Horovod
rank), so its messages never match Horovod's. Each exchange posts non-blocking sends and
receives (or one ``Iallreduce`` for full averaging) and completes them on a communication
thread, so the transfer overlaps the forward/backward computation; :meth:`Exchange.wait`
blocks only for what is still in flight. Every wait has a timeout that turns into an
:class:`ExchangeTimeoutError` naming the peers that did not answer, and warns long before it
(:class:`StallWarning`, after Horovod's ``HOROVOD_STALL_CHECK_TIME_SECONDS``, 60 s by default).

Messages know their step: each is tagged with it and received with any tag, so a peer at another
step is named at the first exchange (:class:`StepMismatchError`) instead of at the timeout.
"""

import math
import os
import queue
import sys
import threading
import time
import warnings
from typing import Callable, List, NamedTuple, Optional, Sequence, Union

import numpy as np
import torch

from horovod_dpsgd.errors import ExchangeTimeoutError, MPIEnvironmentError, StallWarning, StepMismatchError

__all__ = ["communicator", "mpi_world_size", "abort_job_on_uncaught_exception", "Transfer", "Exchange",
           "ExchangeHandle", "DEFAULT_TIMEOUT", "stall_warning_seconds"]

#: Seconds a blocking wait may take before it fails (``HOROVOD_DPSGD_TIMEOUT`` overrides it).
DEFAULT_TIMEOUT = 300.0
_POLL_MAX = 1e-3  # longest sleep between two progress polls, seconds
_TAGS = 32768  # message tags are the step modulo this (MPI guarantees tags up to 32767)
_CHECK_EVERY = 1e-3  # seconds between two calls of a wait's check (it probes for messages: ~5 us a call)


def _mpi():
    try:
        from mpi4py import MPI
    except ImportError as exc:  # pragma: no cover - mpi4py is a dependency
        raise MPIEnvironmentError(
            "mpi4py is not installed or cannot load libmpi; install it against the MPI that "
            "horovodrun uses (`pip install mpi4py`), or use algorithm='ssgd'") from exc
    return MPI


def stall_warning_seconds() -> Optional[float]:
    """Seconds between :class:`StallWarning` reports of a wait: Horovod's stall inspector setting,
    ``HOROVOD_STALL_CHECK_TIME_SECONDS`` (default 60); None when ``HOROVOD_STALL_CHECK_DISABLE=1``."""
    if os.environ.get("HOROVOD_STALL_CHECK_DISABLE", "0") not in ("", "0"):
        return None
    seconds = float(os.environ.get("HOROVOD_STALL_CHECK_TIME_SECONDS", 60))
    return seconds if seconds > 0 else None


def _pending(requests) -> List[int]:
    """Indices of the requests not complete yet (without completing any: their statuses are still to come)."""
    MPI = _mpi()
    return [i for i, r in enumerate(requests) if r != MPI.REQUEST_NULL and not r.Get_status()]


def _wait_requests(requests, deadline: float, what, urgent: Optional[threading.Event] = None, *,
                   check: Optional[Callable[[], None]] = None,
                   stalled: Optional[Callable[[Sequence[int], float], str]] = None,
                   statuses: Optional[list] = None) -> None:
    """Drive ``requests`` to completion; past ``deadline`` raise ExchangeTimeoutError(what(pending)).

    Polls with a growing pause (cheap while the training thread computes); once ``urgent`` is
    set (the training thread is waiting for the result) it polls without pausing. ``check()`` runs
    first and then at most every millisecond, and may raise to end the wait early (e.g. a peer has left); every
    :func:`stall_warning_seconds` a :class:`StallWarning` reports ``stalled(pending, waited)``.
    ``statuses``, if given, receives the requests' statuses.
    """
    MPI = _mpi()
    delay = 1e-5
    start = time.monotonic()
    every = stall_warning_seconds() if stalled is not None else None
    warn_at = start + every if every else math.inf
    check_at = start
    while True:
        now = time.monotonic()
        if check is not None and now >= check_at:
            check()
            check_at = now + _CHECK_EVERY
        _check_not_finalized(what)
        if MPI.Request.Testall(requests, statuses):
            return
        if now > deadline:
            raise ExchangeTimeoutError(what(_pending(requests)) if callable(what) else what)
        if now >= warn_at:
            warnings.warn(stalled(_pending(requests), now - start), StallWarning)
            warn_at += every
        if urgent is None:
            time.sleep(delay)
        elif urgent.wait(delay):
            delay = 0.0
            continue
        delay = min(2 * delay, _POLL_MAX)


def _check_not_finalized(what) -> None:
    """Raise MPIEnvironmentError if MPI has been finalized under this wait (any MPI call would abort the process)."""
    if not _mpi().Is_finalized():
        return
    raise MPIEnvironmentError(
        f"MPI was finalized while this rank waited ({what() if callable(what) else what}). Horovod finalizes MPI on "
        "every rank when one rank's process ends or calls hvd.shutdown(): another rank has probably finished "
        "training earlier (use drop_last=True in the DistributedSampler so that every rank runs the same number of "
        "steps, and do not call hvd.shutdown() before every rank is done)")


def mpi_world_size() -> int:
    """The size of MPI's world (1 when the job was not launched with MPI, e.g. ``horovodrun --gloo``)."""
    return _mpi().COMM_WORLD.Get_size()


def communicator(rank: int, size: int, timeout: float = DEFAULT_TIMEOUT):
    """The plugin's own MPI communicator, ranks ordered as Horovod's.

    Raises :class:`MPIEnvironmentError` when the job was not launched with MPI (e.g.
    ``horovodrun --gloo``) or MPI's world differs from Horovod's.
    """
    MPI = _mpi()
    world = MPI.COMM_WORLD
    if world.Get_size() != size:
        if world.Get_size() == 1:
            raise MPIEnvironmentError(
                f"Horovod runs {size} processes but MPI sees a world of 1: the job was started without "
                f"MPI (horovodrun --gloo, or separate `python` processes). DPSGD exchanges weights over "
                f"MPI: launch with `horovodrun -np {size} python ...` (without --gloo) or "
                f"`mpirun -np {size} python ...`, or pass algorithm='ssgd'")
        raise MPIEnvironmentError(
            f"Horovod's world has {size} ranks but MPI_COMM_WORLD has {world.Get_size()}; DPSGD trains "
            "over the whole MPI world: call hvd.init() or hvd.init(comm=MPI.COMM_WORLD)")
    # Everyone must arrive before the blocking collectives below, or nobody waits forever.
    _wait_requests([world.Ibarrier()], time.monotonic() + timeout,
                   f"not every rank built a DPSGD optimizer within {timeout:.0f} s; every rank must "
                   "construct horovod_dpsgd.DistributedOptimizer",
                   stalled=lambda pending, waited: f"horovod-dpsgd: rank {rank} has waited {waited:.0f} s for the "
                   f"other ranks to build horovod_dpsgd.DistributedOptimizer (ExchangeTimeoutError at {timeout:g} s)")
    comm = world.Split(0, rank)
    ranks = comm.allgather(rank)
    if ranks != list(range(size)):
        comm.Free()
        raise MPIEnvironmentError(f"Horovod ranks {ranks} are not 0..{size - 1}; call hvd.init() once per process")
    if MPI.Query_thread() < MPI.THREAD_MULTIPLE:
        warnings.warn("MPI does not provide MPI_THREAD_MULTIPLE; horovod-dpsgd exchanges weights without a "
                      "communication thread, so communication overlaps computation less", RuntimeWarning)
    return comm


def abort_job_on_uncaught_exception() -> None:
    """Make an uncaught exception on this rank abort the whole MPI job, naming the rank.

    Without it, the other learners would wait for the failed one until their exchange times
    out. Chains to the previous ``sys.excepthook`` (the traceback is printed first), as
    ``python -m mpi4py`` does. Installed once per process.
    """
    previous = sys.excepthook
    if getattr(previous, "_horovod_dpsgd", False):
        return

    def hook(exc_type, exc, tb):
        previous(exc_type, exc, tb)
        MPI = _mpi()
        if MPI.Is_finalized():  # MPI cannot abort any more; a non-zero exit still ends the job under mpirun
            sys.stderr.flush()
            os._exit(1)
        sys.stderr.write(f"horovod-dpsgd: rank {MPI.COMM_WORLD.Get_rank()} raised {exc_type.__name__}: {exc}; "
                         "aborting the MPI job so that the other learners do not wait for it\n")
        sys.stderr.flush()
        MPI.COMM_WORLD.Abort(1)

    hook._horovod_dpsgd = True
    sys.excepthook = hook


class Transfer(NamedTuple):
    """One flat buffer's traffic in an exchange.

    Point-to-point: ``send`` goes to every rank in ``dests`` (``peers`` when ``None``, as for a
    symmetric topology); ``recv[i]`` receives from ``peers[i]``. Collective (``peers is None``):
    ``recv[0]`` receives the sum of ``send`` over all ranks.
    """

    send: torch.Tensor
    peers: Optional[Sequence[int]]
    recv: Sequence[torch.Tensor]
    dests: Optional[Sequence[int]] = None


def _as_bytes(t: torch.Tensor):
    MPI = _mpi()
    raw = t.view(torch.uint8)
    return [raw.numpy() if raw.device.type == "cpu" else raw, MPI.BYTE]


def _as_typed(t: torch.Tensor):
    return t.numpy() if t.device.type == "cpu" else t


class ExchangeHandle:
    """An exchange in flight; :meth:`wait` completes it."""

    def __init__(self, exchange: "Exchange", transfers: Sequence[Transfer], step: int, peers: Sequence[int]):
        self._exchange = exchange
        self.transfers = list(transfers)
        self.step = step
        self.peers = tuple(peers)
        self._done = threading.Event()
        self._urgent = threading.Event()  # set when the training thread waits for this exchange
        self._claim = threading.Lock()  # taken by the thread that completes the exchange
        self._error: Optional[BaseException] = None
        self._requests: List = []
        # what each request waits for: a peer's rank, or (collectives) None or a description of the collective
        self._request_peers: List[Union[int, str, None]] = []
        self._receives: List[int] = []  # indices of the point-to-point receives, whose tags name the peer's step
        self._steps: Optional[np.ndarray] = None  # every rank's step, gathered alongside collectives
        self._staged = []  # (float32 copy, destination) of collectives on reduced precision

    def _post(self) -> None:
        MPI = _mpi()
        comm = self._exchange.comm
        tag = self.step % _TAGS
        for t in self.transfers:
            if t.peers is None:
                send, out = t.send, t.recv[0]
                if send.dtype not in (torch.float32, torch.float64):
                    send, out = send.float(), torch.empty(send.numel(), dtype=torch.float32, device=send.device)
                    self._staged.append((out, t.recv[0]))
                self._requests.append(comm.Iallreduce(_as_typed(send), _as_typed(out), op=MPI.SUM))
                self._request_peers.append(None)
                continue
            for peer, buf in zip(t.peers, t.recv):  # any tag: a message of another step is named, not left waiting
                self._receives.append(len(self._requests))
                self._requests.append(comm.Irecv(_as_bytes(buf), source=peer, tag=MPI.ANY_TAG))
                self._request_peers.append(peer)
            for peer in (t.peers if t.dests is None else t.dests):
                self._requests.append(comm.Isend(_as_bytes(t.send), dest=peer, tag=tag))
                self._request_peers.append(peer)
        if self._request_peers and self._request_peers[0] is None:  # a collective carries no tag: gather the steps
            self._steps = np.empty(comm.Get_size(), dtype=np.int64)
            self._requests.append(comm.Iallgather(np.array([self.step], dtype=np.int64), self._steps))
            self._request_peers.append(None)

    def _run(self) -> None:
        """Complete the exchange, unless another thread has already taken it."""
        if self._claim.acquire(blocking=False):
            self._complete()

    def _complete(self) -> None:
        try:
            if not self._requests:
                self._post()
            deadline = time.monotonic() + self._exchange.timeout
            check = self._exchange.check
            while True:
                statuses = [_mpi().Status() for _ in self._requests]
                _wait_requests(self._requests, deadline, self._timeout_message, self._urgent,
                               check=(lambda: check(self.step)) if check is not None else None,
                               stalled=self._stall_message, statuses=statuses)
                self._check_steps(statuses)
                if not self._next_round():
                    break
            for tmp, out in self._staged:
                out.copy_(tmp)
        except BaseException as exc:  # handed to the waiting thread
            self._error = exc
        finally:
            self._done.set()

    def _next_round(self) -> bool:
        """Post the requests of the exchange's next round, once the previous ones completed; False when done.

        A plain exchange has one round. Subclasses with several (e.g. a sum inside each host, then an
        exchange across hosts) replace ``_requests``, ``_request_peers`` and ``_receives`` here.
        """
        return False

    def _check_steps(self, statuses) -> None:
        """Raise StepMismatchError if a peer sent the weights of another step."""
        steps = [(self._request_peers[i], _step_of_tag(statuses[i].Get_tag(), self.step)) for i in self._receives]
        if self._steps is not None:
            steps += list(enumerate(int(s) for s in self._steps))
        other = next(((peer, s) for peer, s in steps if s != self.step), None)
        if other is not None:
            raise StepMismatchError(
                f"rank {self._exchange.comm.Get_rank()}: in the weight exchange of step {self.step}, "
                f"{self._exchange.where(other[0])} sent its weights of step {other[1]}: the ranks' step counters "
                "differ. Every rank must count the same steps: a rank that caught an exception raised inside step() "
                "and went on, or that called load_state_dict alone, is out of step; restart from a checkpoint loaded "
                "on every rank")

    def _silent(self, pending: Sequence[int] = ()) -> str:
        where = self._exchange.where
        waits = [self._request_peers[i] for i in pending]
        silent = sorted({p for p in waits if isinstance(p, int)})
        stuck = sorted({p for p in waits if isinstance(p, str)})
        if silent or stuck:
            return "; ".join(([", ".join(map(where, silent))] if silent else []) +
                             [f"{what} (not complete)" for what in stuck])
        if pending:
            return "the allreduce over all ranks"
        return ", ".join(map(where, self.peers)) if self.peers else "the allreduce"

    def _timeout_message(self, pending: Sequence[int] = ()) -> str:
        return (f"rank {self._exchange.comm.Get_rank()}: in the weight exchange of step {self.step}, "
                f"{self._silent(pending)} did not answer within {self._exchange.timeout:g} s. A peer has died, "
                "hangs, or runs a different number of steps (use drop_last=True in the DistributedSampler so every "
                "rank runs the same number of batches); raise `timeout=` if steps are legitimately this slow")

    def _stall_message(self, pending: Sequence[int], waited: float) -> str:
        return (f"horovod-dpsgd: rank {self._exchange.comm.Get_rank()} has waited {waited:.0f} s in the weight "
                f"exchange of step {self.step} for {self._silent(pending)}; still waiting (ExchangeTimeoutError at "
                f"{self._exchange.timeout:g} s). A peer may be slow, stopped or hung")

    def wait(self) -> None:
        """Block until the exchange completes; raise its error, if any."""
        self._urgent.set()
        # Not yet taken by the communication thread (nothing to overlap with): complete it here rather
        # than wait for that thread to wake up.
        self._run()
        if not self._done.wait(self._exchange.timeout + 10.0):
            raise ExchangeTimeoutError(self._timeout_message())
        if self._error is not None:
            raise self._error


def _step_of_tag(tag: int, step: int) -> int:
    """The step nearest ``step`` whose tag is ``tag``."""
    return step + (tag - step + _TAGS // 2) % _TAGS - _TAGS // 2


class Exchange:
    """Runs exchanges on the plugin's communicator, on a communication thread by default.

    Args:
        comm: the plugin's communicator (see :func:`communicator`).
        timeout: seconds an exchange may take before :class:`ExchangeTimeoutError`.
        overlap: complete exchanges on a communication thread (needs MPI_THREAD_MULTIPLE);
            otherwise requests are posted at :meth:`start` and completed in ``wait()``.
        check: called with the step at every poll of a wait; raises to end it early (e.g.
            :meth:`~horovod_dpsgd.comm.liveness.Membership.check`, when a peer has left).
    """

    def __init__(self, comm, timeout: float = DEFAULT_TIMEOUT, overlap: bool = True,
                 check: Optional[Callable[[int], None]] = None, where: Optional[Callable[[int], str]] = None):
        MPI = _mpi()
        self.comm = comm
        self.timeout = float(timeout)
        self.check = check
        #: How messages name a rank (e.g. with its host): ``where(rank)``.
        self.where = where or (lambda rank: f"rank {rank}")
        self._worker = None
        if overlap and MPI.Query_thread() >= MPI.THREAD_MULTIPLE:
            # A daemon thread: a process that exits (or dies) never waits for a blocked exchange.
            self._jobs: "queue.SimpleQueue[Optional[ExchangeHandle]]" = queue.SimpleQueue()
            self._worker = threading.Thread(target=self._serve, name="dpsgd-exchange", daemon=True)
            self._worker.start()

    def _serve(self) -> None:
        while True:
            handle = self._jobs.get()
            if handle is None:
                return
            handle._run()
            del handle  # the training thread owns the buffers; do not keep them alive while idle

    def start(self, transfers: Sequence[Transfer], step: int, peers: Sequence[int] = ()) -> ExchangeHandle:
        """Start moving ``transfers``; ``peers`` only names them in error messages."""
        return self.submit(ExchangeHandle(self, transfers, step, peers))

    def submit(self, handle: ExchangeHandle) -> ExchangeHandle:
        """Start an exchange built on this one (an :class:`ExchangeHandle` or a subclass of it)."""
        if self._worker is not None:
            self._jobs.put(handle)
        else:
            handle._post()
        return handle

    def gather_step(self, step: int, restored: bool) -> np.ndarray:
        """Every rank's ``(step, restored)``, rows in rank order. Collective; no exchange may be in flight."""
        out = np.empty((self.comm.Get_size(), 2), dtype=np.int64)
        request = self.comm.Iallgather(np.array([step, int(restored)], dtype=np.int64), out)
        rank = self.comm.Get_rank()
        _wait_requests([request], time.monotonic() + self.timeout,
                       f"rank {rank}: not every rank reached its first weight exchange (step {step}) within "
                       f"{self.timeout:g} s; every rank must train",
                       check=(lambda: self.check(step)) if self.check is not None else None,
                       stalled=lambda pending, waited: f"horovod-dpsgd: rank {rank} has waited {waited:.0f} s for "
                       f"the other ranks to reach their first weight exchange (ExchangeTimeoutError at "
                       f"{self.timeout:g} s)")
        return out

    def close(self) -> None:
        """Stop the communication thread after the exchanges already started."""
        if self._worker is not None:
            self._jobs.put(None)
            self._worker = None
