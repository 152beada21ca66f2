"""ShuffleNet in its CIFAR-10 forms, as in pytorch-cifar: V2 (1x) and G2 (v1, groups = 2).

The paper's Table 1 size for "ShuffleNet" (4.82 MiB) matches ShuffleNetV2 1x (1,263,854 parameters);
ShuffleNetG2 has 887,582 (3.39 MiB). ``get_model("shufflenet")`` is therefore V2; ``shufflenet_g2`` is v1.
"""

import torch
import torch.nn.functional as F
from torch import nn


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    n, c, h, w = x.shape
    return x.view(n, groups, c // groups, h, w).transpose(1, 2).reshape(n, c, h, w)


class Bottleneck(nn.Module):
    def __init__(self, in_planes: int, out_planes: int, stride: int, groups: int):
        super().__init__()
        self.stride = stride
        mid_planes = out_planes // 4
        self.g1 = 1 if in_planes == 24 else groups
        self.conv1 = nn.Conv2d(in_planes, mid_planes, 1, groups=self.g1, bias=False)
        self.bn1 = nn.BatchNorm2d(mid_planes)
        self.conv2 = nn.Conv2d(mid_planes, mid_planes, 3, stride, 1, groups=mid_planes, bias=False)
        self.bn2 = nn.BatchNorm2d(mid_planes)
        self.conv3 = nn.Conv2d(mid_planes, out_planes, 1, groups=groups, bias=False)
        self.bn3 = nn.BatchNorm2d(out_planes)
        self.shortcut = nn.AvgPool2d(3, stride=2, padding=1) if stride == 2 else nn.Sequential()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = channel_shuffle(F.relu(self.bn1(self.conv1(x))), self.g1)
        out = self.bn3(self.conv3(F.relu(self.bn2(self.conv2(out)))))
        res = self.shortcut(x)
        return F.relu(torch.cat([out, res], 1)) if self.stride == 2 else F.relu(out + res)


class ShuffleNet(nn.Module):
    def __init__(self, out_planes=(200, 400, 800), num_blocks=(4, 8, 4), groups: int = 2, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 24, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(24)
        layers, in_planes = [], 24
        for planes, blocks in zip(out_planes, num_blocks):
            for i in range(blocks):
                cat_planes = in_planes if i == 0 else 0  # stride-2 blocks concatenate their input
                layers.append(Bottleneck(in_planes, planes - cat_planes, 2 if i == 0 else 1, groups))
                in_planes = planes
        self.layers = nn.Sequential(*layers)
        self.linear = nn.Linear(out_planes[-1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layers(F.relu(self.bn1(self.conv1(x))))
        return self.linear(torch.flatten(F.adaptive_avg_pool2d(out, 1), 1))


def shufflenet_g2(num_classes: int = 10) -> ShuffleNet:
    return ShuffleNet(num_classes=num_classes)


class _V2Basic(nn.Module):
    """Split channels in half; transform one half (1x1, depthwise 3x3, 1x1); concatenate; shuffle."""

    def __init__(self, channels: int):
        super().__init__()
        c = channels // 2
        self.conv1, self.bn1 = nn.Conv2d(c, c, 1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, 1, 1, groups=c, bias=False), nn.BatchNorm2d(c)
        self.conv3, self.bn3 = nn.Conv2d(c, c, 1, bias=False), nn.BatchNorm2d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1, x2 = x.chunk(2, dim=1)
        out = F.relu(self.bn3(self.conv3(self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x2))))))))
        return channel_shuffle(torch.cat([x1, out], 1), 2)


class _V2Down(nn.Module):
    """Two stride-2 branches, concatenated and shuffled; doubles the width."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        mid = cout // 2
        self.left = nn.Sequential(nn.Conv2d(cin, cin, 3, 2, 1, groups=cin, bias=False), nn.BatchNorm2d(cin),
                                  nn.Conv2d(cin, mid, 1, bias=False), nn.BatchNorm2d(mid), nn.ReLU())
        self.right = nn.Sequential(nn.Conv2d(cin, mid, 1, bias=False), nn.BatchNorm2d(mid), nn.ReLU(),
                                   nn.Conv2d(mid, mid, 3, 2, 1, groups=mid, bias=False), nn.BatchNorm2d(mid),
                                   nn.Conv2d(mid, mid, 1, bias=False), nn.BatchNorm2d(mid), nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return channel_shuffle(torch.cat([self.left(x), self.right(x)], 1), 2)


class ShuffleNetV2(nn.Module):
    def __init__(self, out_channels=(116, 232, 464, 1024), num_blocks=(3, 7, 3), num_classes: int = 10):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 24, 3, 1, 1, bias=False), nn.BatchNorm2d(24)
        layers, cin = [], 24
        for cout, blocks in zip(out_channels[:3], num_blocks):
            layers += [_V2Down(cin, cout)] + [_V2Basic(cout) for _ in range(blocks)]
            cin = cout
        self.layers = nn.Sequential(*layers)
        self.conv2, self.bn2 = nn.Conv2d(cin, out_channels[3], 1, bias=False), nn.BatchNorm2d(out_channels[3])
        self.linear = nn.Linear(out_channels[3], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layers(F.relu(self.bn1(self.conv1(x))))
        out = F.relu(self.bn2(self.conv2(out)))
        return self.linear(torch.flatten(F.adaptive_avg_pool2d(out, 1), 1))


def shufflenet(num_classes: int = 10) -> ShuffleNetV2:
    return ShuffleNetV2(num_classes=num_classes)
