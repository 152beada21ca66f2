"""SENet-18 in its CIFAR-10 form, as in pytorch-cifar (``SENet(PreActBlock, [2, 2, 2, 2])``).

pytorch-cifar's SENet18 is built from *pre-activation* blocks (BN-ReLU before each convolution, a bare
1x1 convolution as projection shortcut, squeeze-and-excitation with reduction 16 on the residual branch):
11,260,354 parameters = 42.95 MiB, Table 1's size. The post-activation variant (pytorch-cifar's unused
``BasicBlock``) has 11,263,042 (42.97 MiB).
"""

import torch
import torch.nn.functional as F
from torch import nn


class PreActSEBlock(nn.Module):
    """Pre-activation residual block with squeeze-and-excitation on the residual branch."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.shortcut = None
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Conv2d(in_planes, planes, 1, stride, bias=False)
        self.fc1 = nn.Conv2d(planes, planes // 16, 1)
        self.fc2 = nn.Conv2d(planes // 16, planes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(x))
        shortcut = x if self.shortcut is None else self.shortcut(out)
        out = self.conv2(F.relu(self.bn2(self.conv1(out))))
        w = self.fc2(F.relu(self.fc1(F.adaptive_avg_pool2d(out, 1)))).sigmoid()
        return out * w + shortcut


class SENet(nn.Module):
    """SENet for 32x32 inputs: 3x3 stem (conv-BN-ReLU), four stages of pre-activation SE blocks."""

    def __init__(self, num_blocks=(2, 2, 2, 2), num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        layers, in_planes = [], 64
        for planes, blocks, stride in zip((64, 128, 256, 512), num_blocks, (1, 2, 2, 2)):
            for s in [stride] + [1] * (blocks - 1):
                layers.append(PreActSEBlock(in_planes, planes, s))
                in_planes = planes
        self.layers = nn.Sequential(*layers)
        self.linear = nn.Linear(512, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layers(F.relu(self.bn1(self.conv1(x))))
        return self.linear(torch.flatten(F.adaptive_avg_pool2d(out, 1), 1))


def senet18(num_classes: int = 10) -> SENet:
    """SENet-18 (pytorch-cifar ``SENet18``), 11,260,354 parameters with 10 classes."""
    return SENet((2, 2, 2, 2), num_classes)
