"""``python -m kdlib train``: one run (a vanilla network, or a student distilled from a teacher).

Examples::

    python -m kdlib train --method kd --teacher resnet20 --student resnet8 --dataset synthetic --out runs/kd
    python -m kdlib train --method dkd --profile course --set beta=2 --seed 1 --out runs/dkd-s1
    python -m kdlib train --method vanilla --student resnet8x4 --profile paper --device cuda
    python -m kdlib train --method dkd --profile paper --dry-run      # the resolved recipe, nothing trained

Names and values are checked before anything trains (an error prints one ``error: ...`` line, exit 2).
Without ``--out`` the run goes where the book and the sweeps put it (``$KDLIB_HOME/runs/<profile>/...``,
:func:`kdlib.runs.run_directory`), so a chapter reuses it. The run's lock keeps a second process out.
Running the same command again resumes an interrupted run, or reports that it has finished. Ctrl-C or
SIGTERM stops after the current step, keeping the last completed epoch (exit 130 / 143).
"""
from __future__ import annotations

import argparse
import sys

from kdlib import config as kconfig
from kdlib.errors import KDLibError

#: command-line options that map one-to-one onto RunConfig fields
_OPTION_FIELDS = ("method", "teacher", "student", "dataset", "data_root", "epochs", "seed", "out",
                  "teacher_checkpoint", "teachers_dir", "device")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--method", required=True, help="distillation method (vanilla trains --student alone)")
    parser.add_argument("--teacher", help="teacher architecture (default: the profile's)")
    parser.add_argument("--student", help="student architecture (default: the profile's)")
    parser.add_argument("--dataset", help="synthetic or cifar100 (default: the profile's)")
    parser.add_argument("--data-root", dest="data_root", help="folder holding cifar-100-python")
    parser.add_argument("--profile", default="smoke", help="smoke, course or paper (default: smoke)")
    parser.add_argument("--epochs", type=_int, help="number of epochs (default: the profile's)")
    parser.add_argument("--seed", type=_int, help="training seed (default 0)")
    parser.add_argument("--out", help="run directory (metrics.json, checkpoint.pt, ...); default: the run's own "
                                      "directory in $KDLIB_HOME/runs, where the book finds it")
    parser.add_argument("--teacher-checkpoint", dest="teacher_checkpoint",
                        help="community teacher checkpoint ({'model': state_dict}); default: train and cache one")
    parser.add_argument("--teachers-dir", dest="teachers_dir", help="teacher cache (default $KDLIB_HOME/teachers)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a recipe field (lr=0.1, milestones=[10,20], train_per_class=50, "
                             "teacher_epochs=5, amp=bf16, ...) or a method hyperparameter (beta=2); repeatable")
    parser.add_argument("--device", help="cpu, cuda, cuda:N or auto (default: auto)")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    parser.add_argument("--quiet", action="store_true", help="no per-epoch lines either")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the run's resolved recipe and directory (and a teacher to train first); train nothing")


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def build_config(args: argparse.Namespace) -> kconfig.RunConfig:
    """The RunConfig an argument namespace describes (validated; raises KDLibError)."""
    overrides = {name: getattr(args, name) for name in _OPTION_FIELDS if getattr(args, name, None) is not None}
    cfg = kconfig.make_config(args.profile, **overrides)
    if args.overrides:
        cfg = kconfig.apply_overrides(cfg, args.overrides)
    return cfg


def run(args: argparse.Namespace) -> int:
    from kdlib import engine, runs
    from kdlib.engine.rundir import RunLock, check_writable

    cfg = build_config(args)
    planned = runs.plan([cfg])  # the directory from the run's identity unless --out; a teacher to train first
    if args.dry_run:
        runs.print_plan(planned, verbose=True)
        return 0
    out = planned[-1].run_dir
    if out.exists() and not out.is_dir():
        raise KDLibError(f"--out {str(out)!r} exists and is not a directory")
    check_writable(out)
    try:
        with RunLock(out):  # the engine trains the teacher, if any, under the teacher's own lock
            metrics = engine.train(planned[-1].config, progress=args.progress, verbose=not args.quiet)
    except engine.TrainingInterrupted as exc:
        print(f"interrupted: {exc}", file=sys.stderr)
        return 128 + int(exc.signum)
    return 0 if metrics.get("status") in ("finished", "paused") else 1
