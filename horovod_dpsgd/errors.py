"""Exception types raised by horovod-dpsgd.

Every error says what went wrong and how to fix it; catch the base class
:class:`DPSGDError` to handle all of them.
"""

__all__ = [
    "DPSGDError",
    "TopologyError",
    "MPIEnvironmentError",
    "ExchangeTimeoutError",
    "ParameterMismatchError",
    "NonFiniteError",
    "SettingsMismatchError",
    "StepMismatchError",
    "StallWarning",
]


class DPSGDError(RuntimeError):
    """Base class of all horovod-dpsgd errors."""


class TopologyError(DPSGDError, ValueError):
    """A topology or mixing matrix is invalid, or does not fit the world size."""


class MPIEnvironmentError(DPSGDError):
    """The job was not launched with MPI, or Horovod and MPI disagree on the world."""


class ExchangeTimeoutError(DPSGDError, TimeoutError):
    """A neighbour did not answer a weight exchange within the timeout."""


class ParameterMismatchError(DPSGDError, ValueError):
    """Parameters differ across ranks (count, shapes or dtypes), or cannot be exchanged."""


class NonFiniteError(DPSGDError, FloatingPointError):
    """A loss or parameter became NaN or infinite."""


class SettingsMismatchError(DPSGDError, ValueError):
    """Ranks built the optimizer with different settings (algorithm, topology, seed, ...)."""


class StepMismatchError(DPSGDError):
    """Ranks disagree on the step count: a learner finished early, resumed at another step, or skipped one."""


class StallWarning(RuntimeWarning):
    """A wait for other learners has lasted long (the job fails when it reaches the timeout)."""
