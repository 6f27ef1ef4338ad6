"""CPU runs are bit-identical to the golden records (tests/golden_engine.py regenerates them).

Recorded before the engine became a package; the split and the captured step must not move a bit of a
CPU run. Bit-identity holds for one torch version and one CPU kernel family (MKL/oneDNN pick kernels by
the CPU's instruction set), so the test skips, saying why, on another torch or CPU capability.
"""
from __future__ import annotations

import json

import pytest

from golden_engine import GOLDEN_DIR, METHODS, recorded_with, run_golden


@pytest.fixture(scope="module")
def golden_root(tmp_path_factory):
    return tmp_path_factory.mktemp("golden")  # one teacher, trained once, shared by the module's runs


@pytest.mark.parametrize("method", METHODS)
def test_cpu_run_is_bit_identical_to_the_golden_record(method, golden_root):
    golden = json.loads((GOLDEN_DIR / f"{method}.json").read_text())
    if golden["recorded_with"] != recorded_with():
        pytest.skip(f"golden record made with {golden['recorded_with']}, this machine is {recorded_with()}")
    fresh = run_golden(method, golden_root)
    assert fresh["history"] == golden["history"]  # floats from JSON: equal means equal to the last bit
    assert fresh["final_per_class_acc"] == golden["final_per_class_acc"]
    assert fresh["teacher_test_acc"] == golden["teacher_test_acc"]
    assert fresh["student_sha256"] == golden["student_sha256"]
