"""Numeric precision of a run: which autocast mode ``amp="auto"`` means, and the autocast context.

Below both the engine and the teacher-logit sources (:mod:`kdlib.teacher_logits`, :mod:`kdlib.logit_cache`),
so that they share one definition without importing each other.
"""
from __future__ import annotations

import contextlib

import torch

__all__ = ["resolve_amp", "autocast"]


def resolve_amp(amp: str, device, graph: bool = False) -> str:
    """``amp`` with ``auto`` resolved: ``bf16`` for a CUDA-graphed step, ``none`` otherwise.

    Why (measured on one H200 by a colleague, ``shared/gpu-notes.md`` section 2; not re-measured for this
    choice): at batch 64 the eager step is launch-bound and bf16 autocast *adds* launches (the casts), so
    eager bf16 was slower than eager fp32 (resnet8x4: 4.27-4.76 ms vs 3.74 ms per step); once the whole
    step is one CUDA graph the launches cost nothing and bf16 was faster (1.11 ms vs 1.42 ms). CPUs and
    other devices: ``none`` (bf16 on a CPU is slower and not bit-reproducible).
    """
    if amp == "auto":
        return "bf16" if torch.device(device).type == "cuda" and graph else "none"
    return amp


def autocast(device, amp: str, cache_enabled: bool = True):
    """bf16 autocast when ``amp == "bf16"``, else a no-op context.

    ``cache_enabled=False`` inside a captured CUDA graph: the autocast cache of cast weights would be
    freed when the context exits, under the graph (PyTorch's CUDA-graph notes ask for it off).
    """
    if amp == "bf16":
        return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16,
                              cache_enabled=cache_enabled)
    return contextlib.nullcontext()
