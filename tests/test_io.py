"""Atomic writes (kdlib.io): a reader sees the old file or the new one, never a part of either."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from kdlib import sweep
from kdlib.io import atomic_write, atomic_write_json

REPO = Path(__file__).resolve().parent.parent


def test_a_failing_writer_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "metrics.json"
    atomic_write_json(target, {"epoch": 1})
    before = target.read_bytes()

    def half_then_fail(f):
        f.write(b"{\"epoch\": 2, \"hist")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(target, half_then_fail)
    assert target.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]


def test_the_new_file_gets_normal_permissions(tmp_path):
    # mkstemp creates 0600 files; a record others should read must not stay private
    import kdlib.io

    atomic_write(tmp_path / "a.bin", lambda f: f.write(b"x"))
    assert (tmp_path / "a.bin").stat().st_mode & 0o777 == 0o666 & ~kdlib.io._UMASK != 0o600


_WRITER = """
import sys
from kdlib.io import atomic_write
path, size = sys.argv[1], int(sys.argv[2])
print("ready", flush=True)
for i in range(10**6):
    atomic_write(path, lambda f: f.write(bytes([i % 251]) * size))
"""


@pytest.mark.slow
def test_sigkill_during_writes_never_exposes_a_partial_file(tmp_path):
    target, size = tmp_path / "blob.bin", 8 * 2**20
    rng = __import__("random").Random(0)
    for _ in range(4):
        proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(target), str(size)], cwd=REPO,
                                stdout=subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(REPO)})
        assert proc.stdout.readline().strip() == b"ready"
        time.sleep(rng.uniform(0.05, 0.6))
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        if target.exists():
            data = target.read_bytes()
            assert len(data) == size and data == data[:1] * size  # one whole version
    # the temporaries of killed writers may stay behind, but never under the target's name
    assert all(p.name.startswith(".blob.bin.") and p.name.endswith(".tmp")
               for p in tmp_path.iterdir() if p != target)


def test_sweep_summary_failing_mid_write_keeps_the_previous_summary(tmp_path, monkeypatch):
    (tmp_path / "runs").mkdir()
    sweep.write_summary(tmp_path)
    before = (tmp_path / sweep.SUMMARY).read_bytes()
    real = pd.DataFrame.to_csv

    def partial(self, f, *args, **kwargs):
        f.write("method,seed,status\nkd,0,fin")
        raise OSError("disk full")

    monkeypatch.setattr(pd.DataFrame, "to_csv", partial)
    with pytest.raises(OSError):
        sweep.write_summary(tmp_path)
    monkeypatch.setattr(pd.DataFrame, "to_csv", real)
    assert (tmp_path / sweep.SUMMARY).read_bytes() == before
