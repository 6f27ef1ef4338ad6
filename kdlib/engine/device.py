"""Where and how fast a run computes: device, execution (captured or eager step) and precision, cuDNN
autotuning, determinism, torch.compile, and the machine facts a CPU run's last bits depend on."""
from __future__ import annotations

import contextlib
import functools
import os
import platform
import sys
import tempfile
from dataclasses import dataclass, field
from typing import Any, Dict, List, Sequence

import torch
from torch import Tensor, nn

from kdlib.errors import KDLibError
from kdlib.precision import autocast, resolve_amp

__all__ = ["resolve_device", "resolve_amp", "resolve_graph", "Execution", "decide_execution", "autocast",
           "fast_kernels", "compile_student", "deterministic", "to_input", "machine_info", "KERNEL_ENV"]


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


#: environment variables that change which CPU kernels PyTorch, oneDNN and MKL pick (recorded when set)
KERNEL_ENV = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA", "MKL_CBWR", "MKL_ENABLE_INSTRUCTIONS",
              "MKL_DEBUG_CPU_TYPE")
#: CPU flags that decide oneDNN's and MKL's kernels on x86 (recorded: the ones this CPU has)
_KERNEL_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16", "amx_int8")


def _cpuinfo() -> dict:
    """The first processor's fields of ``/proc/cpuinfo`` (Linux); empty elsewhere."""
    fields = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if not line.strip():
                    break  # the first processor is enough: the machines have one CPU model
                key, _, value = line.partition(":")
                fields[key.strip()] = value.strip()
    except OSError:
        pass
    return fields


def _onednn_isa():
    """The instruction set oneDNN dispatches to, as oneDNN itself names it (``None`` if it cannot tell).

    oneDNN prints it in its verbose header only: one small convolution runs with verbose on while file
    descriptor 1 points at a temporary file. The header comes once per process (the caller caches).
    """
    if not torch.backends.mkldnn.is_available():
        return None
    try:
        sys.stdout.flush()
        saved = os.dup(1)
        with tempfile.TemporaryFile() as captured:
            os.dup2(captured.fileno(), 1)
            try:
                with torch.no_grad(), torch.backends.mkldnn.verbose(torch.backends.mkldnn.VERBOSE_ON):
                    # big enough that ATen hands it to oneDNN, not to its own small-convolution path
                    torch.nn.functional.conv2d(torch.ones(64, 16, 32, 32), torch.ones(16, 16, 3, 3))
            finally:
                sys.stdout.flush()
                os.dup2(saved, 1)
                os.close(saved)
            captured.seek(0)
            text = captured.read().decode(errors="replace")
    except (OSError, RuntimeError):
        return None
    for line in text.splitlines():
        if ",info,cpu,isa:" in line:
            return line.split(",info,cpu,isa:", 1)[1].strip()
    return None


def machine_info() -> dict:
    """What a CPU run's last bits depend on besides the code, threads and precision (JSON-ready).

    The same torch and instruction set (``cpu_capability``, what ATen's kernels use) is not enough: oneDNN
    and MKL choose kernels and blocking by CPU vendor and model (an Intel CPU with AMX and an AMD Zen 4
    both say ``AVX512`` and differ in the last bits of a training run). So the record names the CPU
    (vendor, family, model, model name, the x86 flags that steer the kernels), the ISA oneDNN dispatches
    to, ATen's capability, the logical CPU count, and any environment variable that overrides a choice.
    Computed once per process (``/proc/cpuinfo`` read once, one small oneDNN convolution); a fresh copy
    each call.
    """
    facts = _machine_facts()
    return {**facts, "cpu_flags": list(facts["cpu_flags"]), "kernel_env": dict(facts["kernel_env"])}


@functools.lru_cache(maxsize=None)
def _machine_facts() -> dict:
    info = _cpuinfo()
    flags = set(info.get("flags", "").split())

    def number(key):
        value = info.get(key)
        return int(value) if value and value.isdigit() else None

    return {
        "cpu": info.get("model name") or platform.processor() or platform.machine(),
        "cpu_vendor": info.get("vendor_id"),
        "cpu_family": number("cpu family"),
        "cpu_model": number("model"),
        "cpu_flags": [flag for flag in _KERNEL_FLAGS if flag in flags],
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "onednn_isa": _onednn_isa(),
        "cpus": os.cpu_count(),
        "kernel_env": {name: os.environ[name] for name in KERNEL_ENV if name in os.environ},
    }
