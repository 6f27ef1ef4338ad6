"""Where and how fast a run computes: device, execution (captured or eager step) and precision, cuDNN
autotuning, determinism, torch.compile."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Dict, List, Sequence

import torch
from torch import Tensor, nn

from kdlib.errors import KDLibError
from kdlib.precision import autocast, resolve_amp

__all__ = ["resolve_device", "resolve_amp", "resolve_graph", "Execution", "decide_execution", "autocast",
           "fast_kernels", "compile_student", "deterministic", "to_input"]


def resolve_device(name: str) -> torch.device:
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise KDLibError(f"device {name!r} asked for, but CUDA is not available here; use --device cpu")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise KDLibError(f"device {name!r} asked for, but MPS is not available here; use --device cpu")
    return device


def resolve_graph(graph, device: torch.device) -> bool:
    """``graph`` (``"auto"``/True/False) for ``device``: auto = on for CUDA, off elsewhere.

    Asking for a graph where there is no CUDA is a :class:`KDLibError` (CUDA graphs exist only there).
    """
    device = torch.device(device)
    if graph in ("auto", None):
        return device.type == "cuda"
    if graph is True or graph == "true":
        if device.type != "cuda":
            raise KDLibError(f"graph=true needs a CUDA device (CUDA graphs), this run is on {device.type}; "
                             f"use graph=auto or graph=false")
        return True
    if graph is False or graph == "false":
        return False
    raise KDLibError(f"graph must be 'auto', true or false, got {graph!r}")


@dataclass
class Execution:
    """How a run's steps execute: ``graph`` (captured as a CUDA graph and replayed; a capture that fails
    at run time falls back to eager steps and is recorded), ``amp`` (the student's autocast precision,
    chosen after the graph decision) and ``notes`` (why the graph is off, or why the precision was kept)."""

    graph: bool
    amp: str
    notes: List[str] = field(default_factory=list)


def decide_execution(graph: Any, amp: str, device: torch.device, *, method: str = "", graph_safe: bool = True,
                     compile: bool = False, previous_segments: Sequence[Dict[str, Any]] = ()) -> Execution:
    """The execution of a run (or of a resumed segment), decided before anything is built.

    First the graph: ``graph`` resolved for the device (:func:`resolve_graph`), then refused for a method
    that declares ``graph_safe = False`` or for ``compile=true``. Then the precision, for that execution
    (:func:`kdlib.precision.resolve_amp`): ``auto`` means bf16 for a graphed CUDA step and fp32 for an
    eager one; on a resume, ``auto`` keeps the precision the run started with on this kind of device.
    """
    device = torch.device(device)
    captured = resolve_graph(graph, device)
    notes = []
    if captured and not graph_safe:
        notes.append(f"method {method!r} declares graph_safe = False")
    if captured and compile:
        notes.append("compile=true (torch.compile's own CUDA graphs do not nest in a captured step)")
    if notes:
        captured, notes = False, [f"graph mode off, eager steps: {'; '.join(notes)}"]
    started = next((seg.get("amp") for seg in previous_segments
                    if torch.device(seg.get("device", "cpu")).type == device.type), None)
    chosen = resolve_amp(amp, device, captured, started)
    if amp == "auto" and started is not None and chosen != resolve_amp(amp, device, captured):
        notes.append(f"amp {chosen}: the precision this run started with (amp=auto keeps it on a resume)")
    return Execution(captured, chosen, notes)


def compile_student(student: nn.Module, device: torch.device, compile: bool) -> nn.Module:
    """``torch.compile(student)`` on CUDA when asked; the student itself otherwise (slower compiled on CPU)."""
    if compile and torch.device(device).type == "cuda":
        return torch.compile(student)
    return student


@contextlib.contextmanager
def fast_kernels(device):
    """cuDNN autotuning (``cudnn.benchmark``) on CUDA for the duration; nothing on other devices."""
    if torch.device(device).type != "cuda":
        yield
        return
    previous = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = True
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = previous


@contextlib.contextmanager
def deterministic(device: torch.device):
    """Deterministic algorithms (warn-only) on CPU, where a run is bit-reproducible; nothing elsewhere."""
    if device.type != "cpu":
        yield
        return
    enabled = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(enabled, warn_only=warn_only)


def to_input(x: Tensor, channels_last: bool) -> Tensor:
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x
