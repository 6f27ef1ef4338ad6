"""The run layer (kdlib.runs): one directory scheme and one lock for chapters, sweeps and the command line;
teachers planned as runs; the book's collect mode; the resolved recipe printed before anything trains.

Real runs are tiny (conftest.TINY: 100 classes x 4 training / 2 test images, resnet8 -> resnet8).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from conftest import TINY
from kdlib import cli, engine, runs, sweep
from kdlib import experiments as ex
from kdlib.config import make_config
from kdlib.errors import KDLibError

SETTING = dict(teacher="resnet8", student="resnet8", epochs=1, teacher_epochs=TINY["teacher_epochs"],
               train_per_class=TINY["train_per_class"], test_per_class=TINY["test_per_class"], device="cpu")
#: the same runs as a sweep grid: what the chapter's setting sets apart from the smoke profile
GRID = dict(pairs=[("resnet8", "resnet8")], profile="smoke", epochs=1, device="cpu", executor="inline", threads=1,
            overrides=[f"{k}={SETTING[k]}" for k in ("train_per_class", "test_per_class", "teacher_epochs")])


def stamps(path: Path):
    return (path / "metrics.json").stat().st_mtime_ns, len(json.loads((path / "metrics.json").read_text())["segments"])


@pytest.mark.slow
def test_a_run_a_sweep_trained_is_reused_by_a_chapter_and_the_other_way_round(tmp_path, monkeypatch):
    monkeypatch.setenv("KDLIB_HOME", str(tmp_path))
    monkeypatch.setenv("KDLIB_RUN_WORKERS", "1")
    setting = ex.Setting.from_parameters("smoke", seeds=[0, 1], **SETTING)
    # a sweep without --out trains into $KDLIB_HOME: its teacher first, then KD seed 0
    first = sweep.run_sweep(sweep.GridSpec(methods=["kd"], seeds=[0], **GRID), progress=False)
    assert first.ok and first.teachers == 1 and first.submitted == 1
    kd0 = ex.run_dir(setting, "kd", 0)
    before = stamps(kd0)
    # the chapter finds the sweep's run (and its teacher) and trains only what the sweep did not
    tables = ex.run_all(setting, {"KD": "kd"})
    assert stamps(kd0) == before and set(tables.runs["run"]) == {str(kd0), str(ex.run_dir(setting, "kd", 1))}
    assert len(list((tmp_path / "teachers").glob("*.pt"))) == 1
    # and a sweep of both seeds finds both runs finished: nothing submitted, nothing rewritten
    seed1 = stamps(ex.run_dir(setting, "kd", 1))
    again = sweep.run_sweep(sweep.GridSpec(methods=["kd"], seeds=[0, 1], **GRID), progress=False)
    assert again.ok and again.skipped == 2 and again.submitted == 0 and again.teachers == 0
    assert (stamps(kd0), stamps(ex.run_dir(setting, "kd", 1))) == (before, seed1)
    assert set(again.summary["run_dir"]) == {p.relative_to(tmp_path).as_posix() for p in (kd0, ex.run_dir(setting, "kd", 1))}


def test_teachers_are_runs_the_students_need(tmp_path, tiny_teachers_dir):
    fields = {**TINY, "epochs": 1}
    cfgs = [make_config("smoke", method=m, seed=s, teachers_dir=str(tmp_path / "t"), **fields)
            for m in ("kd", "dkd", "vanilla") for s in (0, 1)]
    planned = runs.plan(cfgs, root=tmp_path)
    teacher, students = planned[0], planned[1:]
    assert teacher.role == "teacher" and len(students) == 6 and not any(r.role == "teacher" for r in students)
    assert teacher.run_dir == tmp_path / "t" / teacher.run_dir.name and not teacher.finished()
    assert [r.needs for r in students] == [str(teacher.run_dir)] * 4 + [None, None]  # vanilla needs none
    assert runs.plan(cfgs, root=tmp_path, teachers_only=True) == [teacher]
    cached = [c.replace(teachers_dir=str(tiny_teachers_dir)) for c in cfgs]  # a trained teacher: no run
    assert [r.role for r in runs.plan(cached, root=tmp_path)] == ["run"] * 6
    assert not (tmp_path / "runs").exists()  # planning writes nothing


def test_collect_mode_records_the_missing_runs_and_stops_the_cell(tmp_path, monkeypatch, tiny_teachers_dir):
    cfg = make_config("smoke", method="kd", teachers_dir=str(tiny_teachers_dir), **{**TINY, "epochs": 1})
    planned = runs.plan([cfg], root=tmp_path)
    monkeypatch.setenv(runs.COLLECT_ENV, str(tmp_path / "asked.jsonl"))
    with pytest.raises(runs.RunsCollected, match="1 run"):
        runs.ensure(planned)
    (entry,) = [json.loads(line) for line in (tmp_path / "asked.jsonl").read_text().splitlines()]
    assert entry["role"] == "run" and entry["missing"] and entry["config"]["out"] == str(planned[0].run_dir)
    assert not planned[0].run_dir.exists()  # nothing trained
    assert not issubclass(runs.RunsCollected, Exception)  # a chapter's `except Exception` cannot swallow it
    # a run the engine stopped (non-finite loss) is a result: the chapter sees the engine's error, as it would
    planned[0].run_dir.mkdir(parents=True)
    (planned[0].run_dir / "metrics.json").write_text(json.dumps(
        {"config": {"run": cfg.resolved().replace(out=str(planned[0].run_dir)).to_dict()}, "history": [],
         "status": "failed", "error": "non-finite loss (nan/inf) at epoch 1"}))
    with pytest.raises(KDLibError, match="non-finite loss"):
        runs.ensure(planned)


def test_a_planned_run_keeps_its_resolved_recipe_and_the_cli_prints_it(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("KDLIB_HOME", str(tmp_path))
    assert cli.main(["train", "--method", "dkd", "--profile", "paper", "--seed", "2", "--set", "beta=4",
                     "--dry-run"]) == 0
    out = capsys.readouterr().out
    teacher, student = runs.plan([make_config("paper", method="dkd", seed=2, overrides=["beta=4"])])
    assert str(student.run_dir) in out and str(teacher.run_dir) in out and "beta=4.0" in out
    header = f"{student.label}: {student.run_dir}\n"  # then the recipe the run will train with, as JSON
    recipe = json.loads(out[out.index(header) + len(header):].split("\n}")[0] + "\n}")
    assert recipe["lr"] == 0.05 and recipe["milestones"] == [150, 180, 210] and recipe["method_params"]["beta"] == 4
    assert recipe["method_params"]["warmup"] == 20 and recipe["teacher_lr"] == 0.05
    assert not (tmp_path / "runs").exists()  # nothing trained, nothing written
    runs.write_plan(tmp_path / "plan.json", [teacher, student], {"what": "test"})
    rebuilt = runs.planned_runs(tmp_path / "plan.json")
    assert [(r.role, r.run_dir, r.needs) for r in rebuilt] == [(r.role, r.run_dir, r.needs) for r in (teacher, student)]
    assert [r.config.identity_hash() for r in rebuilt] == [r.config.identity_hash() for r in (teacher, student)]


def test_per_pair_tables_are_data_on_the_method():
    from kdlib import methods

    dkd, aekt = methods.get("dkd"), methods.get("aekt")
    assert dkd.per_pair["beta"][("vgg13", "vgg8")] == 6.0 and aekt.per_pair["beta"] is dkd.per_pair["beta"]
    assert all(not m.per_pair for m in map(methods.get, methods.names()) if m not in (dkd, aekt))
    resolved = make_config("smoke", method="aekt", teacher="vgg13", student="vgg8").resolved()
    assert resolved.method_params["beta"] == 6.0  # the table, applied where the recipe is resolved
    assert make_config("smoke", method="aekt", teacher="vgg13", student="vgg8",
                       method_params={"beta": 1}).resolved().method_params["beta"] == 1.0  # the user's value wins


def test_the_cli_trains_into_the_one_directory_scheme_under_the_run_lock(tmp_path, monkeypatch):
    from kdlib.engine.rundir import RunLock

    monkeypatch.setenv("KDLIB_HOME", str(tmp_path))
    args = ["train", "--method", "vanilla", "--student", "resnet8", "--epochs", "1", "--no-progress", "--quiet",
            "--set", "train_per_class=2", "--set", "test_per_class=1"]
    (run,) = runs.plan([make_config("smoke", method="vanilla", student="resnet8", epochs=1, train_per_class=2,
                                    test_per_class=1)])
    with RunLock(run.run_dir):  # another process trains it: refused, untouched
        assert cli.main(args) == 2 and not (run.run_dir / "metrics.json").exists()
    assert cli.main(args) == 0 and run.finished()
    assert os.path.commonpath([run.run_dir, tmp_path / "runs" / "smoke"]) == str(tmp_path / "runs" / "smoke")
    assert engine.train(run.config, progress=False, verbose=False)["final"]  # the chapters' door finds it finished
