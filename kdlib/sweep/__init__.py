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

from kdlib.runs import ERROR, EXECUTORS, RunJob, SlurmOptions, execute_run, parse_time_minutes
from kdlib.runs.summary import SUMMARY, aggregate, per_class_table, read_summary, summarize, write_summary
from kdlib.sweep.command import add_arguments, run, spec_from_args
from kdlib.sweep.grid import COMMUNITY_LAYOUT, GridSpec, grid_names, load_grid
from kdlib.sweep.runner import PLAN, SweepResult, plan, run_sweep

__all__ = ["GridSpec", "SlurmOptions", "SweepResult", "RunJob", "load_grid", "grid_names", "plan", "run_sweep",
           "execute_run", "summarize", "write_summary", "read_summary", "aggregate", "per_class_table",
           "parse_time_minutes", "spec_from_args", "add_arguments", "run", "COMMUNITY_LAYOUT", "ERROR",
           "SUMMARY", "PLAN", "EXECUTORS"]
