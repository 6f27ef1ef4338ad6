"""The community CIFAR-100 model zoo: ``names()``, ``create(name)``, ``load_pretrained(name, path)``.

The 23 networks of the CRD/RepDistiller and mdistiller benchmarks, under the names those projects use.
Their state-dict keys, order and shapes equal the released checkpoints', so
``cifar_teachers/<name>_vanilla/ckpt_epoch_240.pth`` loads with ``strict=True``, and for the same
weights each network computes the same logits as the community code. One file per family:

=====================  ==============================================================================
``resnet.py``          resnet8/14/20/32/44/56/110, resnet8x4, resnet32x4 (He et al. 2016)
``resnetv2.py``        ResNet18, ResNet50 (He et al. 2016, CIFAR stem)
``wrn.py``             wrn_16_1, wrn_16_2, wrn_40_1, wrn_40_2 (Zagoruyko & Komodakis 2016)
``vgg.py``             vgg8/11/13/16/19 with BN (Simonyan & Zisserman 2015)
``mobilenetv2.py``     MobileNetV2 = ``mobile_half``, T=6, width 0.5 (Sandler et al. 2018)
``shufflenetv1.py``    ShuffleV1, groups 3 (Zhang et al. 2018)
``shufflenetv2.py``    ShuffleV2, 1x (Ma et al. 2018)
=====================  ==============================================================================

Every model returns logits from ``model(x)``; ``model.forward_features(x)`` returns
``(logits, {"stages": [...], "pooled": f})`` and ``model.head`` is the final linear layer.
"""
from __future__ import annotations

import functools
import numbers
from typing import Callable, Dict, List, Tuple

import torch

from kdlib.errors import KDLibError, unknown_name
from kdlib.models import mobilenetv2, resnet, resnetv2, shufflenetv1, shufflenetv2, vgg, wrn
from kdlib.models._base import ZooModel
from kdlib.models._checkpoint import (
    extract_state_dict,
    fill_batch_counters,
    mismatch_report,
    read_checkpoint,
)

# same names and order as the community model dictionaries and the reference key listing
_FACTORIES: Dict[str, Callable[[int], ZooModel]] = {
    "resnet8": resnet.resnet8,
    "resnet14": resnet.resnet14,
    "resnet20": resnet.resnet20,
    "resnet32": resnet.resnet32,
    "resnet44": resnet.resnet44,
    "resnet56": resnet.resnet56,
    "resnet110": resnet.resnet110,
    "resnet8x4": resnet.resnet8x4,
    "resnet32x4": resnet.resnet32x4,
    "wrn_16_1": wrn.wrn_16_1,
    "wrn_16_2": wrn.wrn_16_2,
    "wrn_40_1": wrn.wrn_40_1,
    "wrn_40_2": wrn.wrn_40_2,
    "vgg8": vgg.vgg8,
    "vgg11": vgg.vgg11,
    "vgg13": vgg.vgg13,
    "vgg16": vgg.vgg16,
    "vgg19": vgg.vgg19,
    "MobileNetV2": mobilenetv2.mobile_half,
    "ShuffleV1": shufflenetv1.ShuffleV1,
    "ShuffleV2": shufflenetv2.ShuffleV2,
    "ResNet50": resnetv2.ResNet50,
    "ResNet18": resnetv2.ResNet18,
}


def names() -> List[str]:
    """The model names, spelt as in the community code and checkpoint folders."""
    return list(_FACTORIES)


def create(name: str, num_classes: int = 100) -> ZooModel:
    """A freshly initialised network (the community initialisation), in training mode."""
    if name not in _FACTORIES:
        raise unknown_name("model", name, _FACTORIES)
    # numbers.Integral also admits numpy integers, e.g. a class count read from a label array
    if isinstance(num_classes, bool) or not isinstance(num_classes, numbers.Integral) or num_classes < 1:
        raise KDLibError(f"num_classes must be a positive integer, got {num_classes!r}")
    return _FACTORIES[name](int(num_classes))


@functools.lru_cache(maxsize=None)
def _layout(name: str, num_classes: int) -> Tuple[Dict[str, torch.Size], str]:
    """``(key -> shape, head path)`` of a zoo network, built on the meta device (no memory, no init)."""
    with torch.device("meta"):
        model = create(name, num_classes)
    return {k: v.shape for k, v in model.state_dict().items()}, model.head_path


def _architectures_fitting(state: Dict[str, torch.Tensor]) -> List[str]:
    """Zoo names (with their class count) whose layout fits ``state``: the hint of a mismatch error."""
    fitting = []
    for name in _FACTORIES:
        layout, head_path = _layout(name, 100)
        head = state.get(f"{head_path}.weight")
        num_classes = int(head.shape[0]) if head is not None and head.ndim == 2 else 100
        if num_classes != 100:
            layout, _ = _layout(name, num_classes)
        if mismatch_report(layout, state) is None:
            fitting.append(f"{name!r} with num_classes={num_classes}")
    return fitting


def load_pretrained(
    name: str,
    path,
    num_classes: int = 100,
    map_location="cpu",
    *,
    allow_pickle: bool = False,
) -> ZooModel:
    """Build ``name`` and load the checkpoint at ``path`` with ``strict=True``; returns it in eval mode.

    ``path`` may hold ``{"model": state_dict, ...}`` (the released teachers; other entries are ignored),
    a bare state dict, or keys prefixed by ``module.`` / ``module.student.`` / ``student.``.
    ``map_location`` is passed to ``torch.load``; a device given as a string or ``torch.device`` also
    receives the model. ``allow_pickle=True`` permits full unpickling for trusted files that hold
    python objects other than weights and plain data (see :mod:`kdlib.models._checkpoint`).
    Raises :class:`KDLibError` for an unreadable file, a file without a state dict, or a state dict of
    another architecture (naming the missing, unexpected and mis-shaped keys).
    """
    model = create(name, num_classes)
    state = extract_state_dict(read_checkpoint(path, map_location, allow_pickle), path)
    expected = model.state_dict()
    report = mismatch_report({k: v.shape for k, v in expected.items()}, state)
    if report is not None:
        fitting = _architectures_fitting(state)
        hint = f" The file fits {', '.join(fitting)}." if fitting else ""
        raise KDLibError(
            f"checkpoint {path} does not fit {name!r} (num_classes={num_classes}): {report}.{hint}"
        )
    state = fill_batch_counters(expected, state)
    if isinstance(map_location, (str, torch.device)):
        model = model.to(map_location)
    model.load_state_dict(state, strict=True)
    return model.eval()


__all__ = ["ZooModel", "create", "load_pretrained", "names"]
