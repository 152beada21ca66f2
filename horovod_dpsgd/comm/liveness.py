"""Who is still there: learners that leave say so, and a learner whose launcher is gone leaves.

* :class:`Roster`: when a learner's process exits, it tells every other rank after how many steps it finished each
  of its DPSGD optimizers, then waits (up to 30 s) until every other rank leaves too. A learner still training in a step that a departed one never reached fails at once with
  :class:`~horovod_dpsgd.errors.StepMismatchError` naming both ranks and steps, instead of waiting for the timeout,
  or crashing inside MPI once Horovod has shut down (Horovod finalizes MPI on every rank when one rank's process
  ends).
* :func:`watch_launcher`: when the ``horovodrun`` or ``mpirun`` that started this learner is gone (killed without
  the chance to stop its job), the learner receives ``SIGTERM``, as if the launcher had stopped it, rather than
  train on with nobody to report to.
"""

import atexit
import os
import signal
import sys
import threading
import time
from typing import Dict, List, Optional, Tuple

from horovod_dpsgd.errors import StepMismatchError

__all__ = ["Roster", "Membership", "join", "watch_launcher", "launcher_processes"]

_TAG = 1
#: Longest wait at exit for the other learners to finish too (seconds): long enough for a learner still training to
#: reach its next exchange and read the announcement, short enough not to keep a finished job waiting.
EXIT_WAIT = 30.0


def _mpi():
    from mpi4py import MPI
    return MPI


class Membership:
    """One DPSGD optimizer's place in the :class:`Roster`: ``seq`` numbers it (optimizers are built collectively,
    so the same optimizer has the same number on every rank); ``steps`` is what this learner announces if it
    leaves now (the averager keeps it: the steps whose weights it has sent)."""

    __slots__ = ("roster", "seq", "steps")

    def __init__(self, roster: "Roster", seq: int):
        self.roster, self.seq, self.steps = roster, seq, 0

    def check(self, step: int) -> None:
        """Raise StepMismatchError if a learner left before ``step`` of this optimizer, which this one is in."""
        self.roster.check(self.seq, step)


class Roster:
    """This process's DPSGD optimizers, and the learners that have left. One per process (see :func:`join`).

    Args:
        comm: the first optimizer's communicator (ranks ordered as Horovod's); announcements travel on a duplicate.
    """

    def __init__(self, comm):
        MPI = _mpi()
        self.comm = comm.Dup()
        self.comm.Set_errhandler(MPI.ERRORS_RETURN)  # a peer already gone must not abort a learner that leaves
        self.rank, self.size = self.comm.Get_rank(), self.comm.Get_size()
        self.members: List[Membership] = []
        self.left: Dict[int, Dict[int, int]] = {}  # rank -> {optimizer seq: steps it finished after}
        self.timeout = 0.0  # the longest timeout of this process's optimizers: the longest wait at exit
        self._lock = threading.Lock()  # the training and communication threads both poll
        self._gone = False

    def register(self, timeout: float) -> Membership:
        member = Membership(self, len(self.members))
        self.members.append(member)
        self.timeout = max(self.timeout, timeout)
        return member

    def poll(self) -> None:
        """Receive the announcements that have arrived."""
        if not self._lock.acquire(blocking=False):  # the other thread is polling
            return
        try:
            MPI = _mpi()
            status = MPI.Status()
            while self.comm.iprobe(MPI.ANY_SOURCE, _TAG, status):
                self.left[status.Get_source()] = self.comm.recv(source=status.Get_source(), tag=_TAG)
        finally:
            self._lock.release()

    def check(self, seq: int, step: int) -> None:
        if not _mpi().Is_finalized():  # else only what has arrived already
            self.poll()
        gone = sorted((table.get(seq, 0), r) for r, table in self.left.items() if table.get(seq, 0) <= step)
        if gone:
            n, r = gone[0]
            raise StepMismatchError(
                f"rank {r} finished after {n} steps while rank {self.rank} started its {_ordinal(step + 1)}: the "
                "ranks ran different numbers of steps. Give every rank the same number of batches (drop_last=True "
                "in the DistributedSampler, or stop every rank at the same step); a step() on one rank only counts "
                "as a step too")

    def leave(self) -> None:
        """Tell every other rank after how many steps this learner finished each optimizer; then wait (up to the
        timeout, at most :data:`EXIT_WAIT` seconds) until every other rank leaves too. Once, at exit.

        The wait is a Horovod allreduce, not an MPI call of the plugin's: once a rank has left it shuts Horovod
        down, and Horovod then finalizes MPI on every rank from its background thread, under any MPI call the
        plugin might still be making. A Horovod operation completes in that thread, before the shutdown.
        """
        MPI = _mpi()
        if self._gone or self.size == 1 or MPI.Is_finalized():
            return
        self._gone = True
        table = {m.seq: m.steps for m in self.members}
        deadline = time.monotonic() + min(self.timeout, EXIT_WAIT)
        try:
            sends = [self.comm.isend(table, dest=r, tag=_TAG) for r in range(self.size) if r != self.rank]
            while not MPI.Request.Testall(sends) and time.monotonic() < deadline:
                time.sleep(0.001)  # small messages: sent at once
        except MPI.Exception:  # a peer has gone already
            return
        _wait_for_everyone(deadline)


