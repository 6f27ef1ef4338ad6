"""ShuffleNet V2 of Ma et al. (2018), "ShuffleNet V2: Practical Guidelines for Efficient CNN
Architecture Design", in the community CIFAR form ``ShuffleV2`` (net size 1x: stages 116/232/464 with
one down-sampling unit plus 3/7/3 basic units, a 1x1 conv to 1024, then ``linear``).

The layout follows the community CIFAR-100 definitions (RepDistiller/CRD, mdistiller
``ShuffleNetv2.py``) so released checkpoints load unchanged. Details that change the logits:

* the stem is a 1x1 conv (3 -> 24) -> BN -> ReLU at full resolution (no max-pool);
* basic unit: split the channels in halves ``x1 = x[:, :C/2]``, ``x2 = x[:, C/2:]``; ``x2`` goes through
  1x1 conv -> BN -> ReLU -> depthwise 3x3 -> BN -> 1x1 conv -> BN -> ReLU; the output is
  ``shuffle(cat([x1, branch(x2)]), 2)``;
* down-sampling unit: left = depthwise 3x3 s2 -> BN -> 1x1 -> BN -> ReLU on x, right = 1x1 -> BN -> ReLU ->
  depthwise 3x3 s2 -> BN -> 1x1 -> BN -> ReLU on x; output ``shuffle(cat([left, right]), 2)``;
* head: 1x1 conv -> BN -> ReLU -> 4x4 average pool (global on CIFAR) -> flatten -> ``linear``;
  PyTorch default inits.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kdlib.models._base import ZooModel, channel_shuffle

STEM_CHANNELS = 24
# net size -> (stage widths, width of the last 1x1 conv), blocks per stage
_SIZES = {1: ((116, 232, 464), 1024, (3, 7, 3))}


def _depthwise(channels: int, stride: int) -> nn.Conv2d:
    return nn.Conv2d(channels, channels, kernel_size=3, stride=stride, padding=1, groups=channels, bias=False)


def _pointwise(in_channels: int, out_channels: int) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, kernel_size=1, bias=False)


class BasicUnit(nn.Module):
    def __init__(self, channels: int, split_ratio: float = 0.5):
        super().__init__()
        self.split_ratio = split_ratio
        half = int(channels * split_ratio)
        self.conv1 = _pointwise(half, half)
        self.bn1 = nn.BatchNorm2d(half)
        self.conv2 = _depthwise(half, 1)
        self.bn2 = nn.BatchNorm2d(half)
        self.conv3 = _pointwise(half, half)
        self.bn3 = nn.BatchNorm2d(half)

    def forward(self, x):
        c = int(x.size(1) * self.split_ratio)
        x1, x2 = x[:, :c], x[:, c:]
        out = F.relu(self.bn1(self.conv1(x2)), inplace=True)
        out = self.bn2(self.conv2(out))
        out = F.relu(self.bn3(self.conv3(out)), inplace=True)
        return channel_shuffle(torch.cat([x1, out], 1), 2)


class DownUnit(nn.Module):
    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        mid = out_channels // 2
        # left branch: conv1, conv2; right branch: conv3, conv4, conv5 (the checkpoint's numbering)
        self.conv1 = _depthwise(in_channels, 2)
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv2 = _pointwise(in_channels, mid)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = _pointwise(in_channels, mid)
        self.bn3 = nn.BatchNorm2d(mid)
        self.conv4 = _depthwise(mid, 2)
        self.bn4 = nn.BatchNorm2d(mid)
        self.conv5 = _pointwise(mid, mid)
        self.bn5 = nn.BatchNorm2d(mid)

    def forward(self, x):
        left = self.bn1(self.conv1(x))
        left = F.relu(self.bn2(self.conv2(left)), inplace=True)
        right = F.relu(self.bn3(self.conv3(x)), inplace=True)
        right = self.bn4(self.conv4(right))
        right = F.relu(self.bn5(self.conv5(right)), inplace=True)
        return channel_shuffle(torch.cat([left, right], 1), 2)


class ShuffleNetV2(ZooModel):
    head_path = "linear"

    def __init__(self, net_size=1, num_classes: int = 100):
        super().__init__()
        widths, last_width, num_blocks = _SIZES[net_size]
        self.conv1 = nn.Conv2d(3, STEM_CHANNELS, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(STEM_CHANNELS)
        self.layer1 = self._make_stage(STEM_CHANNELS, widths[0], num_blocks[0])
        self.layer2 = self._make_stage(widths[0], widths[1], num_blocks[1])
        self.layer3 = self._make_stage(widths[1], widths[2], num_blocks[2])
        self.conv2 = _pointwise(widths[2], last_width)
        self.bn2 = nn.BatchNorm2d(last_width)
        self.linear = nn.Linear(last_width, num_classes)

    @staticmethod
    def _make_stage(in_channels: int, out_channels: int, blocks: int) -> nn.Sequential:
        units = [DownUnit(in_channels, out_channels)]
        units += [BasicUnit(out_channels) for _ in range(blocks)]
        return nn.Sequential(*units)

    def forward_features(self, x):
        f0 = F.relu(self.bn1(self.conv1(x)))
        f1 = self.layer1(f0)
        f2 = self.layer2(f1)
        f3 = self.layer3(f2)
        out = F.relu(self.bn2(self.conv2(f3)))
        pooled = F.avg_pool2d(out, 4).flatten(1)
        return self.linear(pooled), self._features([f0, f1, f2, f3], pooled)


def ShuffleV2(num_classes: int = 100) -> ShuffleNetV2:
    return ShuffleNetV2(net_size=1, num_classes=num_classes)
