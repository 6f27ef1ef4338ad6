"""``python -m kdlib sweep``: grids, run directories, executors, locks, failures and the summaries; and
the one directory scheme a sweep shares with the book's chapters (a run one trains, the other reuses).

Real runs are the tiniest the engine allows (100 classes x 4 training / 2 test images, resnet8 ->
resnet8, one epoch) and reuse the session's cached tiny teacher (``conftest.TINY``), so no test trains a
teacher. One test goes through submitit's local executor (subprocesses); the others run inline.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kdlib import cli, engine, sweep
from kdlib.config import make_config
from kdlib.engine.rundir import LOCK, RunLock, RunLocked
from kdlib.errors import KDLibError
from kdlib.runs import execute_run

from conftest import TINY

ROOT = Path(__file__).resolve().parent.parent
#: the recipe of conftest's cached tiny teacher, so that every sweep here finds it in the cache
TINY_SET = [f"train_per_class={TINY['train_per_class']}", f"test_per_class={TINY['test_per_class']}",
            f"teacher_epochs={TINY['teacher_epochs']}"]


def tiny_spec(out, teachers_dir, **changes) -> sweep.GridSpec:
    values = dict(methods=["kd", "dkd"], pairs=[("resnet8", "resnet8")], seeds=[0, 1], profile="smoke",
                  dataset="synthetic", epochs=1, overrides=list(TINY_SET), device="cpu", out=str(out),
                  teachers_dir=str(teachers_dir), executor="inline", threads=None)
    values.update(changes)
    return sweep.GridSpec(**values)


def tiny_dir(method: str, seed: int) -> str:
    """The directory of a tiny grid run, relative to the sweep's folder, from the documented scheme:
    ``runs/<profile>/<method>-<teacher>-<student>-s<seed>-<identity hash>``, the hash of the resolved recipe
    without the execution fields (computed here from that definition, not from the sweep's code)."""
    cfg = make_config("smoke", method=method, teacher="resnet8", student="resnet8", seed=int(seed), epochs=1,
                      dataset="synthetic", train_per_class=TINY["train_per_class"],
                      test_per_class=TINY["test_per_class"], teacher_epochs=TINY["teacher_epochs"])
    identity = cfg.resolved().to_dict()
    for name in ("out", "device", "amp", "channels_last", "eval_batch_size", "compile", "teachers_dir", "data_root",
                 "teacher_cache", "teacher_cache_dtype", "graph"):
        identity.pop(name)
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:10]
    return f"runs/smoke/{method}-resnet8-resnet8-s{seed}-{digest}"


def metrics_mtimes(out: Path):
    return {p: p.stat().st_mtime_ns for p in sorted((out / "runs").rglob("metrics.json"))}


def submitted_jobs(out: Path):
    return sorted((out / "submitit").glob("*_submitted.pkl")) if (out / "submitit").is_dir() else []


def max_concurrent_jobs(out: Path) -> int:
    """The most jobs that ran at once, from the start/end times submitit's logs record."""
    events = []
    for log in (out / "submitit").glob("*_log.out"):
        stamps = re.findall(r"\((\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+)\) - (Starting|Exiting)", log.read_text())
        events += [(stamp, 1 if kind == "Starting" else -1) for stamp, kind in stamps]
    running = peak = 0
    for _, step in sorted(events, key=lambda e: (e[0], e[1])):  # an end before a start at the same instant
        running += step
        peak = max(peak, running)
    return peak


