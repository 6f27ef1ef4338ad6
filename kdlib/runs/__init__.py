"""The run layer: every run of the book, of a sweep and of the command line is planned, locked, executed
and summarised here, one way.

* :mod:`~kdlib.runs.plan`: configurations become :class:`Run` s in the one directory their identity names
  (``ROOT/runs/<profile>/<method>-<pair>-s<seed>-<hash>``), teachers first as runs the students need;
  plan files keep every run's resolved recipe.
* the lock: :class:`kdlib.engine.rundir.RunLock`, held by whoever trains a run.
* :mod:`~kdlib.runs.executors`: in this process, a pool of worker processes, submitit jobs on this
  machine, and :mod:`~kdlib.runs.slurm` (arrays, teachers' first); :func:`ensure` for the chapters.
* :mod:`~kdlib.runs.summary`: tables from the records alone.

Front doors only gather configurations: :mod:`kdlib.experiments` (chapters), :mod:`kdlib.sweep` (grids),
``kdlib book --executor`` (the whole book's runs, collected from its chapters), ``kdlib train``.
"""
from kdlib.runs.executors import (COLLECT_ENV, EXECUTORS, WAIT_ENV, Outcome, RunJob, RunsCollected, ensure, execute,
                                execute_run, run_workers, worker_pool)
from kdlib.runs.plan import ERROR, Run, planned_runs, plan, print_plan, read_plan, run_directory, write_plan
from kdlib.runs.slurm import SlurmOptions, parse_time_minutes
from kdlib.runs.summary import aggregate, per_class_table, read_summary, summarize, write_summary

__all__ = ["Run", "plan", "print_plan", "run_directory", "write_plan", "read_plan", "planned_runs", "ensure", "execute",
           "execute_run", "run_workers", "worker_pool", "Outcome", "RunJob", "RunsCollected", "SlurmOptions",
           "parse_time_minutes", "summarize", "write_summary", "read_summary", "aggregate", "per_class_table",
           "EXECUTORS", "COLLECT_ENV", "WAIT_ENV", "ERROR"]
