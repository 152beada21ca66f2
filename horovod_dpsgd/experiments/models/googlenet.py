"""GoogLeNet (Inception v1) in its CIFAR-10 form, as in pytorch-cifar."""

import torch
from torch import nn


def _conv(cin: int, cout: int, k: int) -> list:
    return [nn.Conv2d(cin, cout, k, padding=k // 2), nn.BatchNorm2d(cout), nn.ReLU(True)]


class Inception(nn.Module):
    def __init__(self, in_planes, n1x1, n3x3red, n3x3, n5x5red, n5x5, pool_planes):
        super().__init__()
        self.b1 = nn.Sequential(*_conv(in_planes, n1x1, 1))
        self.b2 = nn.Sequential(*_conv(in_planes, n3x3red, 1), *_conv(n3x3red, n3x3, 3))
        self.b3 = nn.Sequential(*_conv(in_planes, n5x5red, 1), *_conv(n5x5red, n5x5, 3), *_conv(n5x5, n5x5, 3))
        self.b4 = nn.Sequential(nn.MaxPool2d(3, stride=1, padding=1), *_conv(in_planes, pool_planes, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.b1(x), self.b2(x), self.b3(x), self.b4(x)], 1)


class GoogLeNet(nn.Module):
    def __init__(self, num_classes: int = 10):
        super().__init__()
        pool = nn.MaxPool2d(3, stride=2, padding=1)
        self.features = nn.Sequential(
            *_conv(3, 192, 3),
            Inception(192, 64, 96, 128, 16, 32, 32), Inception(256, 128, 128, 192, 32, 96, 64), pool,
            Inception(480, 192, 96, 208, 16, 48, 64), Inception(512, 160, 112, 224, 24, 64, 64),
            Inception(512, 128, 128, 256, 24, 64, 64), Inception(512, 112, 144, 288, 32, 64, 64),
            Inception(528, 256, 160, 320, 32, 128, 128), pool,
            Inception(832, 256, 160, 320, 32, 128, 128), Inception(832, 384, 192, 384, 48, 128, 128),
            nn.AdaptiveAvgPool2d(1))
        self.linear = nn.Linear(1024, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(torch.flatten(self.features(x), 1))


def googlenet(num_classes: int = 10) -> GoogLeNet:
    return GoogLeNet(num_classes)