# -- the "done when", through submitit's local executor --------------------------------------
@pytest.mark.slow
def test_local_executor_grid_summary_rerun_and_failure(tiny_teachers_dir, tmp_path, capsys):
    out = tmp_path / "sweep"
    argv = ["sweep", "--methods", "kd,dkd", "--pairs", "resnet8:resnet8", "--seeds", "0,1", "--dataset",
            "synthetic", "--epochs", "1", "--executor", "local", "--workers", "2", "--device", "cpu",
            "--teachers-dir", str(tiny_teachers_dir), "--out", str(out), "--no-progress", "--set", *TINY_SET]
    assert cli.main(argv) == 0
    summary = sweep.read_summary(out)
    assert len(summary) == 4 and set(summary["status"]) == {"finished"}
    assert sorted(zip(summary["method"], summary["seed"])) == [("dkd", 0), ("dkd", 1), ("kd", 0), ("kd", 1)]
    assert len(submitted_jobs(out)) == 4
    for row in summary.itertuples():  # every number comes from the run's own record
        final = json.loads((out / row.run_dir / "metrics.json").read_text())["final"]
        assert row.best_test_acc == pytest.approx(final["best_test_acc"])
        assert row.last_test_acc == pytest.approx(final["test_acc"])
        assert row.best_epoch == final["best_epoch"] and row.epochs == 1
        assert row.run_dir == tiny_dir(row.method, row.seed)
    assert (out / "aggregate.csv").is_file()

    # again: every run is finished, so nothing is submitted and nothing is rewritten
    before = metrics_mtimes(out)
    assert cli.main(argv) == 0
    assert metrics_mtimes(out) == before and len(submitted_jobs(out)) == 4
    assert "4 finished" in capsys.readouterr().out

    # a run that fails inside its job (a corrupt checkpoint) is reported; the exit code says so
    bad = out / tiny_dir("kd", 2)
    bad.mkdir(parents=True)
    (bad / engine.CHECKPOINT).write_bytes(b"not a checkpoint")
    assert cli.main([*argv[:2], "kd", *argv[3:6], "0,1,2", *argv[7:]]) == 1
    summary = sweep.read_summary(out)  # the folder's summary: both grids
    failed = summary[summary["status"] == "failed"]
    assert len(summary) == 5 and list(failed["run_dir"]) == [bad.relative_to(out).as_posix()]
    assert "corrupt" in failed["error"].iloc[0] and "KDLibError" in failed["error"].iloc[0]
    assert json.loads((bad / sweep.ERROR).read_text())["error"] == failed["error"].iloc[0]
    assert (summary["status"] == "finished").sum() == 4 and len(submitted_jobs(out)) == 5
    assert max_concurrent_jobs(out) <= 2  # --workers 2

    # the summary is rebuilt from the records alone
    written = (out / "summary.csv").read_text()
    (out / "summary.csv").unlink()
    assert cli.main(["sweep", "--summarize-only", "--out", str(out)]) == 0
    assert (out / "summary.csv").read_text() == written


# -- failures, locks, resume (inline) -----------------------------------------------------------------
def test_failed_run_does_not_stop_the_sweep_and_is_retried(tiny_teachers_dir, tmp_path, monkeypatch):
    real_train = engine.train

    def train(config, progress=True, **kwargs):
        if config.method == "dkd":
            raise RuntimeError("boom\nthe last line says why")
        return real_train(config, progress=progress, **kwargs)

    monkeypatch.setattr(engine, "train", train)
    spec = tiny_spec(tmp_path, tiny_teachers_dir, seeds=[0])
    result = sweep.run_sweep(spec, progress=False)
    status = dict(zip(result.summary["method"], result.summary["status"]))
    assert status == {"kd": "finished", "dkd": "failed"} and not result.ok and result.failed == 1
    error = result.summary.set_index("method").loc["dkd", "error"]
    assert error == "RuntimeError: the last line says why"
    assert sweep.read_summary(tmp_path).set_index("method").loc["dkd", "status"] == "failed"

    monkeypatch.setattr(engine, "train", real_train)  # fixed: the failed run runs, the finished one not
    result = sweep.run_sweep(spec, progress=False)
    assert result.ok and result.skipped == 1 and result.submitted == 1
    assert not list(tmp_path.rglob(sweep.ERROR))


def test_interrupted_run_resumes_through_the_engine(tiny_teachers_dir, tmp_path):
    spec = tiny_spec(tmp_path, tiny_teachers_dir, methods=["kd"], seeds=[0], epochs=2)
    (run,) = sweep.plan(spec)
    engine.train(run.config, progress=False, verbose=False, stop_after_epoch=1)  # a run cut short
    (row,) = sweep.summarize(tmp_path).itertuples()
    assert (row.status, row.epochs_done, row.epochs) == ("incomplete", 1, 2)
    result = sweep.run_sweep(spec, progress=False)
    assert result.ok and result.submitted == 1
    history = json.loads((run.run_dir / "metrics.json").read_text())["history"]
    assert [row["epoch"] for row in history] == [1, 2]
    segments = json.loads((run.run_dir / "metrics.json").read_text())["segments"]
    assert [s["start_epoch"] for s in segments] == [1, 2]  # resumed, not restarted


