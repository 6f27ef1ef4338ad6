"""Executors on this machine: ``inline`` (this process) and ``local`` (submitit subprocesses)."""
from __future__ import annotations

import collections
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple
from kdlib.sweep.common import JOBS_DIR, _LOCAL_TIMEOUT_MIN
from kdlib.sweep.grid import GridSpec
from kdlib.sweep.jobs import RunJob, _last_line, _write_error, execute_run
from kdlib.sweep.planning import PlannedRun


# == executors ========================================================================================
@dataclass
class _Outcome:
    run: PlannedRun
    status: str
    error: str = ""
    log: Optional[str] = None


def _job_outcome(run: PlannedRun, job: Any) -> Optional[_Outcome]:
    """What a submitit job says once it is over, or None while it runs.

    The result file counts as the end: submitit writes it atomically before the job's interpreter
    exits, and tearing down a process that imported torch takes seconds on a busy machine, which the
    next run need not wait for. A job that ended without a result (killed, out of memory, time limit)
    is a failed run, reported with the last line of what submitit saw.
    """
    import pickle

    log = str(job.paths.stderr)
    result_file = job.paths.result_pickle
    if result_file.exists():
        with open(result_file, "rb") as handle:
            kind, value = pickle.load(handle)
        if kind == "success":
            return _Outcome(run, value.get("status", "failed"), value.get("error", ""), log)
        exc: BaseException = RuntimeError(str(value))
    elif job.done():
        exc = job.exception() or RuntimeError(f"job {job.job_id} ended without a result")
    else:
        return None
    message = _last_line(exc)
    _write_error(run.run_dir, message, str(exc), log)
    return _Outcome(run, "failed", message, log)


class _Progress:
    """A tqdm bar over runs, with counts of finished and failed runs."""

    def __init__(self, total: int, initial: int, enabled: bool):
        from tqdm import tqdm

        self.counts: collections.Counter = collections.Counter()
        # disable=None: tqdm draws only on a terminal (logs and CI get the final table only)
        self.bar = tqdm(total=total, initial=initial, desc="sweep", unit="run", dynamic_ncols=True,
                        disable=None if enabled else True, file=sys.stderr)

    def done(self, outcome: _Outcome) -> None:
        self.counts[outcome.status] += 1
        self.bar.update(1)
        self.bar.set_postfix({k: v for k, v in sorted(self.counts.items())}, refresh=True)
        if outcome.status == "failed":
            self.bar.write(f"failed: {outcome.run.label}: {outcome.error}", file=sys.stderr)

    def close(self) -> None:
        self.bar.close()


def _run_inline(runs: List[PlannedRun], spec: GridSpec, bar: _Progress, verbose: bool) -> List[_Outcome]:
    import torch

    outcomes = []
    before = torch.get_num_threads()  # the caller's setting comes back afterwards
    try:
        for run in runs:
            result = execute_run(run.config, threads=spec.run_threads(), verbose=verbose)
            outcomes.append(_Outcome(run, result["status"], result.get("error", "")))
            bar.done(outcomes[-1])
    finally:
        torch.set_num_threads(before)
    return outcomes


def _local_gpus(device: Optional[str]) -> List[str]:
    """Device ids (as CUDA_VISIBLE_DEVICES entries) the local workers share round-robin."""
    if device is not None and not str(device).startswith(("auto", "cuda")):
        return []
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [d.strip() for d in visible.split(",") if d.strip()]
    import torch

    return [str(i) for i in range(torch.cuda.device_count())]


def _gpu_for_slot(slot: int, gpus: List[str], device: Optional[str]) -> str:
    """CUDA_VISIBLE_DEVICES of a worker: one GPU per slot, or all of them when a cuda:N is named."""
    if not gpus:
        return ""
    if device is not None and re.fullmatch(r"cuda:\d+", str(device)):
        return ",".join(gpus)
    return gpus[slot % len(gpus)]


def _teacher_pending(run: PlannedRun) -> Optional[str]:
    """The teacher cache file this run would have to train first, or None if it is there or not needed."""
    from kdlib import teachers

    cfg = run.config
    if not cfg.uses_teacher or cfg.teacher_checkpoint:
        return None
    path = teachers.teacher_path(cfg)
    return None if path.is_file() else str(path)


def _run_local(runs: List[PlannedRun], spec: GridSpec, out: Path, bar: _Progress) -> List[_Outcome]:
    """At most ``workers`` submitit local jobs at once (submitit's LocalExecutor has no cap of its own).

    A run whose teacher is being trained by a running job waits for it, so that free workers take runs
    that can start instead of blocking on the teacher's lock.
    """
    import submitit

    executor = submitit.LocalExecutor(folder=str(out / JOBS_DIR))
    executor.update_parameters(timeout_min=_LOCAL_TIMEOUT_MIN, gpus_per_node=0)
    threads = spec.run_threads()
    gpus = _local_gpus(spec.device)
    pending = collections.deque(runs)
    running: Dict[int, Tuple[Any, PlannedRun, Optional[str]]] = {}  # slot -> (job, run, teacher it trains)
    outcomes: List[_Outcome] = []
    try:
        while pending or running:
            for slot in [s for s in range(spec.workers) if s not in running]:
                run = _next_startable(pending, {t for _, _, t in running.values() if t})
                if run is None:
                    break
                job = executor.submit(RunJob(run.config.to_dict(), threads, _gpu_for_slot(slot, gpus, spec.device)))
                running[slot] = (job, run, _teacher_pending(run))
            finished = False
            for slot, (job, run, _) in list(running.items()):
                outcome = _job_outcome(run, job)
                if outcome is not None:
                    del running[slot]
                    outcomes.append(outcome)
                    bar.done(outcome)
                    finished = True
            if not finished:
                time.sleep(0.5)
    except KeyboardInterrupt:
        _stop_local_jobs([job for job, _, _ in running.values()])
        raise
    return outcomes


def _next_startable(pending: collections.deque, teachers_in_training: set) -> Optional[PlannedRun]:
    for index, run in enumerate(pending):
        teacher = _teacher_pending(run)
        if teacher is None or teacher not in teachers_in_training:
            del pending[index]
            return run
    return None


def _stop_local_jobs(jobs: List[Any], grace_seconds: float = 30.0) -> None:
    """Ctrl-C: SIGINT to every running job; the engine keeps each run's last completed epoch."""
    for job in jobs:
        job.cancel(check=False)
    deadline = time.monotonic() + grace_seconds
    while time.monotonic() < deadline and not all(job.done() for job in jobs):
        time.sleep(0.5)
