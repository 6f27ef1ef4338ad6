"""``python -m kdlib sweep``: a grid of methods x teacher/student pairs x seeds, run as jobs, summarised.

Examples::

    python -m kdlib sweep --methods kd,dkd --pairs resnet20:resnet8 --seeds 0,1 --dataset synthetic \\
        --epochs 1 --executor local --workers 2 --out sweeps/tiny
    python -m kdlib sweep --config paper --executor slurm --slurm-partition gpu --out sweeps/paper \\
        --teacher-checkpoint-dir download_ckpts/cifar_teachers
    python -m kdlib sweep --summarize-only --out sweeps/paper

What happens, in order:

1. **Grid.** The grid comes from the flags, from a YAML file (``--config FILE``, or the name of a shipped
   grid in ``kdlib/grids/``: ``paper``, ``course``, ``smoke``), or both; flags win over the file and
   ``--set`` items are applied after the file's. ``vanilla`` among the methods trains each distinct
   student alone (one run per student and seed, no teacher).
2. **Plan.** Every run gets its :class:`~kdlib.config.RunConfig` from :func:`kdlib.config.make_config` and
   :func:`kdlib.config.apply_overrides`, and a directory that depends only on what the run *is*::

       OUT/runs/<method>/<teacher>-<student>/seed<k>[-<hash>]      (vanilla: OUT/runs/vanilla/<student>/...)

   ``<hash>`` is 8 hex digits of the recipe fields and method hyperparameters that ``--set`` changed away
   from their defaults (``lr=0.1`` and ``lr=1e-1`` give the same hash; ``lr=0.05``, the default, none),
   so runs with different overrides never share a directory. Everything is validated before anything is
   submitted: unknown names, malformed pairs or ``--set`` items, missing teacher checkpoints, and run
   directories that already hold a *different* run (another ``--epochs`` or dataset in the same
   ``--out``) are :class:`~kdlib.errors.KDLibError` (``error: ...``, exit 2).
3. **Run.** A finished run (``metrics.json`` with ``final`` and the same config) is skipped without a
   job. Every other run becomes one job calling :func:`kdlib.engine.train`, which resumes an interrupted
   run from its last completed epoch. Executors: ``local`` (submitit's ``LocalExecutor``: subprocesses
   on this machine, at most ``--workers`` at once, GPUs handed out round-robin), ``slurm`` (submitit, one
   array job; ``--no-wait`` submits and returns) and ``inline`` (in this process, one after the other:
   for tests, notebooks and debugging). All runs share one teacher cache (``OUT/teachers`` unless
   ``--teachers-dir``).
4. **Locks.** A job holds ``fcntl.flock`` on ``<run dir>/.sweep.lock`` while it trains. The kernel drops
   the lock when the process ends, however it ends, so two workers never train the same run at once and
   a crashed worker never blocks a run (the file may stay; the lock does not).
5. **Records.** ``OUT/summary.csv`` (one row per run) and ``OUT/aggregate.csv`` (mean +- std over seeds
   per method and pair) are rebuilt from the runs' ``metrics.json`` by :mod:`kdlib.records`, so
   ``--summarize-only`` regenerates them at any time. A failed run is recorded in
   ``<run dir>/sweep_error.json`` (its error's last line) and the others go on. Exit code 0 when every run
   of the grid finished, 1 otherwise.

Teacher checkpoints: ``--teacher-checkpoint ARCH=PATH`` (YAML ``teacher_checkpoints: {ARCH: PATH}``) or
``--teacher-checkpoint-dir DIR`` (YAML ``teacher_checkpoint_dir``), which looks for
``{dir}/{teacher}_vanilla/ckpt_epoch_240.pth``, the layout of the community ``cifar_teachers.tar``
(mdistiller's release; ``teacher_checkpoint_pattern`` changes it). Teachers without a checkpoint are
trained once with the profile's teacher recipe and cached.
"""
from __future__ import annotations

# The parts, one job each (they import downwards: common <- grid <- planning <- jobs <- executors/slurm
# <- summary <- runner <- command); this package re-exports the public names, so `kdlib.sweep.X` works.
from kdlib.sweep.command import add_arguments, run, spec_from_args
from kdlib.sweep.common import (AGGREGATE, COMMUNITY_LAYOUT, ERROR, EXECUTORS, GRIDS_DIR, JOBS_DIR, LOCK, PLAN,
                                RUNS_DIR, STATUSES, SUMMARY, SUMMARY_COLUMNS, TEACHERS_DIR)
from kdlib.sweep.grid import GridSpec, SlurmOptions, grid_names, load_grid, parse_time_minutes
from kdlib.sweep.jobs import RunJob, RunLock, RunLocked, execute_run
from kdlib.sweep.planning import PlannedRun, plan
from kdlib.sweep.runner import SweepResult, run_sweep
from kdlib.sweep.slurm import slurm_parameters
from kdlib.sweep.summary import aggregate, per_class_table, read_summary, summarize, write_summary

__all__ = ["GridSpec", "SlurmOptions", "PlannedRun", "SweepResult", "RunLock", "RunLocked", "RunJob",
           "load_grid", "grid_names", "plan", "run_sweep", "execute_run", "summarize", "write_summary",
           "read_summary", "aggregate", "per_class_table", "EXECUTORS", "COMMUNITY_LAYOUT"]
