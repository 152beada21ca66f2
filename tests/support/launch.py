"""Launch multi-process jobs from tests, always with a timeout that kills the whole job."""

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import List, Optional, Sequence

from horovod_dpsgd.experiments.launch import horovodrun_command, horovodrun_env

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def run(cmd: Sequence[str], timeout: float, env: Optional[dict] = None, np_: int = 1) -> subprocess.CompletedProcess:
    """Run ``cmd`` in its own process group; on timeout kill the group and fail loudly."""
    full_env = {**horovodrun_env(np_), "PYTHONPATH": str(REPO), **(env or {})}
    proc = subprocess.Popen(list(cmd), cwd=REPO, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        raise AssertionError(f"{' '.join(cmd)} did not finish within {timeout} s; output:\n{out[-5000:]}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, None)


def horovodrun(np: int, args: List[str], timeout: float = 240, extra: Sequence[str] = ()) -> subprocess.CompletedProcess:
    """``horovodrun -np N [extra] python ARGS...`` with the test interpreter."""
    return run(horovodrun_command(np, args, extra), timeout, np_=np)
