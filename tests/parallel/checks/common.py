"""Shared pieces of the multi-process check scripts (run under horovodrun / mpirun)."""

import json
import sys

import torch
import horovod.torch as hvd
from torch.nn.utils import parameters_to_vector


def make_model(seed: int = 0, hidden: int = 16) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(8, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, 3))


def batch(rank: int, t: int, k: int = 0, size: int = 16):
    g = torch.Generator().manual_seed(100_000 * t + 1000 * k + rank)
    return torch.randn(size, 8, generator=g), torch.randint(0, 3, (size,), generator=g)


def loss_fn(model, rank, t, k=0):
    x, y = batch(rank, t, k)
    return torch.nn.functional.cross_entropy(model(x), y)


_calls = [0]


def all_weights(model) -> torch.Tensor:
    """Every rank's flat weights, stacked (rank order). Collective: call on every rank."""
    flat = parameters_to_vector(model.parameters()).detach()
    _calls[0] += 1
    return hvd.allgather(flat.unsqueeze(0), name=f"weights.{_calls[0]}")


def report(results: dict) -> None:
    """Rank 0 writes results as JSON to the path given on the command line."""
    if hvd.rank() == 0:
        with open(sys.argv[1], "w") as f:
            json.dump(results, f, indent=1)
