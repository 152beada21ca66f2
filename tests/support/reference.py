"""Single-process reference implementation of DPSGD (paper Eq. 2), for tests.

All ``n`` learners live in one process; every step each computes its gradient at its own
weights, starts from the topology's weighted average of the weights, and applies its own
optimizer's update. The mixing sums terms in the same order as the plugin (own weight first,
then peers in plan order) so results agree to float rounding.
"""

from typing import Callable, List

import torch
from torch.nn.utils import parameters_to_vector, vector_to_parameters


def dpsgd_reference(models: List[torch.nn.Module], optimizers: List[torch.optim.Optimizer], topology,
                    loss_fn: Callable[[torch.nn.Module, int, int, int], torch.Tensor], steps: int,
                    passes: int = 1) -> List[torch.Tensor]:
    """Train ``models[j]`` with DPSGD for ``steps`` steps; ``loss_fn(model, j, t, pass)`` gives a loss."""
    n = len(models)
    for t in range(steps):
        for j, (model, opt) in enumerate(zip(models, optimizers)):
            opt.zero_grad()
            for k in range(passes):
                loss_fn(model, j, t, k).backward()
        with torch.no_grad():
            weights = [parameters_to_vector(m.parameters()).clone() for m in models]
            for j, model in enumerate(models):
                plan = topology.plan(j, t)
                mixed = weights[j] * plan.self_weight
                for peer, w in zip(plan.peers, plan.peer_weights):
                    mixed.add_(weights[peer], alpha=w)
                if plan.collective:
                    mixed = torch.stack(weights).sum(0) / n
                vector_to_parameters(mixed, model.parameters())
        for opt in optimizers:
            opt.step()
    return [parameters_to_vector(m.parameters()).detach().clone() for m in models]
