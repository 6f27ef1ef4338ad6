"""``python -m kdlib sweep``: the command line (flags, --config, --dry-run, --summarize-only), and the
execution flags ``kdlib book --executor`` shares."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Dict

from kdlib.errors import KDLibError
from kdlib.runs import EXECUTORS, plan, print_plan
from kdlib.runs.summary import SUMMARY, print_tables, write_summary
from kdlib.sweep.grid import SLURM_FLAGS, GridSpec, grid_names, load_grid, parse_overrides
from kdlib.sweep.runner import run_sweep


def add_execution_arguments(parser: argparse.ArgumentParser, book: bool = False) -> None:
    """--executor, --workers, --threads, the --slurm-* options (and for a sweep --device, --no-wait)."""
    x = parser.add_argument_group("execution" if not book else "the book's runs on an executor")
    x.add_argument("--executor", choices=[e for e in EXECUTORS if not book or e != "inline"],
                   help=("train every chapter's runs first, then execute the chapters: " if book else "")
                   + "local: subprocesses via submitit" + (" (default)" if not book else "") + "; slurm: array jobs, "
                   "the teachers' first; pool: worker processes" + ("" if book else "; inline: in this process"))
    x.add_argument("--workers", type=_int_arg, help="local and pool: runs at once (default 1)")
    x.add_argument("--threads", type=_int_arg,
                   help="torch threads of every run, under every executor (default: --slurm-cpus, at most this "
                        "machine's cores / --workers; CPU numbers depend on it)")
    if not book:
        x.add_argument("--device", help="cpu, cuda or auto for every run (default auto)")
        x.add_argument("--no-wait", dest="wait", action="store_false", help="slurm: submit and return")
    helps = {"gpus": "GPUs per run (default 1)", "cpus": "CPUs per run (default 4)",
             "time_min": "time limit per task: minutes or [D-]HH:MM[:SS] (default 24:00:00; runs resume when "
                         "requeued)", "mem_gb": "memory per task, GB", "array_parallelism": "tasks at once (default 16)",
             "runs_per_task": "runs one after the other in each array task (default 1)"}
    for name, flag in SLURM_FLAGS.items():
        kind = {"gpus": _int_arg, "cpus": _int_arg, "array_parallelism": _int_arg, "runs_per_task": _int_arg,
                "mem_gb": float}.get(name, str)
        x.add_argument(flag, dest=f"slurm_{name}", type=kind, help=helps.get(name))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("grid (flags win over --config)")
    g.add_argument("--config", help=f"a grid YAML file, or a shipped grid: {', '.join(grid_names())}")
    g.add_argument("--methods", help="comma-separated methods (vanilla trains the students alone; all = every "
                                     "distillation method)")
    g.add_argument("--pairs", help="comma-separated TEACHER:STUDENT pairs (default: the profile's pair)")
    g.add_argument("--seeds", help="comma-separated seeds or ranges (0,1,2 or 0-4; default 0)")
    g.add_argument("--profile", help="smoke, course or paper (default smoke)")
    g.add_argument("--dataset", help="synthetic or cifar100 (default: the profile's)")
    g.add_argument("--data-root", dest="data_root", help="folder holding cifar-100-python")
    g.add_argument("--epochs", type=_int_arg, help="epochs of every run (default: the profile's)")
    g.add_argument("--set", dest="overrides", nargs="+", action="extend", metavar="KEY=VALUE",
                   help="recipe field or method hyperparameter for every run that has it (lr=0.1 beta=2 "
                        "train_per_class=50); dkd.beta=2 names the method; repeatable")
    g.add_argument("--out", help="folder of the runs (OUT/runs/<profile>/...), summary.csv, aggregate.csv "
                                 "(default $KDLIB_HOME: the book's own runs, reused by the chapters)")
    t = parser.add_argument_group("teachers")
    t.add_argument("--teachers-dir", dest="teachers_dir", help="teacher cache shared by the runs (default OUT/teachers)")
    t.add_argument("--teacher-checkpoint-dir", dest="teacher_checkpoint_dir",
                   help="community checkpoints: DIR/<teacher>_vanilla/ckpt_epoch_240.pth")
    t.add_argument("--teacher-checkpoint", dest="teacher_checkpoints", action="append", metavar="ARCH=PATH",
                   help="checkpoint of one teacher architecture; repeatable")
    add_execution_arguments(parser)
    o = parser.add_argument_group("output")
    o.add_argument("--summarize-only", action="store_true", help="only rebuild OUT/summary.csv and aggregate.csv")
    o.add_argument("--dry-run", action="store_true", help="print the planned runs and their status, run nothing "
                                                          "(with --verbose: every run's resolved recipe)")
    o.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    o.add_argument("--verbose", action="store_true", help="inline: the engine's per-epoch lines")


def _int_arg(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


_SPEC_FLAGS = ("methods", "pairs", "seeds", "profile", "dataset", "data_root", "epochs", "out", "teachers_dir",
               "teacher_checkpoint_dir", "executor", "workers", "threads", "device")


def slurm_from_args(args: argparse.Namespace, base: Any = None) -> Dict[str, Any]:
    slurm = dict(base or {})
    slurm.update({("time" if name == "time_min" else name): getattr(args, f"slurm_{name}")
                  for name in SLURM_FLAGS if getattr(args, f"slurm_{name}", None) is not None})
    return slurm


def spec_from_args(args: argparse.Namespace) -> GridSpec:
    """The grid the command line describes: the --config file's values, then the flags on top."""
    data: Dict[str, Any] = dict(load_grid(args.config)) if args.config else {}
    if "set" in data:
        data["overrides"] = data.pop("set")
    data["overrides"] = parse_overrides(data.get("overrides"), args.config or "") + list(args.overrides or [])
    data.update({name: getattr(args, name) for name in _SPEC_FLAGS if getattr(args, name, None) is not None})
    checkpoints = dict(data.get("teacher_checkpoints") or {})
    for item in args.teacher_checkpoints or []:
        arch, sep, path = item.partition("=")
        if not sep or not arch.strip() or not path.strip():
            raise KDLibError(f"--teacher-checkpoint expects ARCH=PATH, got {item!r}")
        checkpoints[arch.strip()] = path.strip()
    data["teacher_checkpoints"] = checkpoints
    data["slurm"] = slurm_from_args(args, data.get("slurm"))
    return GridSpec.from_mapping(data, source=args.config or "")


def run(args: argparse.Namespace) -> int:
    if args.summarize_only:
        out = Path(args.out).expanduser() if args.out else GridSpec().root()
        print_tables(write_summary(out))
        return 0
    spec = spec_from_args(args)
    if args.dry_run:
        runs = plan(spec.configs(), root=spec.root())
        print_plan(runs, verbose=args.verbose)
        print(f"\n{len(runs)} runs planned in {spec.root()} (dry run: nothing started)")
        return 0
    result = run_sweep(spec, progress=args.progress, verbose=args.verbose, wait=args.wait, print_tables=True)
    if not args.wait:
        return 0
    if not result.ok:
        unfinished = int((result.summary["status"] != "finished").sum())
        print(f"{unfinished} of {result.planned} runs did not finish ({result.failed} failed): see "
              f"{result.out / SUMMARY}", file=sys.stderr)
    return 0 if result.ok else 1
