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
from kdlib import runs
from kdlib.errors import KDLibError
from kdlib.runs.executors import cores

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
    assert capsys.readouterr() == ("", "")  # nothing in a chapter's output (no bar off a terminal)
    threads = max(1, cores() // 2)  # what each of the two workers gets

    monkeypatch.setenv("KDLIB_HOME", str(inline_home))
    monkeypatch.setenv("KDLIB_RUN_WORKERS", "1")
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        inline = ex.run_all(setting, specs)
    finally:
        torch.set_num_threads(before)

    assert len(pooled.runs) == len(inline.runs) == 4
    for a, b in zip(pooled.runs["run"], inline.runs["run"]):
        history_a, record_a = _history(Path(a))
        history_b, record_b = _history(Path(b))
        assert history_a == history_b  # bit for bit: same recipe, same seed, same thread count
        assert [s["threads"] for s in record_a["segments"]] == [threads]
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
    found = list((tmp_path / "runs" / "smoke").iterdir())
    assert len(found) == 1 and json.loads((found[0] / "metrics.json").read_text())["final"]
    record = json.loads((found[0] / "metrics.json").read_text())
    # trained once: one segment, and one checkpoint write (a second trainer of the 1-epoch run would have
    # found the first one's checkpoint and kept it as checkpoint.prev.pt)
    assert len(record["segments"]) == 1 and not (found[0] / "checkpoint.prev.pt").exists()


@pytest.mark.slow
def test_pool_workers_leave_interrupts_to_the_kernel():
    """A notebook server stopping a kernel signals its process group: the workers must not each print a
    KeyboardInterrupt traceback into the build's log (they exit when the kernel goes)."""
    import signal

    assert runs.worker_pool(1).submit(signal.getsignal, signal.SIGINT).result(timeout=120) == signal.SIG_IGN
