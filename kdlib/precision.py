"""Numeric precision of a run: which autocast mode ``amp="auto"`` means, and the autocast context.

Below both the engine and the teacher-logit sources (:mod:`kdlib.teacher_logits`, :mod:`kdlib.logit_cache`),
so that they share one definition without importing each other.
"""
from __future__ import annotations

import contextlib
from typing import Optional

import torch

__all__ = ["resolve_amp", "autocast"]


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX-512-BF16 or AMX, as oneDNN reports it)."""
    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def resolve_amp(amp: str, device, graph: bool = False, started: Optional[str] = None) -> str:
    """``amp`` with ``auto`` resolved, once the execution is decided: ``bf16`` for a CUDA-graphed step and
    on a CPU with native bf16, ``none`` otherwise (an eager CUDA step among them). ``started``: the
    precision a resumed run started with on this kind of device; ``auto`` keeps it, so a resume that
    changes the execution (a graph refused now, or asked off) does not change the numerics mid-run. An
    explicit ``bf16`` or ``none`` is always taken as asked.

    Why, on CUDA (measured on one H200, batch 64, resnet8x4; not re-measured for this choice): the eager
    step is launch-bound and bf16 autocast *adds* launches (the casts), so eager bf16 was slower than eager
    fp32 (4.27-4.76 ms vs 3.74 ms per step); once the whole step is one CUDA graph the launches cost nothing
    and bf16 was faster (1.11 ms vs 1.42 ms).

    Why, on a CPU with native bf16 (measured 2026-11-26 on the 2-core AVX-512-BF16/AMX machine that
    builds the book, smoke profile, resnet8, one thread, two runs side by side): an epoch took 3.5-3.9 s
    in bf16 against 5.5-5.8 s in fp32, the last-epoch accuracy was 57.65 % against 57.95 % (seed 0), and
    two bf16 runs gave bit-identical records. Without native bf16 the casts cost more than they save:
    ``none``. Losses are computed in float32 either way; a run records the precision it used.
    """
    if amp != "auto":
        return amp
    if started in ("bf16", "none"):
        return started
    kind = torch.device(device).type
    if kind == "cuda":
        return "bf16" if graph else "none"
    return "bf16" if kind == "cpu" and cpu_has_native_bf16() else "none"


def autocast(device, amp: str, cache_enabled: bool = True):
    """bf16 autocast when ``amp == "bf16"``, else a no-op context.

    ``cache_enabled=False`` inside a captured CUDA graph: the autocast cache of cast weights would be
    freed when the context exits, under the graph (PyTorch's CUDA-graph notes ask for it off).
    """
    if amp == "bf16":
        return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16,
                              cache_enabled=cache_enabled)
    return contextlib.nullcontext()