def test_lock_keeps_a_second_worker_out(tiny_teachers_dir, tmp_path):
    spec = tiny_spec(tmp_path, tiny_teachers_dir, methods=["kd"])
    seed0, seed1 = sweep.plan(spec)
    with RunLock(seed0.run_dir):  # another worker is training seed 0
        assert "pid" in RunLock.holder(seed0.run_dir)
        # a job that got past the sweep's own check still does not train it
        assert execute_run(seed0)["status"] == "locked"
        result = sweep.run_sweep(spec, progress=False)
        assert result.locked == 1 and result.submitted == 1 and not result.ok
        rows = result.summary.set_index("seed")
        assert rows.loc[1, "status"] == "finished"
        assert rows.loc[0, "status"] == "running" and str(os.getpid()) in rows.loc[0, "running_on"]
        assert not (seed0.run_dir / "metrics.json").exists()
    assert RunLock.holder(seed0.run_dir) is None  # the lock file stays, the lock does not
    assert sweep.run_sweep(spec, progress=False).ok


def test_lock_of_a_crashed_worker_does_not_block(tmp_path):
    run_dir = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, os, sys, time\n"
        f"fd = os.open({str(run_dir / LOCK)!r}, os.O_RDWR | os.O_CREAT)\n"
        "fcntl.flock(fd, fcntl.LOCK_EX); os.write(fd, b'elsewhere pid 1'); print('held', flush=True)\n"
        "time.sleep(120)\n")], stdout=subprocess.PIPE, text=True)
    run_dir.mkdir()
    try:
        assert holder.stdout.readline().strip() == "held"
        assert RunLock.holder(run_dir) == "elsewhere pid 1"
        with pytest.raises(RunLocked, match="elsewhere pid 1"):
            RunLock(run_dir).acquire(retry_seconds=0.2)
        holder.send_signal(signal.SIGKILL)  # the worker crashes
        holder.wait(timeout=30)
    finally:
        holder.kill()
        holder.stdout.close()
    assert (run_dir / LOCK).exists() and RunLock.holder(run_dir) is None
    with RunLock(run_dir):
        assert RunLock.holder(run_dir) is not None


# -- the plan: directories, overrides, validation -------------------------------------------------------
def test_run_directories_are_deterministic_and_overrides_never_share_one(tmp_path):
    base = dict(methods=["vanilla", "kd", "dkd"], pairs=[("resnet56", "resnet20")], seeds=[0, 1],
                profile="smoke", out=str(tmp_path))
    planned = sweep.plan(sweep.GridSpec(**base))
    (teacher,), plain = planned[:1], planned[1:]  # the teacher to train is planned first, once
    assert teacher.role == "teacher" and teacher.run_dir.parent == tmp_path / "teachers"
    assert [r.run_dir.relative_to(tmp_path).as_posix().rsplit("-", 1)[0] for r in plain] == [
        "runs/smoke/vanilla-resnet20-s0", "runs/smoke/vanilla-resnet20-s1",
        "runs/smoke/kd-resnet56-resnet20-s0", "runs/smoke/kd-resnet56-resnet20-s1",
        "runs/smoke/dkd-resnet56-resnet20-s0", "runs/smoke/dkd-resnet56-resnet20-s1"]
    assert all(r.config.out == str(r.run_dir) and r.run_dir.name.endswith(r.config.identity_hash()) for r in plain)
    assert [r.needs for r in plain] == [None, None] + [str(teacher.run_dir)] * 4
    assert [r.run_dir for r in sweep.plan(sweep.GridSpec(**base))] == [r.run_dir for r in planned]
    assert {r.config.teachers_dir for r in plain} == {str(tmp_path / "teachers")}  # one teacher cache

    def dirs(*overrides):
        return {(r.config.method, r.config.seed): r.run_dir
                for r in sweep.plan(sweep.GridSpec(**base, overrides=list(overrides))) if r.role == "run"}

    assert dirs("lr=1e-1") == dirs("lr=0.1")  # the value counts, not its spelling
    assert dirs("lr=0.05") == dirs()  # the default value is the same run
    assert dirs("lr=0.2")[("kd", 0)] != dirs("lr=0.1")[("kd", 0)] != dirs()[("kd", 0)]
    # a hyperparameter goes to the methods that have it; DKD's per-pair beta for resnet56 is already 2
    assert dirs("beta=2") == dirs()
    with_beta = dirs("beta=4")
    assert with_beta[("kd", 1)] == dirs()[("kd", 1)] and with_beta[("dkd", 1)] != dirs()[("dkd", 1)]
    assert dirs("dkd.temperature=2")[("kd", 0)] == dirs()[("kd", 0)]
    assert dirs("temperature=2")[("kd", 0)] != dirs()[("kd", 0)]
    assert not tmp_path.joinpath("runs").exists()  # planning writes nothing


