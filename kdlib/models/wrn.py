"""Wide residual networks WRN-d-k of Zagoruyko & Komodakis (2016), "Wide Residual Networks".

Pre-activation basic blocks (BN -> ReLU -> conv3x3 -> BN -> ReLU -> conv3x3), ``(d - 4) / 6`` blocks per
stage, widths 16k/32k/64k, dropout 0. The layout follows the community CIFAR-100 definitions
(RepDistiller/CRD, mdistiller ``wrn.py``) so released checkpoints load unchanged. Details that change the
logits:

* no convolution has a bias; BN layers carry the affine terms;
* when a block changes width, its 1x1 ``convShortcut`` reads the *activated* input relu(bn1(x)), and
  the residual sum uses that projection; otherwise the raw input x is added;
* there is no ReLU after the sum (pre-activation): the network ends with BN -> ReLU -> 8x8 average
  pool -> ``fc``.
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from kdlib.models._base import ZooModel, init_normal_fan_out


class WideBasic(nn.Module):
    def __init__(self, in_planes: int, out_planes: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.conv2 = nn.Conv2d(out_planes, out_planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.convShortcut = None
        if in_planes != out_planes:
            self.convShortcut = nn.Conv2d(
                in_planes, out_planes, kernel_size=1, stride=stride, padding=0, bias=False
            )

    def forward(self, x):
        act = F.relu(self.bn1(x))
        out = F.relu(self.bn2(self.conv1(act)), inplace=True)
        out = self.conv2(out)
        shortcut = x if self.convShortcut is None else self.convShortcut(act)
        return shortcut + out


class WideStage(nn.Module):
    """A stage; its blocks live in ``.layer`` because the checkpoints say ``block1.layer.0...``."""

    def __init__(self, blocks: int, in_planes: int, out_planes: int, stride: int):
        super().__init__()
        self.layer = nn.Sequential(
            *[
                WideBasic(in_planes if i == 0 else out_planes, out_planes, stride if i == 0 else 1)
                for i in range(blocks)
            ]
        )

    def forward(self, x):
        return self.layer(x)


class WideResNet(ZooModel):
    head_path = "fc"

    def __init__(self, depth: int, widen_factor: int, num_classes: int = 100):
        super().__init__()
        if (depth - 4) % 6 != 0:
            raise ValueError(f"WRN depth must be 6n+4, got {depth}")
        n = (depth - 4) // 6
        widths = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.conv1 = nn.Conv2d(3, widths[0], kernel_size=3, stride=1, padding=1, bias=False)
        self.block1 = WideStage(n, widths[0], widths[1], 1)
        self.block2 = WideStage(n, widths[1], widths[2], 2)
        self.block3 = WideStage(n, widths[2], widths[3], 2)
        self.bn1 = nn.BatchNorm2d(widths[3])
        self.fc = nn.Linear(widths[3], num_classes)
        init_normal_fan_out(self, linear_std=None)

    def forward_features(self, x):
        f0 = self.conv1(x)
        f1 = self.block1(f0)
        f2 = self.block2(f1)
        f3 = self.block3(f2)
        out = F.relu(self.bn1(f3))
        pooled = F.avg_pool2d(out, 8).flatten(1)
        return self.fc(pooled), self._features([f0, f1, f2, f3], pooled)


def wrn_16_1(num_classes: int = 100) -> WideResNet:
    return WideResNet(16, 1, num_classes)


def wrn_16_2(num_classes: int = 100) -> WideResNet:
    return WideResNet(16, 2, num_classes)


def wrn_40_1(num_classes: int = 100) -> WideResNet:
    return WideResNet(40, 1, num_classes)


def wrn_40_2(num_classes: int = 100) -> WideResNet:
    return WideResNet(40, 2, num_classes)
