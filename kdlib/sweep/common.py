"""Names and small helpers every part of the sweep shares: file names, statuses, columns."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, List


GRIDS_DIR = Path(__file__).resolve().parent.parent / "grids"
EXECUTORS = ("local", "slurm", "inline")
#: where the community checkpoints (RepDistiller/mdistiller ``cifar_teachers.tar``) keep each teacher
COMMUNITY_LAYOUT = "{dir}/{teacher}_vanilla/ckpt_epoch_240.pth"
RUNS_DIR, TEACHERS_DIR, JOBS_DIR = "runs", "teachers", "submitit"
SUMMARY, AGGREGATE, PLAN = "summary.csv", "aggregate.csv", "sweep.json"
LOCK, ERROR = ".sweep.lock", "sweep_error.json"
STATUSES = ("finished", "failed", "incomplete", "missing")
SUMMARY_COLUMNS = ["method", "teacher", "student", "seed", "profile", "dataset", "best_test_acc",
                   "last_test_acc", "best_epoch", "epochs", "epochs_done", "wall_seconds", "status", "error",
                   "run_dir", "override_hash", "overrides", "running_on"]
#: grid dimensions: chosen with --methods/--pairs/--seeds/--profile/--out, never with --set
_GRID_KEYS = ("method", "teacher", "student", "seed", "profile", "out", "teacher_checkpoint")
#: the local executor has no time limit of its own worth having (submitit's default is 2 minutes)
_LOCAL_TIMEOUT_MIN = 60 * 24 * 365


def _at(source: str) -> str:
    """Error prefix naming the grid file a bad value came from (nothing for the command line)."""
    return f"{source}: " if source else ""



def _dedupe(items: Iterable[Any]) -> List[Any]:
    seen, out = set(), []
    for item in items:
        if item not in seen:
            seen.add(item)
            out.append(item)
    return out
