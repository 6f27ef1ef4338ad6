"""``python -m kdlib sweep``: a grid of methods x teacher/student pairs x seeds, run, summarised.

Examples::

    python -m kdlib sweep --methods kd,dkd --pairs resnet20:resnet8 --seeds 0,1 --epochs 1 --workers 2
    python -m kdlib sweep --config paper --executor slurm --slurm-partition gpu --out sweeps/paper \\
        --teacher-checkpoint-dir download_ckpts/cifar_teachers
    python -m kdlib sweep --summarize-only --out sweeps/paper

The grid comes from the flags, a YAML file (``--config FILE`` or a shipped grid of ``kdlib/grids/``) or
both, flags winning. The run layer (:mod:`kdlib.runs`) plans it -- every run in the directory its
identity names, ``OUT/runs/<profile>/<method>-<pair>-s<seed>-<hash>``, the same a chapter of the book
gives it (``OUT`` defaults to ``$KDLIB_HOME``: the book reuses what a sweep trained, and the other way
round), teachers to train first -- checks everything before anything is submitted, skips finished runs,
runs the rest (``local``, ``slurm``, ``pool`` or ``inline``), and rebuilds ``OUT/summary.csv`` and
``OUT/aggregate.csv`` from the records. ``OUT/sweep.json`` keeps every planned run's resolved recipe;
``--dry-run`` prints the plan. Teacher checkpoints: ``--teacher-checkpoint ARCH=PATH`` or
``--teacher-checkpoint-dir DIR`` (the community layout ``{dir}/{teacher}_vanilla/ckpt_epoch_240.pth``).
Exit code 0 when every run of the grid finished, 1 otherwise.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, List

from kdlib.errors import KDLibError
from kdlib import runs
from kdlib.runs import ERROR, EXECUTORS, Run, RunJob, SlurmOptions, execute, execute_run, parse_time_minutes, write_plan
from kdlib.runs import slurm as runs_slurm
from kdlib.runs import summary as runs_summary
from kdlib.runs.summary import SUMMARY, aggregate, per_class_table, read_summary, summarize, write_summary
from kdlib.sweep.command import add_arguments, run, spec_from_args
from kdlib.sweep.grid import COMMUNITY_LAYOUT, GridSpec, grid_names, load_grid

if TYPE_CHECKING:  # pandas is imported where tables are made
    import pandas as pd

PLAN, JOBS_DIR = "sweep.json", "submitit"


@dataclass
class SweepResult:
    """What :func:`run_sweep` did: counts of the grid's runs, and the summary and aggregate tables."""

    out: Path
    planned: int
    skipped: int  # finished before this sweep started: no job
    submitted: int
    locked: int  # trained by another process right now: no job
    summary: pd.DataFrame
    aggregate: pd.DataFrame
    job_ids: List[str] = field(default_factory=list)
    teachers: int = 0  # teacher runs trained (or submitted) before the grid's runs

    @property
    def failed(self) -> int:
        return int((self.summary["status"] == "failed").sum()) if len(self.summary) else 0

    @property
    def ok(self) -> bool:
        """Every run of the grid has finished."""
        return bool(len(self.summary)) and bool((self.summary["status"] == "finished").all())


def plan(spec: GridSpec) -> List[Run]:
    """The grid's runs in the folder ``spec.root()``, teachers to train first; validated, nothing written."""
    return runs.plan(spec.configs(), root=spec.root())


def run_sweep(spec: GridSpec, *, progress: bool = True, verbose: bool = False, wait: bool = True,
              print_tables: bool = False) -> SweepResult:
    """Plan, skip what is finished, run the rest with ``spec.executor``, write the summaries.

    ``verbose`` prints the engine's per-epoch lines (inline executor; jobs write them to their logs).
    ``wait=False`` (Slurm only) returns once the arrays are submitted; summarise later.
    """
    spec = spec.normalised()
    out = spec.root()
    planned_runs = plan(spec)  # every check before anything is written or submitted
    if spec.executor == "slurm":  # the options checked against the cluster before anything is written
        runs_slurm.executor(spec.slurm, out / JOBS_DIR)
    if not wait and spec.executor != "slurm":
        raise KDLibError("--no-wait applies to --executor slurm only")
    write_plan(out / PLAN, planned_runs, {"command": spec.command(), "spec": spec.to_dict()})
    grid = [r for r in planned_runs if r.role == "run"]
    todo = [r for r in planned_runs if not r.finished()]
    try:
        outcomes, job_ids = execute(todo, spec.executor, folder=out / JOBS_DIR, workers=spec.workers,
                                    threads=spec.run_threads(), device=spec.device, slurm=spec.slurm,
                                    progress=progress, wait=wait, verbose=verbose,
                                    resume=spec.command(), desc="sweep")
    finally:
        summary = write_summary(out)
    planned = {r.run_dir.relative_to(out).as_posix() for r in grid}
    locked = [o for o in outcomes if o.status == "locked" and o.run.role == "run"]
    if print_tables:
        runs_summary.print_tables(summary, planned)
        for o in locked:
            print(f"skipped (being trained elsewhere: {o.error or 'lock released since'}): {o.run.label}")
        if job_ids and not wait:
            print(f"submitted Slurm job(s) {', '.join(job_ids)}; when they are done: "
                  f"python -m kdlib sweep --summarize-only --out {out}")
    mine = summary[summary["run_dir"].isin(planned)].reset_index(drop=True)
    students = [r for r in todo if r.role == "run"]
    return SweepResult(out, len(grid), len(grid) - len(students), len(students) - len(locked), len(locked), mine,
                       aggregate(summary), job_ids, len(todo) - len(students))


__all__ = ["GridSpec", "SlurmOptions", "SweepResult", "RunJob", "load_grid", "grid_names", "plan", "run_sweep",
           "execute_run", "summarize", "write_summary", "read_summary", "aggregate", "per_class_table",
           "parse_time_minutes", "spec_from_args", "add_arguments", "run", "COMMUNITY_LAYOUT", "ERROR",
           "SUMMARY", "PLAN", "EXECUTORS"]
