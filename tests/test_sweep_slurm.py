"""The sweep on a real Slurm cluster: jobs scheduled, run, requeued, cancelled by Slurm itself.

Uses the one-node cluster of ``tests/slurm/cluster.sh`` (``.ci/run`` starts it), or any cluster whose
``sinfo`` answers. Without one the tests are skipped, with the reason. Runs are tiny (synthetic data, resnet8,
a few epochs, one CPU and one thread per task) so that two tasks run at once on a 2-core machine.
"""
from __future__ import annotations

import json
import subprocess
import threading
import time
from pathlib import Path

import pytest

from conftest import slurm_cluster_reason
from kdlib import sweep
from kdlib.errors import KDLibError
from kdlib.runs import RunJob
from kdlib.runs import slurm as sweep_slurm

from test_sweep import tiny_spec

REASON = slurm_cluster_reason()
pytestmark = [pytest.mark.slow, pytest.mark.skipif(bool(REASON), reason=REASON),
              pytest.mark.xdist_group("slurm")]  # one cluster: its tests run one after another

#: one CPU per task (two at once on 2 cores), no GPU, a few minutes at most
SLURM = dict(gpus=0, cpus=1, time_min=10)
#: a run of a few seconds per epoch (vanilla: no teacher), long enough to be interrupted between epochs
LONG_SET = ["train_per_class=6", "test_per_class=2"]
#: the interrupted runs: 5 epochs, interrupted once 2 are recorded
LONG_RUN = dict(methods=["vanilla"], seeds=[0], epochs=5, overrides=LONG_SET)


@pytest.fixture(autouse=True)
def fast_polling(monkeypatch):
    monkeypatch.setattr(sweep_slurm, "POLL_SECONDS", 1.0)


def slurm_spec(out, teachers_dir, **changes):
    slurm = sweep.SlurmOptions(**{**SLURM, **changes.pop("slurm", {})})
    return tiny_spec(out, teachers_dir, executor="slurm", slurm=slurm, **changes)


def queued(job_id: str):
    done = subprocess.run(["squeue", "-h", "-r", "-o", "%i %T", "-j", job_id], capture_output=True, text=True)
    return dict(line.split() for line in done.stdout.splitlines()) if done.returncode == 0 else {}


