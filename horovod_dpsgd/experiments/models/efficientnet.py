"""EfficientNet-B0 in its CIFAR-10 form, as in pytorch-cifar's 2019 version (the one the paper used).

The paper's Table 1 size (11.11 MiB = 2,912,089 parameters) matches pytorch-cifar's EfficientNetB0 as
first published (3x3 depthwise kernels throughout, squeeze-and-excitation on the block output with
reduction 16, ReLU, strides (2, 1, 2, 2, 1, 2, 2)); the repository's later rewrite (5x5 kernels, swish,
drop-connect) has 3.60 M parameters. Its stride-2 blocks add the block output to itself where the
later version has no skip; kept as published.
"""

import torch
import torch.nn.functional as F
from torch import nn


class Block(nn.Module):
    """Expand 1x1, depthwise 3x3, project 1x1, squeeze-and-excitation, shortcut."""

    def __init__(self, cin: int, cout: int, expansion: int, stride: int):
        super().__init__()
        self.stride = stride
        planes = expansion * cin
        self.conv1 = nn.Conv2d(cin, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, groups=planes, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride == 1 and cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout))
        self.fc1 = nn.Conv2d(cout, cout // 16, 1)
        self.fc2 = nn.Conv2d(cout // 16, cout, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        shortcut = self.shortcut(x) if self.stride == 1 else out
        w = self.fc2(F.relu(self.fc1(F.adaptive_avg_pool2d(out, 1)))).sigmoid()
        return out * w + shortcut


class EfficientNet(nn.Module):
    # (expansion, out_planes, num_blocks, stride)
    B0 = [(1, 16, 1, 2), (6, 24, 2, 1), (6, 40, 2, 2), (6, 80, 3, 2), (6, 112, 3, 1), (6, 192, 4, 2), (6, 320, 1, 2)]

    def __init__(self, cfg=B0, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 32, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(32)
        layers, cin = [], 32
        for expansion, cout, blocks, stride in cfg:
            for s in [stride] + [1] * (blocks - 1):
                layers.append(Block(cin, cout, expansion, s))
                cin = cout
        self.layers = nn.Sequential(*layers)
        self.linear = nn.Linear(cfg[-1][1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layers(F.relu(self.bn1(self.conv1(x))))
        return self.linear(torch.flatten(F.adaptive_avg_pool2d(out, 1), 1))


def efficientnet_b0(num_classes: int = 10) -> EfficientNet:
    return EfficientNet(EfficientNet.B0, num_classes)
