"""What every network of the zoo shares: one forward path, the classifier head, the weight inits.

Each family file builds its layers with the same attribute names, in the same order, as the community
CIFAR-100 definitions (RepDistiller/CRD, mdistiller), so ``state_dict()`` keys, their order and shapes
equal the released checkpoints'. The same construction order also keeps the random-number stream of the
initialisation aligned with those definitions.
"""
from __future__ import annotations

import math
from typing import Dict, List, Tuple

import torch
from torch import nn

Features = Dict[str, object]


class ZooModel(nn.Module):
    """A CIFAR classifier: ``model(x)`` gives logits, ``forward_features(x)`` also the features.

    Subclasses implement :meth:`forward_features` only; :meth:`forward` takes its logits, so the two
    cannot drift apart.
    """

    #: dotted path of the final ``nn.Linear`` (its name differs per family: ``fc``, ``linear``, ...)
    head_path: str = "fc"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x)[0]

    def forward_features(self, x: torch.Tensor) -> Tuple[torch.Tensor, Features]:
        """Return ``(logits, {"stages": [feature maps], "pooled": penultimate vector})``.

        ``stages`` lists the stem output and each stage's output, the tensors the community code
        returns as ``feats["feats"]``; ``pooled`` is the vector the classifier reads.
        """
        raise NotImplementedError

    @property
    def head(self) -> nn.Linear:
        """The final linear layer; ``head.in_features`` is the size of ``pooled``."""
        return self.get_submodule(self.head_path)

    @staticmethod
    def _features(stages: List[torch.Tensor], pooled: torch.Tensor) -> Features:
        return {"stages": stages, "pooled": pooled}


def _on_meta(model: nn.Module) -> bool:
    """Meta-device models (shape-only, used to compare layouts) have no values to initialise."""
    return next(model.parameters()).is_meta


def init_kaiming_fan_out(model: nn.Module) -> None:
    """Convs ~ He normal (fan-out, ReLU gain), BN weight 1 / bias 0; linears keep PyTorch's default.

    The init of the community ResNets (both CIFAR and the ImageNet-style ResNet18/50).
    """
    if _on_meta(model):
        return
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.constant_(m.weight, 1)
            nn.init.constant_(m.bias, 0)


@torch.no_grad()
def init_normal_fan_out(model: nn.Module, linear_std: float | None) -> None:
    """Convs ~ N(0, 2/(k*k*out)) with zero bias, BN weight 1 / bias 0, linear bias 0.

    The init of the community WRN, VGG and MobileNetV2. ``linear_std`` redraws the linear weights from
    N(0, linear_std^2) (VGG, MobileNetV2); ``None`` keeps PyTorch's default weights (WRN). The std is
    computed as ``sqrt(2/n)``, not via ``kaiming_normal_``, because the two can differ in the last bit.
    """
    if _on_meta(model):
        return
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            n = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
            m.weight.normal_(0, math.sqrt(2.0 / n))
            if m.bias is not None:
                m.bias.zero_()
        elif isinstance(m, nn.BatchNorm2d):
            m.weight.fill_(1)
            m.bias.zero_()
        elif isinstance(m, nn.Linear):
            if linear_std is not None:
                m.weight.normal_(0, linear_std)
            m.bias.zero_()


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    """ShuffleNet's channel shuffle: view channels as (groups, C/groups), transpose, flatten back.

    Channel ``g * (C/groups) + j`` moves to position ``j * groups + g``, the order both ShuffleNet
    papers (Zhang et al. 2018; Ma et al. 2018) and the community code use.
    """
    n, c, h, w = x.shape
    return x.reshape(n, groups, c // groups, h, w).transpose(1, 2).reshape(n, c, h, w)
