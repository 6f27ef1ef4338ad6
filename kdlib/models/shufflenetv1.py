"""ShuffleNet (v1) of Zhang et al. (2018), "ShuffleNet: An Extremely Efficient Convolutional Neural
Network for Mobile Devices", in the community CIFAR form ``ShuffleV1``: g = 3 groups, stage outputs
240/480/960 with 4/8/4 units.

The layout follows the community CIFAR-100 definitions (RepDistiller/CRD, mdistiller
``ShuffleNetv1.py``) so released checkpoints load unchanged. Details that change the logits:

* the stem is a 1x1 conv (3 -> 24) -> BN -> ReLU at full resolution (no 3x3 conv, no max-pool);
* a unit is group 1x1 conv -> BN -> ReLU -> channel shuffle -> depthwise 3x3 -> BN -> *ReLU* ->
  group 1x1 conv -> BN, then ReLU after the merge with the shortcut;
* the first 1x1 conv of a unit reading the 24 stem channels is not grouped (and so not shuffled);
* the first unit of each stage has stride 2, a 3x3 average-pool shortcut (padding 1, padding counted)
  and merges by concatenation ``[residual branch, shortcut]``, so its branch outputs
  ``stage width - input width`` channels; the other units add;
* the head is a 4x4 average pool (global on CIFAR) -> flatten -> ``linear``; PyTorch default inits.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kdlib.models._base import ZooModel, channel_shuffle

STEM_CHANNELS = 24


class ShuffleUnit(nn.Module):
    def __init__(self, in_planes: int, out_planes: int, stride: int, groups: int):
        super().__init__()
        self.stride = stride
        mid_planes = int(out_planes / 4)
        # Grouping the stem's 24 channels would give only 8 inputs per group: that conv stays dense.
        self.first_groups = 1 if in_planes == STEM_CHANNELS else groups
        self.conv1 = nn.Conv2d(in_planes, mid_planes, kernel_size=1, groups=self.first_groups, bias=False)
        self.bn1 = nn.BatchNorm2d(mid_planes)
        self.conv2 = nn.Conv2d(
            mid_planes, mid_planes, kernel_size=3, stride=stride, padding=1, groups=mid_planes, bias=False
        )
        self.bn2 = nn.BatchNorm2d(mid_planes)
        self.conv3 = nn.Conv2d(mid_planes, out_planes, kernel_size=1, groups=groups, bias=False)
        self.bn3 = nn.BatchNorm2d(out_planes)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)), inplace=True)
        out = channel_shuffle(out, self.first_groups)
        out = F.relu(self.bn2(self.conv2(out)), inplace=True)
        out = self.bn3(self.conv3(out))
        if self.stride == 2:
            shortcut = F.avg_pool2d(x, 3, stride=2, padding=1)
            return F.relu(torch.cat([out, shortcut], 1))
        return F.relu(out + x)


class ShuffleNetV1(ZooModel):
    head_path = "linear"

    def __init__(self, out_planes=(240, 480, 960), num_blocks=(4, 8, 4), groups: int = 3,
                 num_classes: int = 100):
        super().__init__()
        self.conv1 = nn.Conv2d(3, STEM_CHANNELS, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(STEM_CHANNELS)
        self._in_planes = STEM_CHANNELS
        self.layer1 = self._make_stage(out_planes[0], num_blocks[0], groups)
        self.layer2 = self._make_stage(out_planes[1], num_blocks[1], groups)
        self.layer3 = self._make_stage(out_planes[2], num_blocks[2], groups)
        self.linear = nn.Linear(out_planes[2], num_classes)

    def _make_stage(self, out_planes: int, blocks: int, groups: int) -> nn.Sequential:
        # the first unit concatenates its input, so its branch only makes the missing channels
        units = [ShuffleUnit(self._in_planes, out_planes - self._in_planes, 2, groups)]
        units += [ShuffleUnit(out_planes, out_planes, 1, groups) for _ in range(blocks - 1)]
        self._in_planes = out_planes
        return nn.Sequential(*units)

    def forward_features(self, x):
        f0 = F.relu(self.bn1(self.conv1(x)))
        f1 = self.layer1(f0)
        f2 = self.layer2(f1)
        f3 = self.layer3(f2)
        pooled = F.avg_pool2d(f3, 4).flatten(1)
        return self.linear(pooled), self._features([f0, f1, f2, f3], pooled)


def ShuffleV1(num_classes: int = 100) -> ShuffleNetV1:
    return ShuffleNetV1(num_classes=num_classes)
