"""``kdlib book --executor``: the chapters' runs collected, trained on the executor, then the chapters executed
without training; a failed run named with the command that resumes, and the same command resuming.

Checked on a throw-away book of two small chapters asking for tiny runs (one of them only once a result
exists), with the ``pool`` executor, so no cluster is needed (test_book_slurm.py does the real book on Slurm).
"""
from __future__ import annotations

import json
import os

import pytest

from kdlib import bookbuild, runs
from kdlib import experiments as ex

from test_book_parallel import args, make_book, record

SETTING = ('ex.Setting.from_parameters("smoke", teacher="resnet8", student="resnet8", epochs=1, teacher_epochs=1, '
           'train_per_class=2, test_per_class=1, device="cpu", seeds=[0])')
FIRST = f"""from kdlib import experiments as ex
setting = {SETTING}
tables = ex.run_all(setting, {{"KD": "kd"}})
print("an analysis of", len(tables.runs), "run")"""
# each run it asks for after the first depends on the one before: known only once that run is trained
SECOND = f"""from kdlib import experiments as ex
setting = {SETTING}
first = ex.run_all(setting, {{"vanilla": "vanilla"}})
temperature = 2.0 + float(first.runs["best_test_acc"].iloc[0] >= 0)
more = ex.run_all(setting, {{"KD T": ("kd", {{"temperature": temperature}})}})
beta = 1.0 + float(more.runs["best_test_acc"].iloc[0] >= 0)
last = ex.run_all(setting, {{"DKD": ("dkd", {{"beta": beta}})}})"""


@pytest.mark.slow
def test_runs_are_trained_on_the_executor_and_the_chapters_train_nothing(tmp_path, monkeypatch, capsys):
    home = tmp_path / "home"
    monkeypatch.setenv("KDLIB_HOME", str(home))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    make_book(tmp_path, {"first": ("", FIRST), "second": ("", SECOND)})
    setting = eval(SETTING)
    kd, vanilla = ex.run_dir(setting, "kd", 0), ex.run_dir(setting, "vanilla", 0)
    hotter, dkd = ex.run_dir(setting, "kd", 0, temperature=3.0), ex.run_dir(setting, "dkd", 0, beta=2.0)
    kd.mkdir(parents=True)
    (kd / "checkpoint.pt").write_bytes(b"not a checkpoint")  # this run fails in its worker
    argv = args(tmp_path, executor="pool", workers=2, jobs=2)

    assert bookbuild.run(argv) == 1  # a run failed: named, with the chapter that needs it and how to resume
    err = capsys.readouterr().err
    assert f"run failed: kd resnet8->resnet8 seed 0: KDLibError: checkpoint {kd / 'checkpoint.pt'} is corrupt" in err
    assert "needed by first" in err and "resume with: python -m kdlib book --profile smoke" in err
    assert "--executor pool --workers 2" in err
    assert json.loads((vanilla / "metrics.json").read_text())["final"]  # the others were trained
    plan = json.loads((home / "book-smoke.json").read_text())
    assert plan["about"]["chapters"] == {"first": ["teacher resnet8 (smoke, 1 epoch, seed 0)", "kd resnet8->resnet8 seed 0"],
                                         "second": ["vanilla resnet8 seed 0"]}
    assert {e["role"] for e in plan["runs"].values()} == {"teacher", "run"}

    (kd / "checkpoint.pt").unlink()  # the cause fixed: the same command resumes
    assert bookbuild.run(argv) == 0
    out = capsys.readouterr().out
    assert "collected: 2 runs to train (0 teachers)" in out  # kd, and KD at T=3 once vanilla was there
    assert "1 more runs asked for: dkd resnet8->resnet8 seed 0 (beta=2.0)" in out  # asked while executing
    for run_dir in (kd, vanilla, hotter, dkd):
        done = json.loads((run_dir / "metrics.json").read_text())
        assert done["final"] and len(done["segments"]) == 1
    assert record(tmp_path, "first")["name"] == "first" and record(tmp_path, "second")["name"] == "second"

    # every run finished: a third build collects none, executes each chapter once, trains nothing
    stamps = {p: p.stat().st_mtime_ns for p in home.rglob("metrics.json")}
    assert bookbuild.run(argv) == 0 and "collected: 0 runs to train" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in home.rglob("metrics.json")} == stamps
    assert runs.COLLECT_ENV not in os.environ
