"""The ``slurm`` executor: submitit array jobs on a Slurm cluster."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Dict, List, Tuple

from kdlib.errors import KDLibError
from kdlib.sweep.common import JOBS_DIR
from kdlib.sweep.executors import _Outcome, _Progress, _job_outcome, _teacher_pending
from kdlib.sweep.grid import GridSpec
from kdlib.sweep.jobs import RunJob, _last_line
from kdlib.sweep.planning import PlannedRun


def slurm_parameters(spec: GridSpec) -> Dict[str, Any]:
    """submitit AutoExecutor parameters of each array task (generic names, ``slurm_`` for the rest)."""
    s = spec.slurm
    params: Dict[str, Any] = {
        "name": "kdlib-sweep", "timeout_min": s.time_min, "cpus_per_task": s.cpus,
        "tasks_per_node": 1, "nodes": 1, "slurm_array_parallelism": s.array_parallelism,
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
    return executor


def _submit_slurm(runs: List[PlannedRun], spec: GridSpec, executor) -> List[Tuple[Any, PlannedRun]]:
    """Two array jobs when teachers must be trained: first one run per missing teacher (it trains and
    caches the teacher), then the rest, starting after the first array (``afterany``: a failed teacher
    is retried by the runs that need it instead of leaving them pending forever)."""
    threads = spec.threads or spec.slurm.cpus
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


def _wait_jobs(submitted: List[Tuple[Any, PlannedRun]], bar: _Progress, poll: float) -> List[_Outcome]:
    outcomes: List[_Outcome] = []
    waiting = list(submitted)
    while waiting:
        still = []
        for job, run in waiting:
            outcome = _job_outcome(run, job)
            if outcome is None:
                still.append((job, run))
            else:
                outcomes.append(outcome)
                bar.done(outcome)
        waiting = still
        if waiting:
            time.sleep(poll)
    return outcomes
