"""The ``slurm`` executor: submitit array jobs on a Slurm cluster.

Before anything is submitted the options are checked against the cluster itself (``sinfo``): an unknown
partition, more CPUs than a node has, a time limit above the partition's, or GPUs asked of a partition
without any are refused with one line saying what to change, instead of sbatch's raw error.

While it waits, the sweep asks ``squeue`` which of its tasks are still queued or running, not submitit's
``sacct`` watcher: clusters without accounting storage have no sacct, and a task that Slurm requeued
(preemption, ``scontrol requeue``, submitit's requeue at the time limit) is still in the queue and not
over, even when its previous attempt left a result file behind. A task that leaves the queue without
a result (cancelled, killed, node failure) is recorded as not finished, with the command that resumes it.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Set, Tuple

from kdlib.errors import KDLibError
from kdlib.sweep.common import JOBS_DIR
from kdlib.sweep.executors import _Outcome, _Progress, _job_outcome, _teacher_pending
from kdlib.sweep.grid import GridSpec
from kdlib.sweep.jobs import RunJob, _last_line, _write_error
from kdlib.sweep.planning import PlannedRun


def slurm_parameters(spec: GridSpec) -> Dict[str, Any]:
    """submitit AutoExecutor parameters of each array task (generic names, ``slurm_`` for the rest)."""
    s = spec.slurm
    params: Dict[str, Any] = {
        "name": "kdlib-sweep", "timeout_min": s.time_min, "cpus_per_task": s.cpus,
        "tasks_per_node": 1, "nodes": 1, "slurm_array_parallelism": s.array_parallelism,
        # submitit's warning signal (USR2) before the time limit: it checkpoints and requeues the task.
        # 90 s by default; a short limit gets a quarter of it, else the warning would come at the start
        "slurm_signal_delay_s": min(90, max(10, s.time_min * 60 // 4)),
    }
    if s.gpus:
        params["gpus_per_node"] = s.gpus
    if s.partition:
        params["slurm_partition"] = s.partition
    if s.mem_gb is not None:
        params["mem_gb"] = s.mem_gb
    if s.account:
        params["slurm_account"] = s.account
    if s.qos:
        params["slurm_qos"] = s.qos
    return params


#: seconds between two looks at the queue while the sweep waits for its jobs
POLL_SECONDS = 10.0


def _slurm_tool(name: str) -> Optional[str]:
    """``name`` from the same Slurm installation as ``sbatch`` (the directory sbatch is in), or None.

    The cluster that is queried must be the one that receives the jobs; a lone sbatch (a wrapper, or a
    test's fake) without its siblings means there is no cluster to ask, and the checks are skipped.
    """
    sbatch = shutil.which("sbatch")
    if sbatch is None:
        return None
    path = Path(sbatch).parent / name
    return str(path) if path.is_file() and os.access(path, os.X_OK) else None


def _sinfo(*args: str) -> Optional[List[str]]:
    tool = _slurm_tool("sinfo")
    if tool is None:
        return None
    try:
        done = subprocess.run([tool, "-h", *args], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.splitlines() if done.returncode == 0 else None


def _minutes(limit: str) -> Optional[int]:
    """sinfo's time limits (``infinite``, ``1-00:00:00``, ``30:00``) in minutes; None for no limit."""
    limit = limit.strip()
    if limit in ("infinite", "n/a", "UNLIMITED", ""):
        return None
    match = re.fullmatch(r"(?:(\d+)-)?(?:(\d+):)?(\d+):(\d+)", limit)
    if not match:
        return None
    days, hours, mins, secs = (int(x or 0) for x in match.groups())
    return days * 1440 + hours * 60 + mins + (1 if secs else 0)


def check_slurm_options(spec: GridSpec) -> None:
    """Refuse, with one line saying what to change, Slurm options this cluster cannot honour.

    Asks ``sinfo`` for the partitions, their nodes' CPUs and generic resources (GRES) and their time
    limits. Nothing is checked when there is no ``sinfo`` beside ``sbatch`` or it does not answer (the
    submission then reports what it reports).
    """
    s = spec.slurm
    lines = _sinfo("-o", "%P|%c|%G|%l")
    if not lines:
        return
    partitions: Dict[str, Dict[str, Any]] = {}
    default = None
    for line in lines:
        name, cpus, gres, limit = (line.split("|") + ["", "", "", ""])[:4]
        if name.endswith("*"):
            name = name[:-1]
            default = name
        info = partitions.setdefault(name, {"cpus": 0, "gpus": 0, "limit": _minutes(limit)})
        info["cpus"] = max(info["cpus"], int(re.sub(r"\D.*", "", cpus) or 0))
        gpus = [int(n) for n in re.findall(r"gpu(?::[^:,(]+)?:(\d+)", gres)]
        info["gpus"] = max(info["gpus"], max(gpus, default=0))
    names = sorted(partitions)
    if s.partition is None and default is None:
        raise KDLibError(f"this cluster has no default partition: choose one with --slurm-partition "
                         f"({', '.join(names)})")
    part = s.partition or default
    if part not in partitions:
        raise KDLibError(f"--slurm-partition {part}: no such partition on this cluster; choose one of "
                         f"{', '.join(names)}")
    info = partitions[part]
    if s.gpus and info["gpus"] == 0:
        with_gpus = [n for n in names if partitions[n]["gpus"]]
        where = f" or a partition with GPUs ({', '.join(with_gpus)})" if with_gpus else ""
        raise KDLibError(f"--slurm-gpus {s.gpus}: partition {part} has no GPUs (no gres/gpu on its nodes); "
                         f"use --slurm-gpus 0{where}")
    if s.gpus > info["gpus"] > 0:
        raise KDLibError(f"--slurm-gpus {s.gpus}: the nodes of partition {part} have at most {info['gpus']} "
                         f"GPUs; use --slurm-gpus {info['gpus']} or fewer")
    if info["cpus"] and s.cpus > info["cpus"]:
        raise KDLibError(f"--slurm-cpus {s.cpus}: the nodes of partition {part} have at most {info['cpus']} "
                         f"CPUs; use --slurm-cpus {info['cpus']} or fewer")
    if info["limit"] is not None and s.time_min > info["limit"]:
        raise KDLibError(f"--slurm-time {s.time_min} (minutes): partition {part} allows at most "
                         f"{info['limit']} minutes; use --slurm-time {info['limit']} or less (runs resume when "
                         f"requeued)")


def _slurm_executor(spec: GridSpec, out: Path):
    import submitit

    try:
        executor = submitit.AutoExecutor(folder=str(out / JOBS_DIR), cluster="slurm")
    except RuntimeError as exc:  # no srun on this machine
        raise KDLibError(f"--executor slurm: {exc}; use --executor local on a machine without Slurm") from None
    try:
        executor.update_parameters(**slurm_parameters(spec))
    except (ValueError, NameError, AssertionError) as exc:
        raise KDLibError(f"invalid Slurm parameters: {_last_line(exc)}") from None
    check_slurm_options(spec)
    return executor


def _submit_slurm(runs: List[PlannedRun], spec: GridSpec, executor) -> List[Tuple[Any, PlannedRun]]:
    """Two array jobs when teachers must be trained: first one run per missing teacher (it trains and
    caches the teacher), then the rest, starting after the first array (``afterany``: a failed teacher
    is retried by the runs that need it instead of leaving them pending forever)."""
    threads = spec.run_threads()
    first: List[PlannedRun] = []
    seen: set = set()
    for run in runs:
        teacher = _teacher_pending(run)
        if teacher is not None and teacher not in seen:
            seen.add(teacher)
            first.append(run)
    rest = [run for run in runs if run not in first]
    submitted: List[Tuple[Any, PlannedRun]] = []
    dependency = None
    for group in (first, rest):
        if not group:
            continue
        if dependency:
            executor.update_parameters(slurm_dependency=dependency)
        jobs = executor.submit_array([RunJob(run.config.to_dict(), threads) for run in group])
        submitted.extend(zip(jobs, group))
        dependency = f"afterany:{str(jobs[0].job_id).split('_')[0]}"
    return submitted


def _queued(job_ids: List[str]) -> Optional[Set[str]]:
    """Ids (``123`` or ``123_4``) of the given jobs' tasks Slurm still holds (pending, running, requeued,
    completing); None when ``squeue`` does not answer this time."""
    tool = _slurm_tool("squeue") or shutil.which("squeue")
    if tool is None or not job_ids:
        return None
    try:
        done = subprocess.run([tool, "-h", "-r", "-o", "%i", "-j", ",".join(job_ids)], capture_output=True,
                              text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if done.returncode != 0:  # an id Slurm has forgotten already makes squeue fail: ask one by one
        found: Set[str] = set()
        for job_id in job_ids:
            try:
                one = subprocess.run([tool, "-h", "-r", "-o", "%i", "-j", job_id], capture_output=True,
                                     text=True, timeout=60)
            except (OSError, subprocess.TimeoutExpired):
                return None
            if one.returncode == 0:
                found.update(one.stdout.split())
            elif "invalid job id" not in one.stderr.lower():  # the controller did not answer: ask again later
                return None
        return found
    return set(done.stdout.split())


def _job_state(job_id: str) -> str:
    """Slurm's last word on a job that left the queue (``CANCELLED``, ``TIMEOUT``, ...), or ``unknown``."""
    tool = _slurm_tool("scontrol") or shutil.which("scontrol")
    if tool is None:
        return "unknown"
    try:
        done = subprocess.run([tool, "show", "job", "-o", job_id], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    match = re.search(r"JobState=(\S+)", done.stdout)
    return match.group(1) if match else "unknown"


def _slurm_outcome(run: PlannedRun, job: Any, queued: Set[str], resume: str) -> Optional[_Outcome]:
    """What one task says once Slurm no longer holds it, or None while it is queued or running.

    A result that says the run did not finish (the engine stopped at a signal: cancelled, not requeued)
    and a task that ended without any result are both written to ``sweep_error.json`` with the command
    that resumes the run, so the summary shows it as not finished and how to go on.
    """
    if str(job.job_id) in queued:
        return None
    outcome = _job_outcome(run, job) if job.paths.result_pickle.exists() else None
    if outcome is not None and outcome.status == "finished":
        return outcome
    if outcome is None:
        state = _job_state(str(job.job_id))
        outcome = _Outcome(run, "incomplete", f"Slurm job {job.job_id} ended without a result ({state})",
                           str(job.paths.stderr))
    if outcome.status in ("locked", "failed"):  # locked: the task that holds the run will tell; failed:
        return outcome  # the error (and its traceback) is recorded already, and retrying needs a fix first
    message = f"{outcome.error}; resume with: {resume}"
    _write_error(run.run_dir, message, log=outcome.log, status=outcome.status)
    return _Outcome(run, outcome.status, message, outcome.log)


def _wait_jobs(submitted: List[Tuple[Any, PlannedRun]], bar: _Progress, poll: float,
               resume: str = "the same sweep command") -> List[_Outcome]:
    outcomes: List[_Outcome] = []
    waiting = list(submitted)
    while waiting:
        queued = _queued(sorted({str(job.job_id).split("_")[0] for job, _ in waiting}))
        still = []
        for job, run in waiting:
            # no squeue answer (no squeue at all): submitit's own watcher decides
            outcome = _slurm_outcome(run, job, queued, resume) if queued is not None else _job_outcome(run, job)
            if outcome is None:
                still.append((job, run))
            else:
                outcomes.append(outcome)
                bar.done(outcome)
        waiting = still
        if waiting:
            time.sleep(poll)
    return outcomes
