"""The run layer: every run of the book, of a sweep and of the command line is planned
(:mod:`~kdlib.runs.plan`: one directory per identity, teachers first), locked
(:class:`kdlib.engine.rundir.RunLock`), executed (:mod:`~kdlib.runs.executors`, :mod:`~kdlib.runs.slurm`;
:func:`execute` for every executor, :func:`ensure` for the chapters) and summarised from the records
(:mod:`~kdlib.runs.summary`), one way. Front doors only gather configurations: :mod:`kdlib.experiments`,
:mod:`kdlib.sweep`, ``kdlib book --executor``, ``kdlib train``.
"""
from pathlib import Path
from typing import Any, Optional, Sequence

from kdlib.engine.rundir import RunLock
from kdlib.runs import slurm as slurm_jobs
from kdlib.runs.executors import (COLLECT_ENV, EXECUTORS, WAIT_ENV, Outcome, Progress, RunJob, RunsCollected, ensure,
                                  execute_run, run_inline, run_local, run_pool, run_threads, run_workers,
                                  worker_pool)
from kdlib.runs.plan import ERROR, Run, planned_runs, plan, print_plan, read_plan, run_directory, write_plan
from kdlib.runs.slurm import SlurmOptions, parse_time_minutes
from kdlib.runs.summary import aggregate, per_class_table, read_summary, summarize, write_summary


def execute(runs: Sequence[Run], executor: str, *, folder: Path, workers: int = 1, threads: Optional[int] = None,
            device: Optional[str] = None, slurm: Any = None, progress: bool = True, wait: bool = True,
            verbose: bool = False, resume: str = "the same command", desc: str = "runs") -> tuple:
    """Train ``runs`` (planned, not finished) with ``executor``; ``(outcomes, Slurm job ids)``. A run whose
    lock another process holds is left to it (outcome ``locked``). ``folder`` holds the jobs' logs,
    ``slurm`` the :class:`~kdlib.runs.slurm.SlurmOptions`, ``resume`` the command that resumes them."""
    locked = [Outcome(r, "locked", held) for r in runs if (held := RunLock.holder(r.run_dir))]
    todo, job_ids = [r for r in runs if all(o.run is not r for o in locked)], []
    bar = Progress(len(todo), desc=desc, enabled=progress)
    try:
        if todo and executor == "inline":
            run_inline(todo, bar, threads=threads, verbose=verbose)
        elif todo and executor == "pool":
            run_pool(todo, bar, workers, raise_errors=False)
        elif todo and executor == "local":
            run_local(todo, bar, folder, workers, threads or 1, device)
        elif todo:
            submitted, job_ids = slurm_jobs.submit(todo, slurm, folder, threads)
            if wait:
                slurm_jobs.wait(submitted, bar, resume)
    finally:
        bar.bar.close()
    return locked + bar.outcomes, job_ids


__all__ = ["Run", "plan", "print_plan", "run_directory", "write_plan", "read_plan", "planned_runs", "ensure", "execute",
           "execute_run", "run_threads", "run_workers", "worker_pool", "Outcome", "RunJob", "RunsCollected", "SlurmOptions",
           "parse_time_minutes", "summarize", "write_summary", "read_summary", "aggregate", "per_class_table",
           "EXECUTORS", "COLLECT_ENV", "WAIT_ENV", "ERROR"]
