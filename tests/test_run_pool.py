"""run_all's worker pool: independent runs train side by side, one thread each, with the numbers they
would have in this process with one thread; a run two processes ask for is trained once.
"""
from __future__ import annotations

import json
import multiprocessing
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kdlib import config as kconfig
from kdlib import experiments as ex
from kdlib.errors import KDLibError

TINY = dict(teacher="resnet8", student="resnet8", epochs=1, teacher_epochs=1, train_per_class=4,
            test_per_class=2, device="cpu")


def _history(run_dir: Path):
    record = json.loads((run_dir / "metrics.json").read_text())
    return [(e["train_loss"], e["test_acc"]) for e in record["history"]], record


def test_worker_count_rules(monkeypatch):
    cpu = [kconfig.make_config("smoke", method="kd", device="cpu")] * 5
    monkeypatch.setenv("KDLIB_RUN_WORKERS", "3")
    assert ex.run_workers(cpu) == 3
    assert ex.run_workers(cpu[:2]) == 2  # never more workers than runs
    monkeypatch.setenv("KDLIB_RUN_WORKERS", "1")
    assert ex.run_workers(cpu) == 1
    monkeypatch.delenv("KDLIB_RUN_WORKERS")
    cores = len(__import__("os").sched_getaffinity(0))
    assert ex.run_workers(cpu) == min(cores, 5)
    assert ex.run_workers([kconfig.make_config("smoke", method="kd", device="cuda")] * 5) == 1  # one GPU: one run
    for bad in ("0", "two", "-1"):
        monkeypatch.setenv("KDLIB_RUN_WORKERS", bad)
        with pytest.raises(KDLibError, match="KDLIB_RUN_WORKERS"):
            ex.run_workers(cpu)


@pytest.mark.slow
def test_pool_runs_equal_one_thread_runs_in_this_process(tmp_path, monkeypatch, capsys):
    pooled_home, inline_home = tmp_path / "pooled", tmp_path / "inline"
    specs = {"vanilla": "vanilla", "KD": "kd"}
    setting = ex.Setting.from_parameters("smoke", seeds=[0, 1], **TINY)

    monkeypatch.setenv("KDLIB_HOME", str(pooled_home))
    monkeypatch.setenv("KDLIB_RUN_WORKERS", "2")
    pooled = ex.run_all(setting, specs)
    out = capsys.readouterr().out
    assert out.count("trained now") == 4 and "2 runs at a time, 1 thread each" in out

    monkeypatch.setenv("KDLIB_HOME", str(inline_home))
    monkeypatch.setenv("KDLIB_RUN_WORKERS", "1")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        inline = ex.run_all(setting, specs)
    finally:
        torch.set_num_threads(before)

    assert len(pooled.runs) == len(inline.runs) == 4
    for a, b in zip(pooled.runs["run"], inline.runs["run"]):
        history_a, record_a = _history(Path(a))
        history_b, record_b = _history(Path(b))
        assert history_a == history_b  # bit for bit: same recipe, same seed, same thread count
        assert [s["threads"] for s in record_a["segments"]] == [1]
    # the teacher was trained once, before the workers started, in the pooled home
    assert len(list((pooled_home / "teachers").glob("*.pt"))) == 1


_ASK_FOR_ONE_RUN = """
import sys
from kdlib import experiments as ex
setting = ex.Setting.from_parameters("smoke", seeds=[0], teacher="resnet8", student="resnet8", epochs=1,
                                     teacher_epochs=1, train_per_class=4, test_per_class=2, device="cpu")
ex.run(setting, "vanilla", 0)
"""


@pytest.mark.slow
def test_a_run_two_processes_ask_for_is_trained_once(tmp_path):
    env = {**__import__("os").environ, "KDLIB_HOME": str(tmp_path), "MPLCONFIGDIR": str(tmp_path / "mpl"),
           "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", _ASK_FOR_ONE_RUN], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    lines = " ".join(o for o, _ in outputs)
    assert lines.count("trained now") == 1 and lines.count("reused") == 1
    runs = list((tmp_path / "runs" / "smoke").iterdir())
    assert len(runs) == 1 and json.loads((runs[0] / "metrics.json").read_text())["final"]


@pytest.mark.slow
def test_pool_workers_leave_interrupts_to_the_kernel():
    """A notebook server stopping a kernel signals its process group: the workers must not each print a
    KeyboardInterrupt traceback into the build's log (they exit when the kernel goes)."""
    import signal

    assert ex._pool(1, 1).submit(signal.getsignal, signal.SIGINT).result(timeout=120) == signal.SIG_IGN
