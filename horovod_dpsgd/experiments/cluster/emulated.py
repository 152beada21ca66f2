"""The emulated cluster as a Python object (:class:`EmulatedCluster`), and the same operations by prefix."""

import contextlib
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Dict, Iterable, Iterator, List, Optional, Sequence

from horovod_dpsgd.experiments.cluster import system
from horovod_dpsgd.experiments.cluster.layout import (DEFAULT_PREFIX, INTERFACE, ClusterError, Layout,
                                                      format_rate, parse_rate)
from horovod_dpsgd.experiments.cluster.state import State, cluster_dir, machine_lock, state_file
from horovod_dpsgd.experiments.launch import horovodrun_env


class EmulatedCluster:
    """``hosts`` emulated hosts with ``slots`` process slots each, every link shaped to ``rate``.

    Use it as a context manager (brought up on entry, always torn down on exit), or call :meth:`up`
    and :meth:`down`. ``prefix`` names everything created (hosts ``PREFIX-h1``..., bridge ``PREFIX-br``,
    links ``PREFIX-v1``...): clusters with different prefixes coexist. ``subnet`` (a free /24 of
    10.77.0.0/16 by default) holds the hosts' addresses (.1, .2, ...) and the bridge's (.254).
    """

    def __init__(self, hosts: int = 2, slots: int = 1, rate=None, *, prefix: str = DEFAULT_PREFIX,
                 subnet: Optional[str] = None, interface: str = INTERFACE) -> None:
        self.layout = Layout(prefix=prefix, hosts=hosts, slots=slots, subnet=subnet or "10.77.0.0/24",
                             interface=interface)
        self._subnet_given = subnet is not None
        self.rate = parse_rate(rate)
        self._signals = contextlib.ExitStack()

    @classmethod
    def attach(cls, prefix: str = DEFAULT_PREFIX) -> "EmulatedCluster":
        """The cluster ``prefix`` brought up by any process, from its state file."""
        state = State.load(prefix)
        if state is None:
            raise ClusterError(f"no emulated cluster {prefix!r} is up (no {state_file(prefix)}); "
                               f"running: {', '.join(clusters()) or 'none'}")
        cluster = cls.__new__(cls)
        cluster.layout, cluster._subnet_given, cluster._signals = state.layout, True, contextlib.ExitStack()
        cluster.rate = state.data.get("rate")
        return cluster

    # -- what users need ------------------------------------------------------------------------------
    @property
    def prefix(self) -> str:
        return self.layout.prefix

    @property
    def hosts(self) -> List[str]:
        """Host names, in order (``PREFIX-h1``, ...)."""
        return self.layout.host_names

    @property
    def bin_dir(self) -> Path:
        """The directory holding the ``ssh`` stand-in; put it first on ``PATH`` (:meth:`env` does)."""
        return cluster_dir(self.prefix) / "bin"

    def horovodrun_args(self, np: Optional[int] = None, mpi_args: str = "") -> List[str]:
        """horovodrun's arguments for a job on all hosts (``np`` defaults to every slot).

        ``--network-interface`` names the hosts' interface (Open MPI's TCP transport uses it), and
        ``oob_tcp_if_include`` the subnet, over which the Open MPI daemons on the hosts reach mpirun.
        ``mpi_args`` adds to horovodrun's ``--mpi-args`` (e.g. ``"--mca btl_tcp_links 2"``); do not
        repeat ``btl`` or ``btl_tcp_if_include`` there: horovodrun sets them, and Open MPI refuses a
        parameter given twice.
        """
        layout = self.layout
        return ["-np", str(np or layout.hosts * layout.slots), "-H",
                ",".join(f"{h}:{layout.slots}" for h in layout.host_names), "--disable-cache",
                "--network-interface", layout.interface,
                f"--mpi-args=--mca oob_tcp_if_include {layout.subnet}" + (f" {mpi_args}" if mpi_args else "")]

    def horovodrun_command(self, command: Sequence[str], np: Optional[int] = None, extra: Sequence[str] = (),
                           mpi_args: str = "") -> List[str]:
        """``horovodrun <cluster arguments> [extra] COMMAND...`` with the horovodrun beside this Python."""
        horovodrun = Path(sys.executable).parent / "horovodrun"
        return [str(horovodrun) if horovodrun.exists() else "horovodrun", *self.horovodrun_args(np, mpi_args),
                *extra, *command]

    def env(self, base: Optional[Dict[str, str]] = None) -> Dict[str, str]:
        """The environment to launch with: the ssh stand-in first on ``PATH``, Open MPI told to yield
        the CPU (all hosts share this machine's cores), and ``HOROVOD_DPSGD_CLUSTER`` = the prefix."""
        env = horovodrun_env(10 ** 6, base)  # any process count: the emulated hosts share the cores
        env["PATH"] = os.pathsep.join([str(self.bin_dir), env.get("PATH", os.defpath)])
        env["HOROVOD_DPSGD_CLUSTER"] = self.prefix
        return env

    def launch_command(self, command: Sequence[str], np: Optional[int] = None, mpi_args: str = "") -> List[str]:
        """``command`` launched across the hosts: under :meth:`horovodrun_command`, unless it is a
        horovodrun command already (then unchanged)."""
        if os.path.basename(command[0]) == "horovodrun":
            return list(command)
        return self.horovodrun_command(command, np=np, mpi_args=mpi_args)

    def run(self, command: Sequence[str], timeout: Optional[float] = None, np: Optional[int] = None,
            mpi_args: str = "", capture: bool = True) -> subprocess.CompletedProcess:
        """Run :meth:`launch_command` with :meth:`env`; see :func:`run_command` for timeouts and signals."""
        return run_command(self.launch_command(command, np, mpi_args), self.env(), timeout, capture)

    # -- lifecycle ------------------------------------------------------------------------------------
    def up(self) -> "EmulatedCluster":
        """Create the bridge, hosts, links, names and ssh stand-in; on any failure, remove them again."""
        system.check_requirements(shaping=self.rate is not None)
        created = False
        try:
            with _terminate_as_exit(), machine_lock():
                system.refuse_existing(self.layout, subnet_given=self._subnet_given)
                if not self._subnet_given:
                    self.layout = self.layout.with_subnet(system.free_subnet())
                created = True  # from here on, a state file for this prefix is this call's
                state = State.create(self.layout, self.rate)
                system.build(state)
                if self.rate is not None:
                    system.shape(state, self.rate, self.hosts)
        except BaseException:
            if created:  # what was created goes again
                self.down()
            raise
        return self

    def down(self) -> List[str]:
        """Remove everything the state file lists; returns what was removed. Signals wait until it is done."""
        with _signals_deferred():
            return system.teardown(self.prefix)

    def shape(self, rate, hosts: Optional[Iterable[str]] = None) -> None:
        """Limit each link (of all hosts, or of ``hosts``) to ``rate`` in both directions; ``None`` or
        ``"none"`` removes the limit."""
        bits = parse_rate(rate)
        system.check_requirements(shaping=True)
        with machine_lock():
            state = self._state()
            system.shape(state, bits, list(hosts) if hosts is not None else self.hosts)
        if hosts is None:
            self.rate = bits

    def set_link(self, host: str, up: bool) -> None:
        """Take ``host``'s link down (every connection to other hosts stalls) or bring it up again."""
        system.set_link(self._state(), host, up)

    def counters(self) -> Dict[str, Dict[str, int]]:
        """Bytes and packets each host has ``sent`` and ``received`` through its link so far."""
        return {host: system.link_counters(self.layout.link(host)) for host in self.hosts}

    def status(self) -> dict:
        """What the state file records, and what exists of it now."""
        return system.describe(self._state())

    def _state(self) -> "State":
        state = State.load(self.prefix)
        if state is None:
            raise ClusterError(f"the emulated cluster {self.prefix!r} is not up")
        return state

    def __enter__(self) -> "EmulatedCluster":
        self._signals = contextlib.ExitStack()
        self._signals.enter_context(_terminate_as_exit())  # for the whole `with` block
        try:
            return self.up()
        except BaseException:
            self._signals.close()
            raise

    def __exit__(self, *exc_info) -> None:
        try:
            self.down()
        finally:
            self._signals.close()

    def __repr__(self) -> str:
        return (f"EmulatedCluster(hosts={self.layout.hosts}, slots={self.layout.slots}, "
                f"rate={format_rate(self.rate)!r}, prefix={self.prefix!r}, subnet={self.layout.subnet!r})")


