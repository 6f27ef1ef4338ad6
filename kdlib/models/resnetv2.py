"""ResNet18 and ResNet50 (He et al. 2016) in their CIFAR form: four stages of 64/128/256/512 planes.

The ImageNet stem (7x7 stride-2 conv + max-pool) is replaced by a 3x3 stride-1 conv -> BN -> ReLU, so the
stages see 32, 16, 8 and 4 pixels; an adaptive average pool and ``linear`` follow. ResNet50 uses
bottleneck blocks (1x1 -> 3x3 -> 1x1, expansion 4) with the stride on the 3x3 conv. The layout follows
the community CIFAR-100 definitions (RepDistiller/CRD, mdistiller ``resnetv2.py``) so released
checkpoints load unchanged; shortcuts are identity or 1x1 conv + BN, and ReLU comes after the sum.
"""
from __future__ import annotations

from typing import Sequence

import torch.nn.functional as F
from torch import nn

from kdlib.models._base import ZooModel, init_kaiming_fan_out


def _projection(in_planes: int, out_planes: int, stride: int) -> nn.Module:
    if stride == 1 and in_planes == out_planes:
        return nn.Identity()
    return nn.Sequential(
        nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False),
        nn.BatchNorm2d(out_planes),
    )


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = _projection(in_planes, planes, stride)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)), inplace=True)
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        out_planes = self.expansion * planes
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out_planes, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_planes)
        self.shortcut = _projection(in_planes, out_planes, stride)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)), inplace=True)
        out = F.relu(self.bn2(self.conv2(out)), inplace=True)
        out = self.bn3(self.conv3(out))
        return F.relu(out + self.shortcut(x))


class ResNetV2(ZooModel):
    head_path = "linear"

    def __init__(self, block, num_blocks: Sequence[int], num_classes: int = 100):
        super().__init__()
        self._in_planes = 64
        self.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.layer1 = self._make_stage(block, 64, num_blocks[0], stride=1)
        self.layer2 = self._make_stage(block, 128, num_blocks[1], stride=2)
        self.layer3 = self._make_stage(block, 256, num_blocks[2], stride=2)
        self.layer4 = self._make_stage(block, 512, num_blocks[3], stride=2)
        self.linear = nn.Linear(512 * block.expansion, num_classes)
        init_kaiming_fan_out(self)

    def _make_stage(self, block, planes: int, blocks: int, stride: int) -> nn.Sequential:
        layers = []
        for s in [stride] + [1] * (blocks - 1):
            layers.append(block(self._in_planes, planes, s))
            self._in_planes = planes * block.expansion
        return nn.Sequential(*layers)

    def forward_features(self, x):
        f0 = F.relu(self.bn1(self.conv1(x)))
        f1 = self.layer1(f0)
        f2 = self.layer2(f1)
        f3 = self.layer3(f2)
        f4 = self.layer4(f3)
        pooled = F.adaptive_avg_pool2d(f4, 1).flatten(1)
        return self.linear(pooled), self._features([f0, f1, f2, f3, f4], pooled)


def ResNet18(num_classes: int = 100) -> ResNetV2:
    return ResNetV2(BasicBlock, [2, 2, 2, 2], num_classes)


def ResNet50(num_classes: int = 100) -> ResNetV2:
    return ResNetV2(Bottleneck, [3, 4, 6, 3], num_classes)
