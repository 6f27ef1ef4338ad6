"""The sweep itself: plan the grid, skip what is finished, run the rest, write the summaries."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, List

from kdlib import runs
from kdlib.errors import KDLibError
from kdlib.runs import Run, execute, write_plan
from kdlib.runs import slurm as runs_slurm
from kdlib.runs import summary as runs_summary
from kdlib.runs.summary import aggregate, write_summary
from kdlib.sweep.grid import GridSpec

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
