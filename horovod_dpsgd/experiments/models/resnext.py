"""ResNeXt-29 (2x64d) in its CIFAR-10 form, as in pytorch-cifar."""

import torch
import torch.nn.functional as F
from torch import nn


class Block(nn.Module):
    """Grouped-convolution bottleneck; output width ``2 * cardinality * bottleneck_width``."""

    expansion = 2

    def __init__(self, in_planes: int, cardinality: int, bottleneck_width: int, stride: int):
        super().__init__()
        width = cardinality * bottleneck_width
        self.conv1 = nn.Conv2d(in_planes, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, groups=cardinality, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, self.expansion * width, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(self.expansion * width)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != self.expansion * width:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, self.expansion * width, 1, stride, bias=False),
                                          nn.BatchNorm2d(self.expansion * width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        return F.relu(self.bn3(self.conv3(out)) + self.shortcut(x))


class ResNeXt(nn.Module):
    def __init__(self, num_blocks=(3, 3, 3), cardinality: int = 2, bottleneck_width: int = 64,
                 num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        layers, in_planes, width = [], 64, bottleneck_width
        for blocks, stride in zip(num_blocks, (1, 2, 2)):
            for s in [stride] + [1] * (blocks - 1):
                layers.append(Block(in_planes, cardinality, width, s))
                in_planes = Block.expansion * cardinality * width
            width *= 2
        self.layers = nn.Sequential(*layers)
        self.linear = nn.Linear(in_planes, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layers(F.relu(self.bn1(self.conv1(x))))
        return self.linear(torch.flatten(F.adaptive_avg_pool2d(out, 1), 1))


def resnext29_2x64d(num_classes: int = 10) -> ResNeXt:
    return ResNeXt((3, 3, 3), 2, 64, num_classes)
