"""The fully connected network of the paper's Sec. 2: 784-50-50-10 with ReLU."""

import torch
from torch import nn


class MLP(nn.Module):
    """``in_features``-50-50-``num_classes`` multilayer perceptron (paper Sec. 2: two hidden layers of 50)."""

    def __init__(self, in_features: int = 784, hidden: int = 50, num_classes: int = 10):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(in_features, hidden), nn.ReLU(),
                                 nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)
