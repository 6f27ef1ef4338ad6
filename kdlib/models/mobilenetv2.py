"""MobileNetV2 of Sandler et al. (2018), "MobileNetV2: Inverted Residuals and Linear Bottlenecks".

The zoo's ``MobileNetV2`` is the community CIFAR variant ``mobile_half``: expansion T = 6, width
multiplier W = 0.5. The layout follows the community CIFAR-100 definitions (RepDistiller/CRD, mdistiller
``mobilenetv2.py``) so released checkpoints load unchanged. Details that change the logits or shapes:

* channel counts are ``int(c * W)`` (truncation): stem 16, stages 8/12/16/32/48/80/160;
* the stem is a 3x3 conv with stride 2 (CIFAR images go 32 -> 16 at once), and the stage strides are
  1, 1, 2, 2, 1, 2, 1, so the last maps are 2x2;
* every inverted residual has the 1x1 expansion conv, even the first stage whose t = 1;
* the last 1x1 conv keeps 1280 channels (it is only scaled for W > 1), followed by BN -> ReLU, an average
  pool of size ``32 // 16 = 2`` with ``ceil_mode=True``, flatten, and ``classifier.0`` (a linear layer in
  a ``Sequential`` where a dropout once was).
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from kdlib.models._base import ZooModel, init_normal_fan_out


class InvertedResidual(nn.Module):
    def __init__(self, inp: int, oup: int, stride: int, expand_ratio: int):
        super().__init__()
        hidden = inp * expand_ratio
        self.use_residual = stride == 1 and inp == oup
        self.conv = nn.Sequential(
            nn.Conv2d(inp, hidden, 1, 1, 0, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            # linear bottleneck: no activation after the projection
            nn.Conv2d(hidden, oup, 1, 1, 0, bias=False),
            nn.BatchNorm2d(oup),
        )

    def forward(self, x):
        if self.use_residual:
            return x + self.conv(x)
        return self.conv(x)


def _conv_bn_relu(inp: int, oup: int, kernel: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(inp, oup, kernel, stride, kernel // 2, bias=False),
        nn.BatchNorm2d(oup),
        nn.ReLU(inplace=True),
    )


class MobileNetV2(ZooModel):
    head_path = "classifier.0"

    def __init__(self, expansion: int = 6, width_mult: float = 0.5, num_classes: int = 100,
                 input_size: int = 32):
        super().__init__()
        settings = [  # (expansion t, channels c, blocks n, first stride s)
            (1, 16, 1, 1),
            (expansion, 24, 2, 1),
            (expansion, 32, 3, 2),
            (expansion, 64, 4, 2),
            (expansion, 96, 3, 1),
            (expansion, 160, 3, 2),
            (expansion, 320, 1, 1),
        ]
        channels = int(32 * width_mult)
        self.conv1 = _conv_bn_relu(3, channels, 3, 2)
        self.blocks = nn.ModuleList()
        for t, c, n, s in settings:
            out_channels = int(c * width_mult)
            stage = []
            for stride in [s] + [1] * (n - 1):
                stage.append(InvertedResidual(channels, out_channels, stride, t))
                channels = out_channels
            self.blocks.append(nn.Sequential(*stage))
        last_channels = int(1280 * width_mult) if width_mult > 1.0 else 1280
        self.conv2 = _conv_bn_relu(channels, last_channels, 1, 1)
        self.classifier = nn.Sequential(nn.Linear(last_channels, num_classes))
        # a fixed window sized for 32x32 inputs, as in the community code (not a global pool)
        self.pool_size = input_size // 16
        init_normal_fan_out(self, linear_std=0.01)

    def forward_features(self, x):
        f0 = self.conv1(x)
        f1 = self.blocks[1](self.blocks[0](f0))
        f2 = self.blocks[2](f1)
        f3 = self.blocks[4](self.blocks[3](f2))
        f4 = self.blocks[6](self.blocks[5](f3))
        out = self.conv2(f4)
        pooled = F.avg_pool2d(out, self.pool_size, ceil_mode=True).flatten(1)
        return self.classifier(pooled), self._features([f0, f1, f2, f3, f4], pooled)


def mobile_half(num_classes: int = 100) -> MobileNetV2:
    return MobileNetV2(expansion=6, width_mult=0.5, num_classes=num_classes)
