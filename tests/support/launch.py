"""Launch multi-process jobs from tests, always with a timeout that kills the whole job."""

import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import List, Optional, Sequence

import psutil

from horovod_dpsgd.experiments.launch import horovodrun_command, horovodrun_env

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def run(cmd: Sequence[str], timeout: float, env: Optional[dict] = None, np_: int = 1) -> subprocess.CompletedProcess:
    """Run ``cmd`` in its own process group; on timeout (or an interrupt) kill the whole job and fail loudly."""
    full_env = {**horovodrun_env(np_), "PYTHONPATH": str(REPO), **(env or {})}
    proc = subprocess.Popen(list(cmd), cwd=REPO, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        out = _kill(proc)
        raise AssertionError(f"{' '.join(cmd)} did not finish within {timeout} s; output:\n{out[-5000:]}")
    except BaseException:  # pytest-timeout's or Ctrl-C's interrupt: never leave the job running
        _kill(proc)
        raise
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, None)


def _kill(proc: subprocess.Popen) -> str:
    """SIGKILL the job and return what it printed.

    Its process group holds horovodrun, but not mpirun and the ranks: horovodrun's middleman starts them in a
    session of their own (horovod.runner.common.util.safe_shell_exec) and stops them only gracefully, seconds
    later. So every descendant is frozen (no new children), then all are killed together with the group.
    """
    family = []
    for _ in range(2):  # the second pass catches children started while the first froze their parents
        try:
            family += [p for p in psutil.Process(proc.pid).children(recursive=True) if p not in family]
        except psutil.NoSuchProcess:
            break
        for p in family:
            with contextlib.suppress(psutil.Error):
                p.suspend()
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    for p in family:
        with contextlib.suppress(psutil.Error):
            p.kill()
    return proc.communicate()[0]


def horovodrun(np: int, args: List[str], timeout: float = 240, extra: Sequence[str] = ()) -> subprocess.CompletedProcess:
    """``horovodrun -np N [extra] python ARGS...`` with the test interpreter."""
    return run(horovodrun_command(np, args, extra), timeout, np_=np)


def emulated_hosts(shaping: bool):
    """The marks of a module whose tests run on emulated hosts (``horovod-dpsgd cluster``): ``mpi``, and a skip
    that says what is missing (root, network namespaces, ``tc`` when ``shaping``) where the machine cannot."""
    import pytest

    from horovod_dpsgd.experiments.cluster import ClusterUnavailableError, system
    try:
        system.check_requirements(shaping=shaping)
        missing = ""
    except ClusterUnavailableError as exc:
        missing = str(exc)
    return [pytest.mark.mpi, pytest.mark.skipif(bool(missing), reason=missing or "-")]
