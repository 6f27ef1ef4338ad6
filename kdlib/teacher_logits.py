"""Where a run's teacher logits come from: one small interface, below the engine and the caches.

A *teacher-logit source* is any callable ``source(images, keys) -> float32 logits (B, C)``: ``images``
the normalised batch the student sees, ``keys`` which augmented view (crop and flip) of which training
image each row is (:class:`ViewKeys`). Two sources exist:

* :class:`LiveTeacher`: the frozen teacher network run on the batch (no grad, optional bf16 autocast).
* :class:`kdlib.logit_cache.TeacherLogitCache`: the exact cache of every crop/flip view, which runs the
  live teacher once per view it has not seen yet.

A source may also say whether it can run inside a captured CUDA graph (``capturable``, default False for
unknown sources): the live teacher can (a forward pass), the cache only once it is complete and on the
device (a miss needs the host).

Who provides the teacher *network* is not this module's business: the engine receives a *teacher
provider* ``provider(config, dataset, device, *, progress, verbose) -> (frozen model, info dict)`` from
whoever prepares the run (:func:`kdlib.teachers.get_teacher` is the library's provider), so the engine
never imports the module that trains teachers, and that module can train teachers with the engine.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Protocol, Tuple

import torch
from torch import Tensor, nn

from kdlib.precision import autocast

__all__ = ["ViewKeys", "TeacherLogits", "TeacherProvider", "LiveTeacher", "is_capturable"]


@dataclass
class ViewKeys:
    """Which augmented view (crop offsets and flip) of which training image each row of a batch is: the
    keys of a teacher-logit cache."""

    indices: Tensor  # int64 (B,) dataset indices
    offsets: Tensor  # int64 (B, 2) crop (top, left)
    flips: Tensor  # bool (B,)


class TeacherLogits(Protocol):
    def __call__(self, images: Tensor, keys: Optional[ViewKeys]) -> Tensor: ...


#: ``provider(config, dataset, device, *, progress, verbose) -> (frozen teacher, info)``
TeacherProvider = Callable[..., Tuple[nn.Module, Dict[str, Any]]]


class LiveTeacher:
    """``teacher_logits(images, keys)``: the frozen teacher run on the normalised batch, float32 logits."""

    capturable = True  # a forward pass without host reads: fine inside a CUDA graph

    def __init__(self, model: nn.Module, device: torch.device, amp: str = "none"):
        self.model, self.device, self.amp = model, device, amp

    def __call__(self, images: Tensor, keys: Optional[ViewKeys] = None) -> Tensor:
        with torch.no_grad(), autocast(self.device, self.amp):
            return self.model(images).float()


def is_capturable(source: Any) -> bool:
    """Whether ``source`` may be called inside a captured CUDA graph (it says so; unknown sources may not)."""
    return bool(getattr(source, "capturable", False))
