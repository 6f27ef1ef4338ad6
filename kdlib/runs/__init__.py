"""The run layer: every run of the book, of a sweep and of the command line is planned, locked, executed
and summarised here, one way.

* :mod:`~kdlib.runs.plan`: configurations become :class:`Run` s in the one directory their identity names
  (``ROOT/runs/<profile>/<method>-<pair>-s<seed>-<hash>``), teachers first as runs the students need;
  plan files keep every run's resolved recipe.
* the lock: :class:`kdlib.engine.rundir.RunLock`, held by whoever trains a run.
* :mod:`~kdlib.runs.executors`: in this process, a pool of worker processes, submitit jobs on this
  machine, and :mod:`~kdlib.runs.slurm` (arrays, teachers' first); :func:`ensure` for the chapters.
* :mod:`~kdlib.runs.summary`: tables from the records alone.
* :func:`execute`: one call for every executor.

Front doors only gather configurations: :mod:`kdlib.experiments` (chapters), :mod:`kdlib.sweep` (grids),
``kdlib book --executor`` (the whole book's runs, collected from its chapters), ``kdlib train``.
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
    outcomes = [Outcome(r, "locked", RunLock.holder(r.run_dir) or "") for r in runs if RunLock.holder(r.run_dir)]
    todo, job_ids = [r for r in runs if r not in [o.run for o in outcomes]], []
    bar = Progress(len(todo), desc=desc, enabled=progress)
    try:
        if todo and executor == "inline":
            outcomes += run_inline(todo, bar, threads=threads, verbose=verbose)
        elif todo and executor == "pool":
            outcomes += run_pool(todo, bar, workers, raise_errors=False)
        elif todo and executor == "local":
            outcomes += run_local(todo, bar, folder, workers, threads or 1, device)
        elif todo:
            submitted, job_ids = slurm_jobs.submit(todo, slurm, folder, threads)
            outcomes += slurm_jobs.wait(submitted, bar, resume) if wait else []
    finally:
        bar.bar.close()
    return outcomes, job_ids


__all__ = ["Run", "plan", "print_plan", "run_directory", "write_plan", "read_plan", "planned_runs", "ensure", "execute",
           "execute_run", "run_threads", "run_workers", "worker_pool", "Outcome", "RunJob", "RunsCollected", "SlurmOptions",
           "parse_time_minutes", "summarize", "write_summary", "read_summary", "aggregate", "per_class_table",
           "EXECUTORS", "COLLECT_ENV", "WAIT_ENV", "ERROR"]
