"""horovod-dpsgd: Decentralized Parallel SGD for Horovod + PyTorch.

Replace ``hvd.DistributedOptimizer`` by :func:`horovod_dpsgd.DistributedOptimizer` and each
learner trains on its own weights, averaging them with its neighbours' every step (paper
Eq. 2) instead of allreducing gradients. See ``docs/`` for the algorithms, topologies and
diagnostics.
"""

__version__ = "0.1.0"

from horovod_dpsgd.callbacks import Callback, GaussianNoise, StepContext
from horovod_dpsgd.diagnostics import NoiseDiagnostics
from horovod_dpsgd.errors import (DPSGDError, ExchangeTimeoutError, MPIEnvironmentError, NonFiniteError,
                                  ParameterMismatchError, TopologyError)
from horovod_dpsgd.optimizer import ALGORITHMS, DistributedOptimizer
from horovod_dpsgd import checkpoint, topology

__all__ = [
    "DistributedOptimizer", "ALGORITHMS", "topology", "checkpoint",
    "Callback", "StepContext", "GaussianNoise", "NoiseDiagnostics",
    "DPSGDError", "TopologyError", "MPIEnvironmentError", "ExchangeTimeoutError",
    "ParameterMismatchError", "NonFiniteError",
]