def test_a_sweep_and_a_chapter_give_a_run_the_same_directory(tmp_path, monkeypatch):
    from kdlib import experiments as ex

    monkeypatch.setenv("KDLIB_HOME", str(tmp_path))
    setting = ex.Setting.from_parameters("course", seeds=[2], epochs=3, train_per_class=5, device="cpu")
    grid = sweep.GridSpec(methods=["vanilla", "dkd"], seeds=[2], profile="course", epochs=3,
                          overrides=["train_per_class=5", "beta=3"])  # no --out: $KDLIB_HOME, the book's runs
    planned = {r.config.method: r.run_dir for r in sweep.plan(grid) if r.role == "run"}
    assert planned == {"vanilla": ex.run_dir(setting, "vanilla", 2), "dkd": ex.run_dir(setting, "dkd", 2, beta=3)}
    assert planned["dkd"] != ex.run_dir(setting, "dkd", 2)


def test_plan_builds_each_config_with_make_config_and_apply_overrides(tmp_path):
    from kdlib.config import apply_overrides

    spec = sweep.GridSpec(methods=["dkd"], pairs=[("resnet56", "resnet20")], seeds=[3], profile="course",
                          epochs=7, overrides=["beta=4", "lr=0.1"], data_root="data", out=str(tmp_path))
    (teacher, run) = sweep.plan(spec)
    expected = apply_overrides(make_config("course", method="dkd", teacher="resnet56", student="resnet20",
                                           seed=3, epochs=7, data_root=os.path.abspath("data"),
                                           teachers_dir=str(tmp_path / "teachers")),
                               ["method_params.beta=4", "lr=0.1"])
    assert run.config.replace(out=None) == expected
    assert teacher.role == "teacher" and run.needs == str(teacher.run_dir)
    assert run.entry(tmp_path)["overrides"] == "beta=4.0 epochs=7 lr=0.1"
    assert run.entry(tmp_path)["config"] == expected.resolved().replace(out=str(run.run_dir)).to_dict()


