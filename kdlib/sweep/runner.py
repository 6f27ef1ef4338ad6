"""The sweep itself: plan, skip what is finished, run the rest, write the summaries."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, List

from kdlib.errors import KDLibError
from kdlib.sweep.common import _dedupe
from kdlib.sweep.executors import _Progress, _run_inline, _run_local
from kdlib.sweep.grid import GridSpec
from kdlib.sweep.jobs import RunLock
from kdlib.sweep.planning import _is_finished, _write_plan, plan
from kdlib.sweep import slurm as _slurm
from kdlib.sweep.slurm import _slurm_executor, _submit_slurm, _wait_jobs
from kdlib.sweep.summary import _print_tables, aggregate, write_summary

if TYPE_CHECKING:  # pandas is imported where tables are made
    import pandas as pd


# == the sweep ========================================================================================
@dataclass
class SweepResult:
    """What :func:`run_sweep` did: counts, and the summary and aggregate tables it wrote."""

    out: Path
    planned: int
    skipped: int  # finished before this sweep started: no job
    submitted: int
    locked: int  # trained by another process right now: no job
    summary: pd.DataFrame
    aggregate: pd.DataFrame
    job_ids: List[str] = field(default_factory=list)

    @property
    def failed(self) -> int:
        return int((self.summary["status"] == "failed").sum()) if len(self.summary) else 0

    @property
    def ok(self) -> bool:
        """Every run of the grid has finished."""
        return bool(len(self.summary)) and bool((self.summary["status"] == "finished").all())


def run_sweep(spec: GridSpec, *, progress: bool = True, verbose: bool = False, wait: bool = True,
              print_tables: bool = False) -> SweepResult:
    """Plan, skip what is finished, run the rest with ``spec.executor``, write the summaries.

    ``verbose`` prints the engine's per-epoch lines (inline executor; jobs write them to their logs).
    ``wait=False`` (Slurm only) returns once the array is submitted; summarise later.
    """
    runs = plan(spec)  # every check before anything is written or submitted
    spec = spec.normalised()
    out = Path(spec.out).expanduser().absolute()
    executor = _slurm_executor(spec, out) if spec.executor == "slurm" else None
    if not wait and spec.executor != "slurm":
        raise KDLibError("--no-wait applies to --executor slurm only")
    _write_plan(out, spec, runs)

    finished = [r for r in runs if _is_finished(r)]
    locked = [r for r in runs if r not in finished and RunLock.holder(r.run_dir)]
    todo = [r for r in runs if r not in finished and r not in locked]
    bar = _Progress(total=len(runs) - len(locked), initial=len(finished), enabled=progress)
    job_ids: List[str] = []
    try:
        if todo and spec.executor == "inline":
            _run_inline(todo, spec, bar, verbose)
        elif todo and spec.executor == "local":
            _run_local(todo, spec, out, bar)
        elif todo:
            submitted = _submit_slurm(todo, spec, executor)
            job_ids = _dedupe(str(job.job_id).split("_")[0] for job, _ in submitted)
            if wait:
                _wait_jobs(submitted, bar, poll=_slurm.POLL_SECONDS, resume=spec.command())
    except KeyboardInterrupt:
        write_summary(out)
        raise
    finally:
        bar.close()
    summary = write_summary(out)
    agg = aggregate(summary)
    if print_tables:
        _print_tables(summary, agg, {r.rel_dir for r in runs}, locked, job_ids, wait, out)
    planned_dirs = {r.rel_dir for r in runs}
    return SweepResult(out, len(runs), len(finished), len(todo), len(locked),
                       summary[summary["run_dir"].isin(planned_dirs)].reset_index(drop=True), agg, job_ids)
