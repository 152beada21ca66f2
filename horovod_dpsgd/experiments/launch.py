"""Launching horovodrun jobs from Python (``compare``, tests, benchmarks)."""

import os
import sys
from typing import Dict, List, Optional, Sequence

__all__ = ["horovodrun_command", "horovodrun_env", "started_by_launcher"]

#: Variables that mpirun / horovodrun set in the processes they start (Open MPI, MPICH, PMIx, Horovod's Gloo).
LAUNCHER_VARIABLES = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK", "MPI_LOCALNRANKS", "HOROVOD_RANK")


def horovodrun_command(np_: int, args: Sequence[str], extra: Sequence[str] = ()) -> List[str]:
    """``horovodrun -np N [extra] <this python> ARGS...`` using the horovodrun beside this interpreter."""
    return [os.path.join(os.path.dirname(sys.executable), "horovodrun"), "-np", str(np_), *extra,
            sys.executable, *args]


def horovodrun_env(np_: int, base: Optional[Dict[str, str]] = None) -> Dict[str, str]:
    """The environment for a job of ``np_`` processes on this machine.

    When the processes fill the cores (``np_`` at least the core count), Open MPI must be told to
    yield the CPU while it waits (``OMPI_MCA_mpi_yield_when_idle=1``). horovodrun gives it one
    slot per process, so it does not know the cores are full and busy-polls: in every blocking MPI
    call, and in Horovod's background thread, which takes part in a small allreduce every cycle
    (1 ms) even when no tensor is reduced. Those spinning threads starve the ones that compute.
    Measured here on 2 cores: a 4-process MNIST run took 62 s instead of 18 s, and at 2 processes
    DPSGD's steps took 1.4-1.6x as long and Horovod's SSGD's 1.1-1.6x (docs/performance.md).
    A value already set is kept.
    """
    env = dict(os.environ if base is None else base)
    if np_ >= (os.cpu_count() or 1):
        env.setdefault("OMPI_MCA_mpi_yield_when_idle", "1")
    return env


def started_by_launcher(env: Optional[Dict[str, str]] = None) -> bool:
    """Whether this process was started by horovodrun or mpirun (not as a plain ``python`` process)."""
    env = os.environ if env is None else env
    return any(name in env for name in LAUNCHER_VARIABLES)