def _wait_for_everyone(deadline: float) -> None:
    """A Horovod allreduce that every leaving rank joins, given up at ``deadline`` (a rank still busy with other
    work, e.g. rank 0 alone evaluating, is left behind)."""
    import horovod.torch as hvd
    import torch
    try:
        handle = hvd.allreduce_async(torch.zeros(1), name="horovod_dpsgd.leave", op=hvd.Sum)
        while not hvd.poll(handle) and time.monotonic() < deadline:
            time.sleep(0.01)
    except Exception:  # Horovod has been shut down already (hvd.shutdown() in the script)
        return


_roster: List[Roster] = []


def join(comm, timeout: float) -> Membership:
    """Register a new DPSGD optimizer over ``comm`` (collective: the first one of the process builds the roster and
    has it announce this learner's departure at exit, before Horovod shuts down)."""
    if not _roster:
        _roster.append(Roster(comm))
        atexit.register(_roster[0].leave)  # registered after hvd.init(): runs before Horovod's shutdown
    return _roster[0].register(timeout)


def _ordinal(n: int) -> str:
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


# --- the launcher ----------------------------------------------------------------------------------------------

#: Program names of the processes that launch learners.
LAUNCHERS = ("horovodrun", "mpirun", "mpiexec", "orterun", "orted", "prterun", "prted")
_watching: List[threading.Thread] = []


def _stat(pid: int) -> Optional[Tuple[int, int, str]]:
    """``(parent pid, start time, state)`` of ``pid`` from /proc, or None if it does not exist."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            text = f.read().decode(errors="replace")
    except OSError:
        return None
    fields = text[text.rindex(")") + 2:].split()  # the command name, in parentheses, may hold spaces
    return int(fields[1]), int(fields[19]), fields[0]


def _launcher_name(pid: int) -> Optional[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
    except OSError:
        return None
    # horovodrun is a Python script: its name is the first or second word
    names = [os.path.basename(a) for a in argv[:2]]
    return next((n for n in names if n in LAUNCHERS), None)


def launcher_processes() -> List[Tuple[int, int, str]]:
    """``(pid, start time, name)`` of this process's ancestors that are launchers (Linux; [] elsewhere)."""
    found, pid = [], os.getppid()
    while pid > 1:
        stat = _stat(pid)
        if stat is None:
            break
        name = _launcher_name(pid)
        if name is not None:
            found.append((pid, stat[1], name))
        pid = stat[0]
    return found


def _gone(pid: int, start: int) -> bool:
    stat = _stat(pid)
    return stat is None or stat[1] != start or stat[2] in ("Z", "X")


def _watch(launchers: List[Tuple[int, int, str]], every: float, grace: float, stop: threading.Event) -> None:
    while not stop.wait(every):
        gone = next(((pid, name) for pid, start, name in launchers if _gone(pid, start)), None)
        if gone is None:
            continue
        sys.stderr.write(f"horovod-dpsgd: the launcher of this learner, {gone[1]} (pid {gone[0]}), is gone; "
                         f"stopping learner pid {os.getpid()} (SIGTERM)\n")
        sys.stderr.flush()
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(grace)  # a SIGTERM handler may checkpoint; the default one has ended the process already
        os._exit(143)


def _stop_watching(stop: threading.Event, thread: threading.Thread) -> None:
    """At exit: end the watch before the interpreter finalizes (a daemon thread that wakes up then can crash it)."""
    stop.set()
    thread.join(timeout=5.0)


def watch_launcher(every: float = 1.0, grace: float = 30.0) -> None:
    """Stop this learner when a launcher among its ancestors exits. Once per process; a daemon thread that reads
    /proc every ``every`` seconds, until exit. A learner that ignores SIGTERM is ended ``grace`` seconds later."""
    if _watching or not os.path.isdir("/proc/self"):
        return
    launchers = launcher_processes()
    if not launchers:
        return
    stop = threading.Event()
    thread = threading.Thread(target=_watch, args=(launchers, every, grace, stop), name="dpsgd-launcher-watch",
                              daemon=True)
    thread.start()
    _watching.append(thread)
    atexit.register(_stop_watching, stop, thread)
