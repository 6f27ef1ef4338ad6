"""The Slurm executor: submitit array jobs, the teachers' array first and the students' after it.

Before anything is submitted the options are checked against the cluster itself (``sinfo``): what it
cannot honour (an unknown partition, more CPUs or GPUs than a node has, a time limit above the
partition's) is refused with one line saying what to change, instead of sbatch's raw error.

While it waits, the executor asks ``squeue`` which tasks Slurm still holds, not submitit's ``sacct``
watcher: clusters without accounting storage have no sacct, and a task that Slurm requeued (preemption,
``scontrol requeue``, submitit's requeue at the time limit) is not over, even when its previous attempt
left a result file behind. A task that leaves the queue without a result (cancelled, killed, node
failure) leaves its runs unfinished, with the command that resumes them.
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

from kdlib.errors import KDLibError, check_keys, whole_number
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
        if not isinstance(value, (Mapping, SlurmOptions, type(None))):
            raise KDLibError(f"{where}slurm must be a mapping (partition, gpus, cpus, time, ...)")
        data = dict(dataclasses.asdict(value) if isinstance(value, SlurmOptions) else value or {})
        if "time" in data:
            data["time_min"] = parse_time_minutes(data.pop("time"))
        names = [f.name for f in dataclasses.fields(cls)]
        check_keys(data, names, "slurm key", where, [n if n != "time_min" else "time" for n in names])
        opts = cls(**{k: v for k, v in data.items() if v is not None})
        for name in ("gpus", "cpus", "time_min", "array_parallelism", "runs_per_task"):
            setattr(opts, name, whole_number(getattr(opts, name), f"{where}slurm {name}", 0 if name == "gpus" else 1))
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
    """Slurm-style time limits as whole minutes: ``90``, ``"90"``, ``"HH:MM[:SS]"``, ``"D-HH[:MM[:SS]]"``
    (``"02:30"`` is two and a half hours, as people mean it; Slurm itself would read MM:SS)."""
    match = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", str(value).strip())
    if isinstance(value, bool) or not match:
        raise KDLibError(f"slurm time must be minutes or [D-]HH:MM[:SS], got {value!r}")
    days, first, second, seconds = (int(x) if x else None for x in match.groups())
    hours = days is not None or second is not None  # the first number counts hours
    minutes = (days or 0) * 1440 + (first * 60 + (second or 0) if hours else first) + math.ceil((seconds or 0) / 60)
    if minutes < 1:
        raise KDLibError(f"slurm time {value!r}: a time limit must be at least one minute; use e.g. --slurm-time 90 "
                         f"(minutes) or 24:00:00")
    return minutes


def _ask(name: str, *args: str, beside_sbatch: bool = False) -> Optional[subprocess.CompletedProcess]:
    """Run a Slurm tool, preferably the one beside ``sbatch`` (the cluster that receives the jobs); None
    when there is none (``beside_sbatch``: a lone sbatch, a wrapper or a test's fake, means no cluster to
    ask) or it does not answer."""
    sbatch = shutil.which("sbatch")
    beside = Path(sbatch).parent / name if sbatch else None
    tool = str(beside) if beside is not None and os.access(beside, os.X_OK) else None
    tool = tool or (None if beside_sbatch else shutil.which(name))
    try:
        return subprocess.run([tool, *args], capture_output=True, text=True, timeout=60) if tool else None
    except (OSError, subprocess.TimeoutExpired):
        return None


def _partitions() -> Tuple[Dict[str, Dict[str, Any]], Optional[str]]:
    """Per partition: the most CPUs and GPUs of a node and the time limit in minutes (None: no limit);
    and the default partition. Nothing when ``sinfo`` does not answer."""
    done = _ask("sinfo", "-h", "-o", "%P|%c|%G|%l", beside_sbatch=True)
    partitions: Dict[str, Dict[str, Any]] = {}
    default = None
    for line in done.stdout.splitlines() if done is not None and done.returncode == 0 else []:
        name, cpus, gres, limit = (line.split("|") + ["", "", "", ""])[:4]
        if name.endswith("*"):
            name = default = name[:-1]
        span = re.fullmatch(r"(?:(\d+)-)?(?:(\d+):)?(\d+):(\d+)", limit.strip())  # sinfo's D-HH:MM:SS, infinite
        days, hours, mins, secs = (int(x or 0) for x in span.groups()) if span else (0, 0, 0, 0)
        info = partitions.setdefault(name, {"cpus": 0, "gpus": 0, "limit": None if not span else
                                            days * 1440 + hours * 60 + mins + (1 if secs else 0)})
        info["cpus"] = max(info["cpus"], int(re.sub(r"\D.*", "", cpus) or 0))
        info["gpus"] = max(info["gpus"], max((int(n) for n in re.findall(r"gpu(?::[^:,(]+)?:(\d+)", gres)), default=0))
    return partitions, default


def check_options(s: SlurmOptions) -> None:
    """Refuse, with one line saying what to change, options this cluster cannot honour (nothing is
    checked when there is no ``sinfo`` beside ``sbatch`` or it does not answer)."""
    partitions, default = _partitions()
    if not partitions:
        return
    names, part = sorted(partitions), s.partition or default
    if part is None:
        raise KDLibError(f"this cluster has no default partition: choose one with --slurm-partition ({', '.join(names)})")
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
    submitted, job_ids = [], []
    for group in ([r for r in runs if r.role == "teacher"], [r for r in runs if r.role != "teacher"]):
        if group:
            ex.update_parameters(**({"slurm_dependency": f"afterany:{job_ids[-1]}"} if job_ids else {}))
            tasks = [group[i:i + options.runs_per_task] for i in range(0, len(group), options.runs_per_task)]
            jobs = ex.submit_array([RunJob(task, threads) for task in tasks])
            submitted += list(zip(jobs, tasks))
            job_ids.append(str(jobs[0].job_id).split("_")[0])
    return submitted, job_ids


def _queued() -> Optional[Set[str]]:
    """Ids (``123``, ``123_4``) of this user's tasks Slurm still holds (pending, running, requeued,
    completing); None when ``squeue`` does not answer this time. All of them, not ``-j`` ids: squeue
    refuses a list holding an id Slurm has forgotten already."""
    done = _ask("squeue", "-h", "-r", "-o", "%i", "-u", str(os.getuid()))
    return set(done.stdout.split()) if done is not None and done.returncode == 0 else None


def _ended(job: Any, runs: List[Run], resume: str) -> List[Outcome]:
    """What a task Slurm no longer holds says. A run it did not finish (the engine stopped at a signal, the
    task ended without a result) gets ``run_error.json`` with the command that resumes it, so the summary
    says how to go on; a failed run keeps its own error (retrying needs a fix first)."""
    done = job_outcome(job, runs) if job.paths.result_pickle.exists() else None
    if done is None:
        state = _ask("scontrol", "show", "job", "-o", str(job.job_id))
        state = re.search(r"JobState=(\S+)", state.stdout if state is not None else "")
        message = f"Slurm job {job.job_id} ended without a result ({state.group(1) if state else 'unknown'})"
        done = [Outcome(run, "finished" if run.finished() else "incomplete", message, str(job.paths.stderr))
                for run in runs]
    for o in done:
        if o.status == "incomplete":
            o.error = f"{o.error}; resume with: {resume}"
            write_error(o.run.run_dir, o.error, log=o.log, status="incomplete")
    return done


def wait(submitted: List[Tuple[Any, List[Run]]], bar: Progress, resume: str = "the same command",
         poll: Optional[float] = None) -> None:
    """Follow the tasks until Slurm holds none of them; one outcome per run (no squeue answer, no squeue
    at all: submitit's own watcher decides)."""
    waiting = dict(enumerate(submitted))
    while waiting:
        queued = _queued()
        bar.follow(waiting, job_outcome if queued is None else
                   lambda job, runs: None if str(job.job_id) in queued else _ended(job, runs, resume))
        if waiting:
            time.sleep(POLL_SECONDS if poll is None else poll)
