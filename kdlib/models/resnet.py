"""CIFAR ResNets of He et al. (2016), "Deep Residual Learning for Image Recognition", section 4.2.

``resnet{8,14,20,32,44,56,110}`` have stage widths 16/16/32/64 and ``(depth - 2) / 6`` basic blocks per
stage; ``resnet8x4`` and ``resnet32x4`` are the 4x wider variants (32/64/128/256) introduced by CRD
(Tian et al. 2020). The layout follows the community CIFAR-100 definitions (RepDistiller/CRD,
mdistiller ``resnet.py``) so released checkpoints load unchanged:

* stem: 3x3 conv (stride 1) -> BN -> ReLU, no max-pool;
* basic block: conv3x3 -> BN -> ReLU -> conv3x3 -> BN, plus the shortcut, then ReLU after the sum;
* shortcut: identity, or a 1x1 conv (stride s) + BN ("option B") whenever the stride or the width
  changes -- which includes the first block of ``resnet*x4`` (32 -> 64 channels at stride 1);
* head: 8x8 average pool -> flatten -> ``fc``.
"""
from __future__ import annotations

from typing import Sequence

import torch.nn.functional as F
from torch import nn

from kdlib.models._base import ZooModel, init_kaiming_fan_out


def conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        # The community code builds the projection before the block's own convs; keeping that
        # order keeps the RNG stream of the default inits identical.
        downsample = None
        if stride != 1 or in_planes != planes:
            downsample = nn.Sequential(
                nn.Conv2d(in_planes, planes, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(planes),
            )
        self.conv1 = conv3x3(in_planes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)), inplace=True)
        out = self.bn2(self.conv2(out))
        shortcut = x if self.downsample is None else self.downsample(x)
        return F.relu(out + shortcut)


class CifarResNet(ZooModel):
    """Three stages of basic blocks on 32x32 inputs (32 -> 16 -> 8), then an 8x8 average pool."""

    head_path = "fc"

    def __init__(self, depth: int, widths: Sequence[int], num_classes: int = 100):
        super().__init__()
        if (depth - 2) % 6 != 0:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(3, widths[0], kernel_size=3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.layer1 = self._make_stage(widths[0], widths[1], n, stride=1)
        self.layer2 = self._make_stage(widths[1], widths[2], n, stride=2)
        self.layer3 = self._make_stage(widths[2], widths[3], n, stride=2)
        self.fc = nn.Linear(widths[3], num_classes)
        init_kaiming_fan_out(self)

    @staticmethod
    def _make_stage(in_planes: int, planes: int, blocks: int, stride: int) -> nn.Sequential:
        layers = [BasicBlock(in_planes, planes, stride)]
        layers += [BasicBlock(planes, planes) for _ in range(blocks - 1)]
        return nn.Sequential(*layers)

    def forward_features(self, x):
        f0 = F.relu(self.bn1(self.conv1(x)))
        f1 = self.layer1(f0)
        f2 = self.layer2(f1)
        f3 = self.layer3(f2)
        # fixed 8x8 window, as the community nn.AvgPool2d(8): global on 32x32 inputs
        pooled = F.avg_pool2d(f3, 8).flatten(1)
        return self.fc(pooled), self._features([f0, f1, f2, f3], pooled)


_NARROW = (16, 16, 32, 64)
_WIDE = (32, 64, 128, 256)


def resnet8(num_classes: int = 100) -> CifarResNet:
    return CifarResNet(8, _NARROW, num_classes)


def resnet14(num_classes: int = 100) -> CifarResNet:
    return CifarResNet(14, _NARROW, num_classes)


def resnet20(num_classes: int = 100) -> CifarResNet:
    return CifarResNet(20, _NARROW, num_classes)


def resnet32(num_classes: int = 100) -> CifarResNet:
    return CifarResNet(32, _NARROW, num_classes)


def resnet44(num_classes: int = 100) -> CifarResNet:
    return CifarResNet(44, _NARROW, num_classes)


def resnet56(num_classes: int = 100) -> CifarResNet:
    return CifarResNet(56, _NARROW, num_classes)


def resnet110(num_classes: int = 100) -> CifarResNet:
    return CifarResNet(110, _NARROW, num_classes)


def resnet8x4(num_classes: int = 100) -> CifarResNet:
    return CifarResNet(8, _WIDE, num_classes)


def resnet32x4(num_classes: int = 100) -> CifarResNet:
    return CifarResNet(32, _WIDE, num_classes)
