"""CPU runs against the golden records (``tests/golden_engine.py`` records and regenerates them).

Every run is compared with every recorded machine kind: bit for bit with the set recorded on a machine of
this kind (the test id ends in ``-exact``), within the measured machine-to-machine tolerance with the others
(``-tolerance`` when no set is exact here). Nothing skips: on a machine of a new kind the comparison is
the tolerance one, and the line ``golden records:`` at the end of the pytest output says which ran.

The tolerance is shown to hold both ways: the recorded kinds agree within it (Intel with AMX against AMD
Zen 4), a run with other kernels forced on this machine passes through it, and a one-line change of a
loss fails it.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from golden_engine import (METHODS, bit_differences, differences_beyond_tolerance, exact_set, golden_sets,
                           machine_kind, run_golden)

KIND = machine_kind()
SETS = golden_sets()
EXACT = exact_set(SETS, KIND)


@pytest.fixture(scope="module")
def golden_root(tmp_path_factory):
    return tmp_path_factory.mktemp("golden")  # one teacher, trained once, shared by the module's runs


def compare_with_every_set(fresh: dict, method: str) -> list:
    """Assert ``fresh`` against each recorded set; returns what was checked, for the summary line."""
    checked = []
    for name, records in SETS.items():
        if name == EXACT:
            assert bit_differences(fresh, records[method]) == [], f"not bit-identical to the set {name}"
            checked.append(f"bit-identical to {name}")
        else:
            assert differences_beyond_tolerance(fresh, records[method]) == [], f"beyond tolerance of {name}"
            checked.append(f"within tolerance of {name}")
    return checked


@pytest.mark.parametrize("method", METHODS, ids=[f"{m}-{'exact' if EXACT else 'tolerance'}" for m in METHODS])
def test_cpu_run_matches_the_golden_records(method, golden_root, record_property):
    fresh = run_golden(method, golden_root)
    checked = compare_with_every_set(fresh, method)
    record_property("golden", f"{method}: {'; '.join(checked)}")


def test_every_recorded_kind_has_every_method():
    assert SETS, "no golden set: record one with `PYTHONPATH=. python tests/golden_engine.py`"
    for name, records in SETS.items():
        assert sorted(records) == sorted(METHODS), name
        assert len({json.dumps(r["recorded_with"], sort_keys=True) for r in records.values()}) == 1, name


PAIRS = [(a, b) for i, a in enumerate(sorted(SETS)) for b in sorted(SETS)[i + 1:]]


@pytest.mark.parametrize("a, b", PAIRS, ids=[f"{a}-vs-{b}" for a, b in PAIRS])
def test_two_recorded_kinds_differ_in_the_last_bits_and_agree_within_the_tolerance(a, b):
    """The kinds' sets do differ (else their agreement would not test the tolerance), and agree within it."""
    differing = [m for m in METHODS if bit_differences(SETS[a][m], SETS[b][m])]
    assert differing, "two machine kinds with bit-identical sets: the tolerance is not exercised by them"
    for m in METHODS:
        assert differences_beyond_tolerance(SETS[a][m], SETS[b][m]) == [], (m, a, b)


def _kd_without_t_squared(student_logits, teacher_logits, temperature):
    from kdlib.losses import kl_divergence

    return kl_divergence(student_logits, teacher_logits, temperature).mean()  # the defect: no * T**2


def _kd_weight_one_percent_high(monkeypatch):
    from kdlib.methods import kd

    original = kd.KD.__init__

    def init(self, **hyperparameters):
        original(self, **hyperparameters)
        self.kd_weight *= 1.01

    monkeypatch.setattr(kd.KD, "__init__", init)


@pytest.mark.parametrize("defect", ["kd without T^2", "kd weight 1% high"])
def test_a_one_line_change_of_a_loss_fails_on_every_machine(defect, golden_root, monkeypatch, tmp_path):
    from kdlib.methods import kd

    if defect == "kd without T^2":
        monkeypatch.setattr(kd, "kd_loss", _kd_without_t_squared)
    else:
        _kd_weight_one_percent_high(monkeypatch)
    teachers = golden_root / "teachers"
    if teachers.exists():  # the teacher is not what is broken: reuse the one the module trained
        (tmp_path / "teachers").symlink_to(teachers, target_is_directory=True)
    broken = run_golden("kd", tmp_path)
    for name, records in SETS.items():
        found = differences_beyond_tolerance(broken, records["kd"])
        assert any("train_loss" in line for line in found), (name, found)
        assert bit_differences(broken, records["kd"]), name


@pytest.mark.slow
def test_a_machine_of_another_kind_runs_the_tolerance_path_and_passes(tmp_path):
    """AVX2 kernels forced in ATen and oneDNN: a kind with no set, as a new CPU would be."""
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "OMP_NUM_THREADS": "1",
           "KDLIB_HOME": str(tmp_path / "home"), "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    for name in ("PYTEST_XDIST_WORKER", "KDLIB_TEST_TIMES"):  # a session of its own
        env.pop(name, None)
    tests = Path(__file__).resolve().parent
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-p", "no:xdist", "-q", "-rA",
         f"{Path(__file__).name}::test_cpu_run_matches_the_golden_records", "-k", "dkd or aekt",
         "--basetemp", str(tmp_path / "pytest")],
        cwd=tests, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "PASSED test_golden_engine.py::test_cpu_run_matches_the_golden_records[dkd-tolerance]" in result.stdout
    assert "PASSED test_golden_engine.py::test_cpu_run_matches_the_golden_records[aekt-tolerance]" in result.stdout
