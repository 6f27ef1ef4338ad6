"""VGG networks of Simonyan & Zisserman (2015) with batch norm, cut down for 32x32 CIFAR inputs.

The five convolutional groups of VGG-11/13/16/19 (and CRD's VGG-8: one conv per group) are kept; the
three fully connected layers are replaced by one ``classifier`` linear layer (512 -> classes). The layout
follows the community CIFAR-100 definitions (RepDistiller/CRD, mdistiller ``vgg.py``, the ``*_bn``
constructors) so released checkpoints load unchanged. Details that change the logits:

* each group ``blockK`` is conv3x3 (with bias) -> BN -> ReLU -> ... -> conv3x3 -> BN: the group's last
  ReLU is applied outside the block (so the pre-activation is available for feature methods);
* 2x2 max-pools follow groups 0, 1 and 2 only. The pool after group 3 runs only for 64-pixel inputs
  (a branch kept from the community code), so on CIFAR group 4 works on 4x4 maps;
* the head is a global *average* pool -> flatten -> ``classifier``.
"""
from __future__ import annotations

from typing import List, Sequence

import torch.nn.functional as F
from torch import nn

from kdlib.models._base import ZooModel, init_normal_fan_out

_CONFIGS = {
    "vgg8": [[64], [128], [256], [512], [512]],
    "vgg11": [[64], [128], [256, 256], [512, 512], [512, 512]],
    "vgg13": [[64, 64], [128, 128], [256, 256], [512, 512], [512, 512]],
    "vgg16": [[64, 64], [128, 128], [256, 256, 256], [512, 512, 512], [512, 512, 512]],
    "vgg19": [
        [64, 64],
        [128, 128],
        [256, 256, 256, 256],
        [512, 512, 512, 512],
        [512, 512, 512, 512],
    ],
}


def _make_group(widths: Sequence[int], in_channels: int) -> nn.Sequential:
    layers: List[nn.Module] = []
    for width in widths:
        layers += [
            nn.Conv2d(in_channels, width, kernel_size=3, padding=1),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
        ]
        in_channels = width
    # the trailing ReLU is dropped here and applied in forward_features (see module docstring)
    return nn.Sequential(*layers[:-1])


class VGG(ZooModel):
    head_path = "classifier"

    def __init__(self, config: Sequence[Sequence[int]], num_classes: int = 100):
        super().__init__()
        in_channels = [3] + [group[-1] for group in config[:-1]]
        self.block0 = _make_group(config[0], in_channels[0])
        self.block1 = _make_group(config[1], in_channels[1])
        self.block2 = _make_group(config[2], in_channels[2])
        self.block3 = _make_group(config[3], in_channels[3])
        self.block4 = _make_group(config[4], in_channels[4])
        self.classifier = nn.Linear(512, num_classes)
        init_normal_fan_out(self, linear_std=0.01)

    def forward_features(self, x):
        height = x.shape[2]
        f0 = F.relu(self.block0(x))
        f1 = F.relu(self.block1(F.max_pool2d(f0, 2, 2)))
        f2 = F.relu(self.block2(F.max_pool2d(f1, 2, 2)))
        f3 = F.relu(self.block3(F.max_pool2d(f2, 2, 2)))
        out = F.max_pool2d(f3, 2, 2) if height == 64 else f3
        f4 = F.relu(self.block4(out))
        pooled = F.adaptive_avg_pool2d(f4, 1).flatten(1)
        return self.classifier(pooled), self._features([f0, f1, f2, f3, f4], pooled)


def vgg8(num_classes: int = 100) -> VGG:
    return VGG(_CONFIGS["vgg8"], num_classes)


def vgg11(num_classes: int = 100) -> VGG:
    return VGG(_CONFIGS["vgg11"], num_classes)


def vgg13(num_classes: int = 100) -> VGG:
    return VGG(_CONFIGS["vgg13"], num_classes)


def vgg16(num_classes: int = 100) -> VGG:
    return VGG(_CONFIGS["vgg16"], num_classes)


def vgg19(num_classes: int = 100) -> VGG:
    return VGG(_CONFIGS["vgg19"], num_classes)
