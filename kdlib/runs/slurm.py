"""The Slurm executor: submitit array jobs, the teachers' array first and the students' after it.

Before anything is submitted the options are checked against the cluster itself (``sinfo``): an unknown
partition, more CPUs than a node has, a time limit above the partition's, or GPUs asked of a partition
without any are refused with one line saying what to change, instead of sbatch's raw error.

While it waits, the executor asks ``squeue`` which of its tasks are still queued or running, not
submitit's ``sacct`` watcher: clusters without accounting storage have no sacct, and a task that Slurm
requeued (preemption, ``scontrol requeue``, submitit's requeue at the time limit) is still in the queue
and not over, even when its previous attempt left a result file behind. A task that leaves the queue
without a result (cancelled, killed, node failure) leaves its runs not finished, with the command that
resumes them.
"""
from __future__ import annotations

import dataclasses
import math
import os
import re
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Set, Tuple

from kdlib.errors import KDLibError
from kdlib.runs.executors import Outcome, Progress, RunJob, job_outcome, last_line, write_error
from kdlib.runs.plan import Run

#: seconds between two looks at the queue while waiting for the jobs
POLL_SECONDS = 10.0


@dataclass
class SlurmOptions:
    """Resources of each array task (submitit's AutoExecutor parameters); ``runs_per_task`` runs one
    after the other in one task (tiny runs then do not each pay for a job's start)."""

    partition: Optional[str] = None
    gpus: int = 1
    cpus: int = 4
    time_min: int = 24 * 60
    array_parallelism: int = 16
    mem_gb: Optional[float] = None
    account: Optional[str] = None
    qos: Optional[str] = None
    runs_per_task: int = 1

    @classmethod
    def from_mapping(cls, value: Any, where: str = "") -> "SlurmOptions":
        data = dict(dataclasses.asdict(value) if isinstance(value, SlurmOptions) else value or {})
        if not isinstance(value, (Mapping, SlurmOptions, type(None))):
            raise KDLibError(f"{where}slurm must be a mapping (partition, gpus, cpus, time, ...)")
        if "time" in data:
            data["time_min"] = parse_time_minutes(data.pop("time"))
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(data) - set(names))
        if unknown:
            raise KDLibError(f"{where}unknown slurm key {', '.join(map(repr, unknown))}; valid: "
                             f"{', '.join(n if n != 'time_min' else 'time' for n in names)}")
        opts = cls(**{k: v for k, v in data.items() if v is not None})
        if isinstance(opts.gpus, bool) or not isinstance(opts.gpus, int) or opts.gpus < 0:
            raise KDLibError(f"{where}slurm gpus must be an integer >= 0, got {opts.gpus!r}")
        for name in ("cpus", "time_min", "array_parallelism", "runs_per_task"):
            number = getattr(opts, name)
            if isinstance(number, bool) or not isinstance(number, int) or number < 1:
                raise KDLibError(f"{where}slurm {name} must be an integer >= 1, got {number!r}")
        return opts

    def parameters(self) -> Dict[str, Any]:
        """submitit AutoExecutor parameters of each array task (generic names, ``slurm_`` for the rest)."""
        params: Dict[str, Any] = {
            "name": "kdlib-runs", "timeout_min": self.time_min, "cpus_per_task": self.cpus,
            "tasks_per_node": 1, "nodes": 1, "slurm_array_parallelism": self.array_parallelism,
            # submitit's warning signal (USR2) before the time limit: it checkpoints and requeues the task.
            # 90 s by default; a short limit gets a quarter of it, else the warning would come at the start
            "slurm_signal_delay_s": min(90, max(10, self.time_min * 60 // 4)),
        }
        optional = {"gpus_per_node": self.gpus or None, "slurm_partition": self.partition, "mem_gb": self.mem_gb,
                    "slurm_account": self.account, "slurm_qos": self.qos}
        return {**params, **{k: v for k, v in optional.items() if v is not None}}


def parse_time_minutes(value: Any) -> int:
    """Slurm-style time limits as whole minutes: ``90``, ``"90"``, ``"HH:MM:SS"``, ``"D-HH:MM"``."""
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    match = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", str(value).strip())
    if not match:
        raise KDLibError(f"slurm time must be minutes or [D-]HH:MM[:SS], got {value!r}")
    days, first, second, third = match.groups()
    if second is None and days is None:
        minutes = int(first)
    elif third is None and days is None:  # HH:MM... slurm reads "MM:SS" here; people mean HH:MM
        minutes = int(first) * 60 + int(second)
    else:
        minutes = int(days or 0) * 1440 + int(first) * 60 + int(second or 0) + math.ceil(int(third or 0) / 60)
    if minutes < 1:
        raise KDLibError(f"slurm time {value!r}: a time limit must be at least one minute; use e.g. --slurm-time 90 "
                         f"(minutes) or 24:00:00")
    return minutes


def _tool(name: str) -> Optional[str]:
    """``name`` from the same Slurm installation as ``sbatch`` (the directory sbatch is in), or None.

    The cluster that is queried must be the one that receives the jobs; a lone sbatch (a wrapper, or a
    test's fake) without its siblings means there is no cluster to ask, and the checks are skipped.
    """
    sbatch = shutil.which("sbatch")
    path = Path(sbatch).parent / name if sbatch else None
    return str(path) if path is not None and path.is_file() and os.access(path, os.X_OK) else None


def _ask(tool: Optional[str], *args: str) -> Optional[subprocess.CompletedProcess]:
    if tool is None:
        return None
    try:
        return subprocess.run([tool, *args], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None


def _minutes(limit: str) -> Optional[int]:
    """sinfo's time limits (``infinite``, ``1-00:00:00``, ``30:00``) in minutes; None for no limit."""
    match = re.fullmatch(r"(?:(\d+)-)?(?:(\d+):)?(\d+):(\d+)", limit.strip())
    if not match:
        return None
    days, hours, mins, secs = (int(x or 0) for x in match.groups())
    return days * 1440 + hours * 60 + mins + (1 if secs else 0)


def _partitions() -> Tuple[Dict[str, Dict[str, Any]], Optional[str]]:
    """Per partition: the most CPUs and GPUs of a node and the time limit; and the default partition."""
    done = _ask(_tool("sinfo"), "-h", "-o", "%P|%c|%G|%l")
    partitions: Dict[str, Dict[str, Any]] = {}
    default = None
    for line in done.stdout.splitlines() if done is not None and done.returncode == 0 else []:
        name, cpus, gres, limit = (line.split("|") + ["", "", "", ""])[:4]
        if name.endswith("*"):
            name = default = name[:-1]
        info = partitions.setdefault(name, {"cpus": 0, "gpus": 0, "limit": _minutes(limit)})
        info["cpus"] = max(info["cpus"], int(re.sub(r"\D.*", "", cpus) or 0))
        info["gpus"] = max(info["gpus"], max((int(n) for n in re.findall(r"gpu(?::[^:,(]+)?:(\d+)", gres)), default=0))
    return partitions, default


def check_options(s: SlurmOptions) -> None:
    """Refuse, with one line saying what to change, options this cluster cannot honour (nothing is
    checked when there is no ``sinfo`` beside ``sbatch`` or it does not answer)."""
    partitions, default = _partitions()
    if not partitions:
        return
    names = sorted(partitions)
    if s.partition is None and default is None:
        raise KDLibError(f"this cluster has no default partition: choose one with --slurm-partition ({', '.join(names)})")
    part = s.partition or default
    if part not in partitions:
        raise KDLibError(f"--slurm-partition {part}: no such partition on this cluster; choose one of {', '.join(names)}")
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
        raise KDLibError(f"--slurm-time {s.time_min} (minutes): partition {part} allows at most {info['limit']} "
                         f"minutes; use --slurm-time {info['limit']} or less (runs resume when requeued)")


def executor(options: SlurmOptions, folder: Path):
    """A submitit AutoExecutor for Slurm with ``options``, checked against the cluster first."""
    import submitit

    try:
        ex = submitit.AutoExecutor(folder=str(folder), cluster="slurm")
    except RuntimeError as exc:  # no srun on this machine
        raise KDLibError(f"--executor slurm: {exc}; use --executor local on a machine without Slurm") from None
    try:
        ex.update_parameters(**options.parameters())
    except (ValueError, NameError, AssertionError) as exc:
        raise KDLibError(f"invalid Slurm parameters: {last_line(exc)}") from None
    check_options(options)
    return ex


def submit(runs: List[Run], options: Any, folder: Path,
           threads: Optional[int]) -> Tuple[List[Tuple[Any, List[Run]]], List[str]]:
    """The teacher runs as one array, the others as a second array that starts after it (``afterany``: a
    failed teacher is retried by the runs that need it instead of leaving them pending forever); each
    task runs ``runs_per_task`` runs. Returns the (job, its runs) pairs and the job ids."""
    options = options if isinstance(options, SlurmOptions) else SlurmOptions.from_mapping(options)
    ex = executor(options, folder)  # a fresh one: a dependency set for one call must not reach the next
    submitted, job_ids, dependency = [], [], None
    for group in ([r for r in runs if r.role == "teacher"], [r for r in runs if r.role != "teacher"]):
        if not group:
            continue
        if dependency:
            ex.update_parameters(slurm_dependency=dependency)
        tasks = [group[i:i + options.runs_per_task] for i in range(0, len(group), options.runs_per_task)]
        jobs = ex.submit_array([RunJob(task, threads) for task in tasks])
        submitted += list(zip(jobs, tasks))
        job_ids.append(str(jobs[0].job_id).split("_")[0])
        dependency = f"afterany:{job_ids[-1]}"
    return submitted, job_ids


def _queued(job_ids: List[str]) -> Optional[Set[str]]:
    """Ids (``123`` or ``123_4``) of the given jobs' tasks Slurm still holds (pending, running, requeued,
    completing); None when ``squeue`` does not answer this time."""
    tool = _tool("squeue") or shutil.which("squeue")
    done = _ask(tool, "-h", "-r", "-o", "%i", "-j", ",".join(job_ids)) if job_ids else None
    if done is None:
        return None
    if done.returncode == 0:
        return set(done.stdout.split())
    found: Set[str] = set()  # an id Slurm has forgotten already makes squeue fail: ask one by one
    for job_id in job_ids:
        one = _ask(tool, "-h", "-r", "-o", "%i", "-j", job_id)
        if one is None or (one.returncode != 0 and "invalid job id" not in one.stderr.lower()):
            return None  # the controller did not answer: ask again later
        found.update(one.stdout.split() if one.returncode == 0 else [])
    return found


def _task_outcome(job: Any, runs: List[Run], queued: Set[str], resume: str) -> Optional[List[Outcome]]:
    """What one task says once Slurm no longer holds it, or None while it is queued or running.

    A run the task did not finish (the engine stopped at a signal; the task ended without a result) gets
    ``run_error.json`` with the command that resumes it, so the summary says how to go on; a failed run
    keeps its own error (retrying needs a fix first).
    """
    if str(job.job_id) in queued:
        return None
    done = job_outcome(runs, job) if job.paths.result_pickle.exists() else None
    if done is None:
        done = _ask(_tool("scontrol") or shutil.which("scontrol"), "show", "job", "-o", str(job.job_id))
        state = re.search(r"JobState=(\S+)", done.stdout if done is not None else "")
        message = f"Slurm job {job.job_id} ended without a result ({state.group(1) if state else 'unknown'})"
        done = [Outcome(run, "finished" if run.finished() else "incomplete", message, str(job.paths.stderr))
                for run in runs]
    out = []
    for o in done:
        if o.status == "incomplete":
            o = Outcome(o.run, o.status, f"{o.error}; resume with: {resume}", o.log)
            write_error(o.run.run_dir, o.error, log=o.log, status="incomplete")
        out.append(o)
    return out


def wait(submitted: List[Tuple[Any, List[Run]]], bar: Progress, resume: str = "the same command",
         poll: Optional[float] = None) -> List[Outcome]:
    """Follow the tasks until Slurm holds none of them; one outcome per run."""
    outcomes: List[Outcome] = []
    waiting = list(submitted)
    while waiting:
        queued = _queued(sorted({str(job.job_id).split("_")[0] for job, _ in waiting}))
        still = []
        for job, runs in waiting:
            # no squeue answer (no squeue at all): submitit's own watcher decides
            done = _task_outcome(job, runs, queued, resume) if queued is not None else job_outcome(runs, job)
            if done is None:
                still.append((job, runs))
            for outcome in done or []:
                outcomes.append(outcome)
                bar.done(outcome)
        waiting = still
        if waiting:
            time.sleep(POLL_SECONDS if poll is None else poll)
    return outcomes