@pytest.mark.parametrize("argv, message", [
    (["--methods", "kd,nope"], "unknown method 'nope'"),
    (["--methods", "kd", "--pairs", "resnet56"], "TEACHER:STUDENT"),
    (["--methods", "kd", "--pairs", "resnet56:resnet9"], "unknown student architecture 'resnet9'"),
    (["--methods", "kd", "--profile", "huge"], "unknown profile 'huge'"),
    (["--methods", "kd", "--dataset", "imagenet"], "unknown dataset 'imagenet'"),
    (["--methods", "kd", "--set", "lr"], "key=value"),
    (["--methods", "kd", "--set", "beta=2"], "unknown --set key 'beta'"),
    (["--methods", "kd", "--set", "lr=fast"], "lr must be a number"),
    (["--methods", "kd", "--set", "seed=3"], "grid dimension"),
    (["--methods", "kd", "--seeds", "0,x"], "seed"),
    (["--methods", "kd", "--teacher-checkpoint-dir", "/nonexistent"], "resnet20_vanilla/ckpt_epoch_240.pth"),
    (["--config", "nope"], "shipped grids: course, paper, smoke"),
])
def test_invalid_input_is_refused_before_anything_runs(tmp_path, capsys, argv, message):
    out = tmp_path / "sweep"
    assert cli.main(["sweep", *argv, "--out", str(out), "--executor", "inline"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: ") and message in err
    assert not out.exists()


def test_a_directory_holding_another_run_is_refused_before_anything_starts(tiny_teachers_dir, tmp_path):
    spec = tiny_spec(tmp_path, tiny_teachers_dir, methods=["kd"], seeds=[0, 1])
    seed0, seed1 = sweep.plan(spec)
    engine.train(seed0.config.replace(out=str(seed1.run_dir)), progress=False, verbose=False)  # in seed 1's place
    with pytest.raises(KDLibError, match=r"holds a different run \(seed: 0 -> 1"):
        sweep.run_sweep(spec, progress=False)
    assert not seed0.run_dir.exists()  # nothing started


def test_command_line_error_exits_2(tmp_path):
    out = tmp_path / "sweep"
    res = subprocess.run([sys.executable, "-m", "kdlib", "sweep", "--methods", "kd,dkdd", "--seeds", "0,1",
                          "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 2, res.stderr
    assert res.stderr.strip().splitlines()[-1].startswith("error: unknown method 'dkdd'")
    assert not out.exists()


# -- grid files ---------------------------------------------------------------------------------------
def test_yaml_grid_and_command_line_overrides(tmp_path):
    grid = tmp_path / "grid.yaml"
    grid.write_text("methods: [kd, dkd]\npairs: ['resnet56:resnet20', [wrn_40_2, wrn_16_2]]\nseeds: [0, 1, 2]\n"
                    "profile: course\nepochs: 5\nset: {lr: 0.1, beta: 3}\nworkers: 3\n"
                    "slurm: {partition: gpu, time: '02:30:00'}\n")
    args = cli.build_parser().parse_args(["sweep", "--config", str(grid), "--out", str(tmp_path / "o"),
                                          "--seeds", "4-5", "--set", "lr=0.2", "--slurm-gpus", "2"])
    spec = sweep.spec_from_args(args)
    assert spec.methods == ["kd", "dkd"] and spec.pairs == [("resnet56", "resnet20"), ("wrn_40_2", "wrn_16_2")]
    assert spec.seeds == [4, 5] and spec.epochs == 5 and spec.workers == 3  # flags win, the rest stays
    assert spec.slurm.partition == "gpu" and spec.slurm.time_min == 150 and spec.slurm.gpus == 2
    runs = [r for r in sweep.plan(spec) if r.role == "run"]
    assert len(runs) == 2 * 2 * 2 and {r.config.lr for r in runs} == {0.2}  # the flag's --set comes last
    assert {r.config.method_hparams()["beta"] for r in runs if r.config.method == "dkd"} == {3}

    grid.write_text("methods: [kd]\nsedes: [0]\n")
    with pytest.raises(KDLibError, match="unknown key 'sedes'"):
        sweep.spec_from_args(cli.build_parser().parse_args(["sweep", "--config", str(grid), "--out", "o"]))


def test_shipped_grids(tmp_path):
    assert sweep.grid_names() == ["course", "paper", "smoke"]
    paper = sweep.GridSpec.from_mapping({**sweep.load_grid("paper"), "out": str(tmp_path / "paper")})
    assert paper.profile == "paper" and paper.dataset == "cifar100" and paper.seeds == [0, 1, 2]
    assert paper.methods == ["vanilla", "kd", "dkd", "cwkd", "clkd", "rekd", "aekt", "dlkd", "dist", "nkd", "ctkd",
                             "mlkd"]
    assert set(paper.pairs) == {
        ("resnet56", "resnet20"), ("resnet110", "resnet32"), ("resnet32x4", "resnet8x4"), ("wrn_40_2", "wrn_16_2"),
        ("wrn_40_2", "wrn_40_1"), ("vgg13", "vgg8"), ("resnet32x4", "ShuffleV1"), ("wrn_40_2", "ShuffleV1"),
        ("vgg13", "MobileNetV2"), ("ResNet50", "MobileNetV2"), ("resnet32x4", "ShuffleV2")}
    # community layout: {dir}/{teacher}_vanilla/ckpt_epoch_240.pth
    ckpts = tmp_path / "cifar_teachers"
    for teacher in {t for t, _ in paper.pairs}:
        (ckpts / f"{teacher}_vanilla").mkdir(parents=True)
        (ckpts / f"{teacher}_vanilla" / "ckpt_epoch_240.pth").touch()
    paper.teacher_checkpoint_dir = str(ckpts)
    runs = sweep.plan(paper)
    assert len(runs) == 11 * 11 * 3 + 9 * 3  # 11 methods with a teacher x 11 pairs x 3 seeds + 9 students alone
    for run in runs:  # the checkpoints are given: no teacher to train
        assert run.role == "run" and run.config.epochs == 240 and run.config.train_per_class is None
        if run.config.uses_teacher:
            assert run.config.teacher_checkpoint == str(ckpts / f"{run.config.teacher}_vanilla" / "ckpt_epoch_240.pth")
    dkd = {(r.config.teacher, r.config.student): r.config.resolved().method_params["beta"] for r in runs
           if r.config.method == "dkd"}
    assert dkd[("resnet56", "resnet20")] == 2 and dkd[("vgg13", "vgg8")] == 6 and dkd[("resnet32x4", "ShuffleV2")] == 8
    for name in ("course", "smoke"):
        spec = sweep.GridSpec.from_mapping({**sweep.load_grid(name), "out": str(tmp_path / name)})
        assert sweep.plan(spec) and "vanilla" in spec.methods
    assert sweep.GridSpec.from_mapping(sweep.load_grid("smoke")).dataset == "synthetic"


# -- Slurm, without a cluster: fake sbatch/srun on PATH -------------------------------------------------
def test_slurm_array_submission(tiny_teachers_dir, tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 0\n")
    counter = tmp_path / "job_counter"
    (bin_dir / "sbatch").write_text(
        f"#!/bin/sh\nn=$(cat {counter} 2>/dev/null || echo 4241); n=$((n+1)); echo $n > {counter}\n"
        "echo \"Submitted batch job $n\"\n")
    for tool in ("srun", "sbatch"):
        (bin_dir / tool).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    out = tmp_path / "sweep"
    slurm = sweep.SlurmOptions(partition="gpu", gpus=1, cpus=2, time_min=90, array_parallelism=3)
    result = sweep.run_sweep(tiny_spec(out, tiny_teachers_dir, executor="slurm", slurm=slurm),
                             progress=False, wait=False)
    assert result.submitted == 4 and result.job_ids == ["4242"]  # one array: the teacher is cached
    script = (out / "submitit" / "4242_submission.sh").read_text()
    for flag in ("--array=0-3%3", "--partition=gpu", "--gpus-per-node=1", "--cpus-per-task=2", "--time=90",
                 "--job-name=kdlib-runs"):
        assert f"#SBATCH {flag}\n" in script
    assert set(sweep.read_summary(out)["status"]) == {"missing"}  # submitted, not started

    # a teacher to train: its run first, the grid's after it (afterany); two runs per task
    out2 = tmp_path / "sweep2"
    slurm.runs_per_task = 2
    result = sweep.run_sweep(tiny_spec(out2, tmp_path / "no_teachers", executor="slurm", slurm=slurm),
                             progress=False, wait=False)
    assert result.job_ids == ["4243", "4244"] and result.teachers == 1 and result.submitted == 4
    assert "--array" not in (out2 / "submitit" / "4243_submission.sh").read_text()  # a single job
    second = (out2 / "submitit" / "4244_submission.sh").read_text()
    assert "#SBATCH --array=0-1%2\n" in second and "#SBATCH --dependency=afterany:4243\n" in second

    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(KDLibError, match="Slurm"):
        sweep.run_sweep(tiny_spec(tmp_path / "sweep3", tiny_teachers_dir, executor="slurm"), progress=False)
    assert not (tmp_path / "sweep3").exists()


def test_slurm_time_limits():
    assert [sweep.parse_time_minutes(t) for t in (90, "90", "02:30", "02:30:00", "1-00:00:00", "0:00:30")] == \
        [90, 90, 150, 150, 1440, 1]
    with pytest.raises(KDLibError):
        sweep.parse_time_minutes("soon")


# -- summaries from hand-written records ---------------------------------------------------------------
def _fake_run(out: Path, method, teacher, student, seed, history_acc, finished=True, classes=None, **recipe):
    from kdlib.runs import run_directory

    cfg = make_config("paper", method=method, teacher=teacher, student=student, seed=seed, epochs=3,
                      teacher_checkpoint=None, **recipe)
    run_dir = run_directory(cfg, out)
    run_dir.mkdir(parents=True)
    classes = classes or [[50.0, 100.0, 0.0]] * len(history_acc)
    history = [{"epoch": e + 1, "test_acc": acc, "per_class_acc": pc, "epoch_seconds": 10.0}
               for e, (acc, pc) in enumerate(zip(history_acc, classes))]
    best = max(range(len(history_acc)), key=lambda i: (history_acc[i], -i))
    metrics = {
        "status": "finished" if finished else "interrupted",
        "config": {"run": cfg.resolved().replace(out=str(run_dir)).to_dict(),
                   "dataset": {"description": "fake", "class_names": ["apple", "bee", "cat"],
                               "superclass_names": ["fruit", "animal"], "class_to_superclass": [0, 1, 1]}},
        "history": history,
        "final": {"test_acc": history_acc[-1], "best_test_acc": history_acc[best], "best_epoch": best + 1,
                  "per_class_acc": classes[-1], "epochs": 3} if finished else None,
    }
    (run_dir / "metrics.json").write_text(json.dumps(metrics))
    return run_dir


def test_summary_and_aggregate_from_records(tmp_path):
    runs = {  # method, seed -> test accuracy per epoch
        ("kd", 0): [60.0, 71.5, 70.25], ("kd", 1): [61.0, 69.0, 72.0], ("kd", 2): [62.0, 73.0, 68.5],
        ("dkd", 0): [65.0, 74.0, 73.0], ("dkd", 1): [66.0, 72.5, 75.5],
    }
    dirs = {key: _fake_run(tmp_path, key[0], "resnet56", "resnet20", key[1], accs,
                           classes=[[50.0, 100.0, 0.0], [10.0 * key[1], 20.0, 30.0], [1.0 + key[1], 2.0, 3.0]])
            for key, accs in runs.items()}
    _fake_run(tmp_path, "kd", "resnet56", "resnet20", 3, [10.0, 20.0], finished=False)  # still running
    _fake_run(tmp_path, "vanilla", None, "resnet20", 0, [64.0, 69.0, 68.0])
    _fake_run(tmp_path, "kd", "resnet56", "resnet20", 0, [80.0, 81.0, 82.0], lr=0.1)  # --set lr=0.1
    failed = dirs[("dkd", 1)].with_name(dirs[("dkd", 1)].name.replace("-s1-", "-s2-"))
    failed.mkdir()
    (failed / sweep.ERROR).write_text(json.dumps({"error": "KDLibError: boom"}))

    summary = sweep.write_summary(tmp_path)
    assert len(summary) == len(sweep.read_summary(tmp_path)) == len(runs) + 4
    status = {(m, s, o): st for m, s, o, st in zip(summary["method"], summary["seed"], summary["overrides"],
                                                   summary["status"])}
    assert status[("kd", 3, "epochs=3")] == "incomplete" and status[("dkd", 2, "")] == "failed"
    assert status[("kd", 0, "epochs=3 lr=0.1")] == "finished" and status[("vanilla", 0, "epochs=3")] == "finished"
    kd0 = summary[(summary["method"] == "kd") & (summary["seed"] == 0) & (summary["overrides"] == "epochs=3")].iloc[0]
    assert (kd0.best_test_acc, kd0.last_test_acc, kd0.best_epoch, kd0.wall_seconds) == (71.5, 70.25, 2, 30.0)
    assert kd0.run_dir == dirs[("kd", 0)].relative_to(tmp_path).as_posix()

    agg = sweep.aggregate(sweep.read_summary(tmp_path)).set_index(["method", "overrides"])
    for method in ("kd", "dkd"):
        best = [max(accs) for (m, _), accs in runs.items() if m == method]
        last = [accs[-1] for (m, _), accs in runs.items() if m == method]
        row = agg.loc[(method, "epochs=3")]
        assert row.n == len(best) and row.teacher == "resnet56" and row.student == "resnet20"
        assert row.best_mean == pytest.approx(statistics.mean(best))
        assert row.best_std == pytest.approx(statistics.stdev(best))
        assert row.last_mean == pytest.approx(statistics.mean(last))
        assert row.last_std == pytest.approx(statistics.stdev(last))
        assert row.best == f"{statistics.mean(best):.2f} ± {statistics.stdev(best):.2f}"
    assert agg.loc[("kd", "epochs=3 lr=0.1")].n == 1 and agg.loc[("kd", "epochs=3 lr=0.1")].best_mean == 82.0
    assert agg.loc[("vanilla", "epochs=3")].n == 1 and agg.loc[("vanilla", "epochs=3")].teacher == ""
    assert agg["recipe"].nunique() == len(agg)  # one recipe per row: the seeds of one recipe, averaged
    assert (tmp_path / "aggregate.csv").is_file()

    table = sweep.per_class_table(tmp_path)
    assert list(table.columns[:10]) == ["run", "method", "teacher", "student", "seed", "recipe", "class",
                                        "class_name", "superclass", "acc"]
    assert len(table) == 3 * (len(runs) + 2)  # finished runs only, three classes each
    kd1 = table[(table["run"] == dirs[("kd", 1)].relative_to(tmp_path).as_posix())].set_index("class")
    assert list(kd1["acc"]) == [2.0, 2.0, 3.0] and list(kd1["class_name"]) == ["apple", "bee", "cat"]
    assert list(kd1["superclass"]) == ["fruit", "animal", "animal"]
