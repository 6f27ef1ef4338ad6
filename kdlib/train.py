"""``python -m kdlib train``: one run (a vanilla network, or a student distilled from a teacher).

Examples::

    python -m kdlib train --method kd --teacher resnet20 --student resnet8 --dataset synthetic --out runs/kd
    python -m kdlib train --method dkd --profile course --set beta=2 --seed 1 --out runs/dkd-s1
    python -m kdlib train --method vanilla --student resnet8x4 --profile paper --device cuda --out runs/r8x4

Names and values are checked before anything trains (an error prints one ``error: ...`` line, exit 2).
Running the same command again resumes an interrupted run, or reports that it has finished. Ctrl-C or
SIGTERM stops after the current step, keeping the last completed epoch (exit 130 / 143).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

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
    parser.add_argument("--out", required=True, help="run directory (metrics.json, checkpoint.pt, ...)")
    parser.add_argument("--teacher-checkpoint", dest="teacher_checkpoint",
                        help="community teacher checkpoint ({'model': state_dict}); default: train and cache one")
    parser.add_argument("--teachers-dir", dest="teachers_dir", help="teacher cache (default $KDLIB_HOME/teachers)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a recipe field (lr=0.1, milestones=[10,20], train_per_class=50, "
                             "teacher_epochs=5, amp=bf16, ...) or a method hyperparameter (beta=2); repeatable")
    parser.add_argument("--device", help="cpu, cuda, cuda:N or auto (default: auto)")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    parser.add_argument("--quiet", action="store_true", help="no per-epoch lines either")


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
    from kdlib import engine

    cfg = build_config(args)
    out = Path(cfg.out).expanduser()
    if out.exists() and not out.is_dir():
        raise KDLibError(f"--out {str(out)!r} exists and is not a directory")
    try:
        metrics = engine.train(cfg, progress=args.progress, verbose=not args.quiet)
    except engine.TrainingInterrupted as exc:
        print(f"interrupted: {exc}", file=sys.stderr)
        return 128 + int(exc.signum)
    return 0 if metrics.get("status") in ("finished", "paused") else 1
