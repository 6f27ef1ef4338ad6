"""benchmarks/gpu_check.sh's own logic, on a CPU, before a GPU lease is spent on it: its dry mode runs
stand-in parts (a test that passes, one that fails, one that skips; a part that overruns its limit; a part
the budget cannot fit) through the same machinery. No timing is asserted beyond the limits the script sets."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "benchmarks" / "gpu_check.sh"


def _run(tmp_path, **env):
    out = tmp_path / "gpu_check.json"
    full = {**os.environ, "PYTHON": sys.executable, "GPU_CHECK_MODE": "dry", "GPU_CHECK_BUDGET": "150", **env}
    res = subprocess.run(["bash", str(SCRIPT), str(out)], cwd=tmp_path, env=full, capture_output=True, text=True,
                         timeout=600)
    return res, (json.loads(out.read_text()) if out.is_file() else None)


def test_the_script_parses():
    assert subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True).returncode == 0


def test_dry_run_writes_every_part_with_outcomes_limits_and_the_environment(tmp_path):
    res, report = _run(tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    parts = report["parts"]
    assert {k: v["status"] for k, v in parts.items()} == {
        "prerequisites": "ok", "tests": "failed", "bench_bf16": "ok", "bench_fp32": "ok", "paper_bf16": "timeout",
        "paper_fp32": "skipped"}
    # per-test outcomes from the junit XML
    outcomes = {t["test"].rsplit("::", 1)[1]: t["outcome"] for t in parts["tests"]["tests"]}
    assert outcomes == {"test_passes": "passed", "test_fails": "failed", "test_skips": "skipped"}
    assert parts["tests"]["outcomes_from"] == "junit" and "assert 1 == 2" in str(parts["tests"]["tests"])
    # a part killed by its limit leaves its output (unbuffered) and the parts before it
    assert parts["paper_bf16"]["exit_code"] == 124 and "epoch 1" in parts["paper_bf16"]["log_tail"]
    assert parts["paper_bf16"]["limit"] == 2 and parts["bench_bf16"]["result"]["amp"] == "bf16"
    # bf16 and fp32 side by side, the goals judged on bf16
    summary = report["summary"]
    assert (summary["bf16"]["amp"], summary["fp32"]["amp"]) == ("bf16", "none")
    assert summary["goals_on_bf16"]["graphed_img_s >= 45000"] is True and summary["tests_passed"] is False
    env = report["environment"]
    assert env["missing"] == [] and env["torch"] and len(env["sources_sha256"]) == 64
    assert env["commit"] and env["commit_from"] in ("git", "unknown", "GPU_CHECK_COMMIT")
    assert report["mode"] == "dry" and report["elapsed_seconds"] <= report["budget_seconds"]


def test_missing_prerequisites_are_named_before_anything_runs(tmp_path):
    res, report = _run(tmp_path, GPU_CHECK_EXTRA_REQUIRE="no_such_module_kdlib")
    assert res.returncode == 3 and "no_such_module_kdlib" in res.stderr
    assert list(report["parts"]) == ["prerequisites"] and report["parts"]["prerequisites"]["status"] == "failed"
    assert any("no_such_module_kdlib" in m for m in report["environment"]["missing"])
    res, report = _run(tmp_path, PYTHON="/nonexistent/python3")
    assert res.returncode == 3 and "missing: /nonexistent/python3" in res.stderr and "missing" in report["error"]


@pytest.mark.parametrize("mode", ["cpu-instead-of-gpu"])
def test_an_unknown_mode_is_refused(tmp_path, mode):
    res, report = _run(tmp_path, GPU_CHECK_MODE=mode)
    assert res.returncode == 2 and "GPU_CHECK_MODE" in res.stderr and report is None
