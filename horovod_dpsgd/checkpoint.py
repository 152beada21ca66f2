"""Export of the learners' averaged model w_a for evaluation and inference."""

import copy

import torch
import horovod.torch as hvd

__all__ = ["average_model"]


@torch.no_grad()
def average_model(model: torch.nn.Module, name: str = "horovod_dpsgd.average_model") -> torch.nn.Module:
    """A copy of ``model`` whose floating-point state is the mean over all learners.

    Under DPSGD every learner holds different weights ``w_j``; the paper's average weight
    ``w_a = n^-1 sum_j w_j`` is the model to evaluate or ship. Parameters and floating-point
    buffers (e.g. BatchNorm running statistics) are averaged with one grouped allreduce;
    integer buffers are taken from this rank. Collective: call it on every rank.
    """
    averaged = copy.deepcopy(model)
    tensors = [t for t in list(averaged.parameters()) + list(averaged.buffers()) if t.is_floating_point()]
    if tensors and hvd.size() > 1:
        means = hvd.grouped_allreduce([t.detach() for t in tensors], op=hvd.Average, name=name)
        for t, mean in zip(tensors, means):
            t.copy_(mean)
    return averaged