def run_command(argv: Sequence[str], env: Optional[Dict[str, str]] = None, timeout: Optional[float] = None,
                capture: bool = False) -> subprocess.CompletedProcess:
    """Run ``argv`` in its own process group and wait. On timeout (:class:`subprocess.TimeoutExpired`,
    with the output so far), an exception or a signal, the whole group is stopped: SIGINT (horovodrun
    then stops its job), SIGKILL 10 s later. ``capture``: stdout and stderr together, as text."""
    try:
        proc = subprocess.Popen(list(argv), env=env, start_new_session=True, text=True,
                                stdout=subprocess.PIPE if capture else None,
                                stderr=subprocess.STDOUT if capture else None)
    except OSError as exc:
        raise ClusterError(f"cannot start {argv[0]!r}: {exc.strerror}") from None
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        out = _stop(proc)
        raise subprocess.TimeoutExpired(proc.args, timeout, output=out) from None
    except BaseException:
        _stop(proc)
        raise
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, None)


def _stop(proc: subprocess.Popen) -> Optional[str]:
    out = None
    for signum in (signal.SIGINT, signal.SIGKILL):
        try:
            os.killpg(proc.pid, signum)
            out, _ = proc.communicate(timeout=10)
            break
        except ProcessLookupError:
            break
        except subprocess.TimeoutExpired:
            continue
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # whatever of the group outlived its leader
    except ProcessLookupError:
        pass
    return out


