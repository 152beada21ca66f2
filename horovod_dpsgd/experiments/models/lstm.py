"""The paper's acoustic model: a 6-layer bidirectional LSTM (Sec. 3, Table 1).

Defaults reproduce Table 1's 164.62 MB (4-byte parameters, MiB): 260-dim input features, 512 cells per
direction in each of 6 layers, a 256-unit linear bottleneck and 32 000 output classes (SWB-2000's
context-dependent states) give 43,154,944 parameters = 164.62 MiB. Each frame sequence is classified
from the time-averaged top-layer output (the synthetic stand-in task has one label per sequence).
"""

import torch
from torch import nn


class BiLSTM(nn.Module):
    def __init__(self, input_dim: int = 260, hidden_size: int = 512, num_layers: int = 6, bottleneck: int = 256,
                 num_classes: int = 32000):
        super().__init__()
        self.lstm = nn.LSTM(input_dim, hidden_size, num_layers, batch_first=True, bidirectional=True)
        self.bottleneck = nn.Linear(2 * hidden_size, bottleneck)
        self.output = nn.Linear(bottleneck, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: (batch, time, input_dim) -> (batch, num_classes) logits."""
        out, _ = self.lstm(x)
        return self.output(self.bottleneck(out.mean(1)))


def lstm(**kwargs) -> BiLSTM:
    return BiLSTM(**kwargs)
