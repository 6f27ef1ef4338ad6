"""The machine facts every run records (``segments[].machine`` of ``metrics.json``): CPU and kernel ISA."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from kdlib.engine import device
from kdlib.engine.device import machine_info

REPO = Path(__file__).resolve().parent.parent


def _first_processor() -> dict:
    """/proc/cpuinfo's first block, read here independently of kdlib."""
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    block = text.split("\n\n", 1)[0]
    return {k.strip(): v.strip() for k, _, v in (line.partition(":") for line in block.splitlines())}


def test_machine_info_names_the_cpu_and_the_isas():
    info = machine_info()
    assert json.loads(json.dumps(info)) == info  # JSON-ready as recorded
    cpu = _first_processor()
    if cpu:  # Linux
        assert info["cpu"] == cpu["model name"] and info["cpu_vendor"] == cpu["vendor_id"]
        assert (info["cpu_family"], info["cpu_model"]) == (int(cpu["cpu family"]), int(cpu["model"]))
        flags = set(cpu["flags"].split())
        assert set(info["cpu_flags"]) <= flags and ("avx2" in info["cpu_flags"]) == ("avx2" in flags)
        assert ("amx_bf16" in info["cpu_flags"]) == ("amx_bf16" in flags)
    assert info["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert info["cpus"] == os.cpu_count()
    if torch.backends.mkldnn.is_available() and "avx512f" in info["cpu_flags"] and not info["kernel_env"]:
        assert "AVX-512" in info["onednn_isa"]


def test_machine_info_is_computed_once_and_handed_out_as_a_copy(monkeypatch):
    first = machine_info()
    reads = []
    monkeypatch.setattr(device, "_cpuinfo", lambda: reads.append(1) or {})
    first["cpu_flags"].append("changed by the caller")
    first["kernel_env"]["CHANGED"] = "by the caller"
    again = machine_info()
    assert reads == []  # /proc/cpuinfo is not read again (nor oneDNN asked: it names its ISA once a process)
    assert "changed by the caller" not in again["cpu_flags"] and "CHANGED" not in again["kernel_env"]


def test_forced_kernels_show_in_the_record():
    """Two runs that differ in the last bits because kernels were forced can be told apart by their record."""
    code = "import json; from kdlib.engine.device import machine_info; print(json.dumps(machine_info()))"
    env = {**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "default", "PYTHONPATH": str(REPO)}
    forced = json.loads(subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                                       check=True, timeout=120).stdout)
    assert forced["kernel_env"] == {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "default"}
    assert forced["cpu_capability"] == "DEFAULT"
    if torch.backends.mkldnn.is_available() and "avx2" in forced["cpu_flags"]:
        assert forced["onednn_isa"] == "Intel AVX2"
    assert forced["cpu"] == machine_info()["cpu"]