def _exit_on_signal(signum, frame):
    raise SystemExit(128 + signum)


@contextlib.contextmanager
def _terminate_as_exit() -> Iterator[None]:
    """SIGTERM and SIGHUP raise SystemExit(128 + N) in the block (main thread only), so cleanup runs."""
    previous = {}
    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGTERM, signal.SIGHUP):
            previous[signum] = signal.signal(signum, _exit_on_signal)
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)


class _signals_deferred:
    """SIGINT, SIGTERM and SIGHUP wait until the block is done (main thread only), then act as usual."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

    def __enter__(self):
        self.received, self.previous = [], {}
        if threading.current_thread() is threading.main_thread():
            for signum in self.SIGNALS:
                self.previous[signum] = signal.signal(signum, lambda s, f: self.received.append(s))

    def __exit__(self, *exc_info):
        for signum, handler in self.previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        if self.received and exc_info[0] is None:
            os.kill(os.getpid(), self.received[0])  # delivered now, under the handlers restored above


# -- the same operations on a cluster by prefix, for other processes and the command line --------------
def up(hosts: int = 2, slots: int = 1, rate=None, **options) -> EmulatedCluster:
    """Bring up a cluster that outlives this call (see :class:`EmulatedCluster`); :func:`down` removes it."""
    return EmulatedCluster(hosts, slots, rate, **options).up()


def down(prefix: str = DEFAULT_PREFIX) -> List[str]:
    """Tear down the cluster ``prefix`` (from any process); returns what was removed."""
    if State.load(prefix) is None:
        raise ClusterError(f"no emulated cluster {prefix!r} is up; running: {', '.join(clusters()) or 'none'}")
    with _signals_deferred():
        return system.teardown(prefix)


def shape(rate, prefix: str = DEFAULT_PREFIX, hosts: Optional[Iterable[str]] = None) -> None:
    """Change the link rate of the cluster ``prefix`` (``None``/``"none"``: unshaped)."""
    parse_rate(rate)  # a bad rate is reported first
    EmulatedCluster.attach(prefix).shape(rate, hosts)


def status(prefix: str = DEFAULT_PREFIX) -> dict:
    """The cluster ``prefix``: layout, rates, what exists, link counters."""
    return EmulatedCluster.attach(prefix).status()


def clusters() -> List[str]:
    """Prefixes of the clusters whose state files exist."""
    return State.prefixes()
