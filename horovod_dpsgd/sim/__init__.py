"""The simulator: ``n`` learners of DPSGD or SSGD in one process, agreeing with the MPI run.

The plugin's own algorithms (:mod:`horovod_dpsgd.algorithms`), topologies, callbacks and the user's optimizer,
applied to ``n`` learners whose parameters are stacked along a leading learner dimension, on a CPU or a GPU::

    import torch, horovod_dpsgd.sim as sim

    learners = sim.Learners(model, n=64)                 # every learner starts from model's weights
    opt = sim.DistributedOptimizer(torch.optim.SGD(learners.parameters(), lr=0.1, momentum=0.9), learners,
                                   topology="ring", seed=0)
    for x, y in batches:                                 # x: (64, B, ...), learner j's batch in x[j]
        opt.zero_grad()
        learners.losses(torch.nn.functional.cross_entropy, learners(x), y).sum().backward()
        opt.step()                                       # mix with W(t), then every learner's own update

With the same seeds, data shards and topology, learner ``j``'s weights equal those of rank ``j`` of the
``horovodrun`` job to float rounding (tests/parallel/test_sim.py checks it). The simulator needs no MPI, Horovod
launch or toolkit dependency. See docs/simulator.md.
"""

from horovod_dpsgd.sim.averaging import MixingMatrix, StackedAverager, StackedGradientMean, StackedScreen
from horovod_dpsgd.sim.diagnostics import LearnerGroup, NoiseDiagnostics
from horovod_dpsgd.sim.learners import Learners
from horovod_dpsgd.sim.optimizer import ELEMENTWISE_OPTIMIZERS, DistributedOptimizer, LearnerContext, Stacked

__all__ = ["Learners", "DistributedOptimizer", "NoiseDiagnostics", "LearnerContext", "Stacked", "StackedAverager",
           "StackedGradientMean", "StackedScreen", "MixingMatrix", "LearnerGroup", "ELEMENTWISE_OPTIMIZERS"]