def wait_until(condition, timeout=240.0, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


def epochs_done(run_dir: Path) -> int:
    try:
        return len(json.loads((run_dir / "metrics.json").read_text())["history"])
    except (OSError, ValueError, KeyError):
        return 0


def metrics(run_dir: Path):
    return json.loads((run_dir / "metrics.json").read_text())


def test_bad_slurm_options_are_refused_before_submission(tmp_path, tiny_teachers_dir):
    cases = [({"partition": "nope"}, r"--slurm-partition nope: no such partition on this cluster; choose one of"),
             ({"gpus": 1}, r"--slurm-gpus 1: partition \S+ has no GPUs .*use --slurm-gpus 0"),
             ({"cpus": 4096}, r"--slurm-cpus 4096: the nodes of partition \S+ have at most \d+ CPUs")]
    for changes, message in cases:
        out = tmp_path / "x"
        with pytest.raises(KDLibError, match=message):
            sweep.run_sweep(slurm_spec(out, tiny_teachers_dir, slurm=changes), progress=False)
        assert not out.exists()  # refused before anything was written or submitted
    from kdlib import cli

    assert cli.main(["sweep", "--methods", "kd", "--executor", "slurm", "--slurm-time", "0", "--slurm-gpus", "0",
                     "--out", str(tmp_path / "y")]) == 2
    assert not (tmp_path / "y").exists()


def test_real_jobs_teacher_then_array_equal_the_local_executor(tmp_path):
    """2 methods x 1 pair x 2 seeds, teacher to train: a teacher job, then the array after it."""
    start = time.monotonic()
    out = tmp_path / "slurm"
    result = sweep.run_sweep(slurm_spec(out, tmp_path / "teachers_slurm"), progress=False)
    assert result.ok and result.submitted == 4 and result.teachers == 1 and len(result.job_ids) == 2
    second = (out / "submitit" / f"{result.job_ids[1]}_submission.sh").read_text()
    assert f"#SBATCH --dependency=afterany:{result.job_ids[0]}\n" in second
    assert "--gpus" not in second and "#SBATCH --cpus-per-task=1\n" in second
    summary = sweep.read_summary(out)
    assert len(summary) == 4 and set(summary["status"]) == {"finished"}
    slurm_took = time.monotonic() - start

    local = tmp_path / "local"  # its own teacher too; two workers of one thread each, as on the cluster
    ref = sweep.run_sweep(tiny_spec(local, tmp_path / "teachers_local", executor="local", workers=2,
                                    slurm=sweep.SlurmOptions(**SLURM)), progress=False)
    assert ref.ok
    mine = summary.set_index(["method", "seed"]).sort_index()
    theirs = sweep.read_summary(local).set_index(["method", "seed"]).sort_index()
    for column in ("best_test_acc", "last_test_acc", "best_epoch"):
        assert list(mine[column]) == list(theirs[column])  # the same numbers, to the last bit
    for row in summary.itertuples():  # one explicit thread count under both executors, recorded
        assert [s["threads"] for s in metrics(out / row.run_dir)["segments"]] == [1]
        assert [s["threads"] for s in metrics(local / row.run_dir)["segments"]] == [1]

    again = sweep.run_sweep(slurm_spec(out, tmp_path / "teachers_slurm"), progress=False)
    assert again.ok and again.submitted == 0 and again.job_ids == [] and again.skipped == 4
    print(f"\n[one-node Slurm, 2 shared cores] teacher + 4 runs: {slurm_took:.1f} s")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """:data:`LONG_RUN` uninterrupted, inline (one thread: the grid's thread count), once for the module."""
    folder = tmp_path_factory.mktemp("reference")
    spec = tiny_spec(folder / "ref", folder / "t", executor="inline", slurm=sweep.SlurmOptions(**SLURM), **LONG_RUN)
    assert sweep.run_sweep(spec, progress=False).ok
    (run,) = sweep.plan(spec)
    return metrics(run.run_dir)


def _same_numbers(a, b):
    timing = ("wall_seconds", "epoch_seconds", "seconds")
    assert {k: v for k, v in a["final"].items() if k not in timing} == \
        {k: v for k, v in b["final"].items() if k not in timing}
    assert [h["test_acc"] for h in a["history"]] == [h["test_acc"] for h in b["history"]]
    assert [h.get("train_loss") for h in a["history"]] == [h.get("train_loss") for h in b["history"]]


@pytest.mark.parametrize("how", ["scontrol requeue", "time-limit signal"])
def test_requeued_task_resumes_and_ends_identical(tmp_path, how, uninterrupted):
    """``time-limit signal``: the signal Slurm sends ``--signal``'s seconds before a task's time limit,
    sent by hand (``scancel --signal=USR2``) rather than after a real minute-long limit, to keep the test
    short; from there on it is submitit's time-limit path (its log says "timed-out")."""
    spec = slurm_spec(tmp_path / "sweep", tmp_path / "t", **LONG_RUN)
    result = sweep.run_sweep(spec, progress=False, wait=False)
    (job_id,) = result.job_ids
    (planned,) = sweep.plan(spec)
    wait_until(lambda: epochs_done(planned.run_dir) >= 2, what="two epochs")
    if how == "scontrol requeue":  # what preemption does: the task is killed and queued again
        subprocess.run(["scontrol", "requeue", job_id], check=True)
    else:  # the warning Slurm sends --signal's seconds before the time limit: submitit checkpoints, requeues
        subprocess.run(["scancel", "--signal=USR2", job_id], check=True)
    wait_until(lambda: not queued(job_id), timeout=300, what="the requeued job to end")
    done = metrics(planned.run_dir)
    assert done["final"] and [h["epoch"] for h in done["history"]] == list(range(1, 6))
    starts = [s["start_epoch"] for s in done["segments"]]
    assert len(starts) == 2 and starts[0] == 1 and starts[1] > 2  # resumed after its last epoch, not restarted
    _same_numbers(done, uninterrupted)
    if how == "time-limit signal":
        log = "".join(p.read_text() for p in (tmp_path / "sweep" / "submitit").glob(f"{job_id}*_log.err"))
        assert "timed-out" in log and "requeue" in log.lower()


def test_cancelled_task_leaves_the_others_and_says_how_to_resume(tmp_path):
    spec = slurm_spec(tmp_path / "sweep", tmp_path / "t", **{**LONG_RUN, "seeds": [0, 1]})
    runs = {r.config.seed: r for r in sweep.plan(spec)}
    box = {}
    waiter = threading.Thread(target=lambda: box.update(result=sweep.run_sweep(spec, progress=False)))
    waiter.start()
    wait_until(lambda: epochs_done(runs[1].run_dir) >= 1 and epochs_done(runs[0].run_dir) >= 1, what="both running")
    job_id = (tmp_path / "sweep" / "submitit").glob("*_submission.sh").__next__().name.split("_")[0]
    subprocess.run(["scancel", f"{job_id}_1"], check=True)
    waiter.join(timeout=300)
    result = box["result"]
    rows = result.summary.set_index("seed")
    assert rows.loc[0, "status"] == "finished" and rows.loc[1, "status"] == "incomplete" and not result.ok
    error = rows.loc[1, "error"]
    assert "resume with: python -m kdlib sweep" in error and f"--out {tmp_path / 'sweep'}" in error
    assert sweep.read_summary(tmp_path / "sweep").set_index("seed").loc[1, "error"] == error
    # the command it names resumes the run
    resumed = sweep.run_sweep(spec, progress=False)
    assert resumed.ok and resumed.submitted == 1
    assert metrics(runs[1].run_dir)["segments"][-1]["start_epoch"] > 1


def test_two_tasks_given_the_same_run_train_it_once(tmp_path, tiny_teachers_dir):
    spec = slurm_spec(tmp_path / "sweep", tiny_teachers_dir, **{**LONG_RUN, "epochs": 2}).normalised()
    (run,) = sweep.plan(spec)
    executor = sweep_slurm.executor(spec.slurm, tmp_path / "sweep")
    jobs = executor.submit_array([RunJob([run], 1) for _ in range(2)])
    wait_until(lambda: not queued(str(jobs[0].job_id).split("_")[0]), what="both tasks to end")
    import pickle

    statuses = sorted(pickle.loads(job.paths.result_pickle.read_bytes())[1][0]["status"] for job in jobs)
    # both start at once (two CPUs): one trains, the other finds the lock taken; had the second started
    # after the first ended, it would find the run finished. Either way the run is trained once.
    assert statuses in (["finished", "locked"], ["finished", "finished"])
    print(f"\ntwo tasks, one run: {statuses}")
    assert len(metrics(run.run_dir)["segments"]) == 1  # trained once, by one task
