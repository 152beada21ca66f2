"""horovod-dpsgd: Decentralized Parallel SGD for Horovod + PyTorch.

Replace ``hvd.DistributedOptimizer`` by :func:`horovod_dpsgd.DistributedOptimizer` and each
learner trains on its own weights, averaging them with its neighbours' every step (paper
Eq. 2) instead of allreducing gradients.

The package is the plugin a Horovod user imports:

* :func:`DistributedOptimizer` (:mod:`.optimizer`) and the algorithms behind it (:mod:`.algorithms`);
* :mod:`.topology`: who averages with whom (validated, doubly stochastic mixing matrices);
* :mod:`.comm`: the parameters' flat storage and the MPI exchange that moves it;
* :mod:`.callbacks` (including SSGD*'s :class:`GaussianNoise`) and :mod:`.diagnostics` (Eq. 3-4);
* :mod:`.checkpoint`: per-learner checkpoints and the averaged model;
* :mod:`.errors`.

The research toolkit that runs the paper's experiments (CLI, training loop, data, models, reports,
loss landscapes) is :mod:`horovod_dpsgd.experiments`; it imports the plugin, never the reverse, and needs
``pip install 'horovod-dpsgd[experiments]'``. See ``docs/architecture.md``.
"""

__version__ = "0.2.0"

from horovod_dpsgd import _deprecated
from horovod_dpsgd.callbacks import Callback, GaussianNoise, StepContext
from horovod_dpsgd.diagnostics import NoiseDiagnostics
from horovod_dpsgd.errors import (DPSGDError, ExchangeTimeoutError, MPIEnvironmentError, NonFiniteError,
                                  ParameterMismatchError, SettingsMismatchError, StallWarning, StepMismatchError,
                                  TopologyError)
from horovod_dpsgd.optimizer import ALGORITHMS, DistributedOptimizer
from horovod_dpsgd.options import Options
from horovod_dpsgd import checkpoint, topology

_deprecated.install()

__all__ = [
    "DistributedOptimizer", "Options", "ALGORITHMS", "topology", "checkpoint",
    "Callback", "StepContext", "GaussianNoise", "NoiseDiagnostics",
    "DPSGDError", "TopologyError", "MPIEnvironmentError", "ExchangeTimeoutError",
    "ParameterMismatchError", "NonFiniteError", "SettingsMismatchError", "StepMismatchError", "StallWarning",
]
