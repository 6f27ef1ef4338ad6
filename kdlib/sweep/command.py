"""``python -m kdlib sweep``: the command line (flags, --config, --dry-run, --summarize-only)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict

from kdlib.errors import KDLibError
from kdlib.sweep.common import EXECUTORS, SUMMARY
from kdlib.sweep.grid import GridSpec, _parse_overrides, grid_names, load_grid
from kdlib.sweep.jobs import RunLock
from kdlib.sweep.planning import _is_finished, plan
from kdlib.sweep.runner import run_sweep
from kdlib.sweep.summary import _print_tables, aggregate, write_summary

if TYPE_CHECKING:  # pandas is imported where tables are made
    import pandas as pd


# == command line =====================================================================================
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
    g.add_argument("--out", help="sweep directory: runs/, teachers/, summary.csv, aggregate.csv")
    t = parser.add_argument_group("teachers")
    t.add_argument("--teachers-dir", dest="teachers_dir",
                   help="teacher cache shared by the runs (default OUT/teachers)")
    t.add_argument("--teacher-checkpoint-dir", dest="teacher_checkpoint_dir",
                   help="community checkpoints: DIR/<teacher>_vanilla/ckpt_epoch_240.pth")
    t.add_argument("--teacher-checkpoint", dest="teacher_checkpoints", action="append", metavar="ARCH=PATH",
                   help="checkpoint of one teacher architecture; repeatable")
    x = parser.add_argument_group("execution")
    x.add_argument("--executor", choices=EXECUTORS, help="local (default): subprocesses via submitit; slurm: "
                                                         "an array job; inline: in this process")
    x.add_argument("--workers", type=_int_arg, help="local: runs at once (default 1)")
    x.add_argument("--threads", type=_int_arg,
                   help="torch threads of every run, under every executor (default: --slurm-cpus, at most this "
                        "machine's cores / --workers; CPU numbers depend on it)")
    x.add_argument("--device", help="cpu, cuda or auto for every run (default auto)")
    x.add_argument("--slurm-partition", dest="slurm_partition")
    x.add_argument("--slurm-gpus", dest="slurm_gpus", type=_int_arg, help="GPUs per run (default 1)")
    x.add_argument("--slurm-cpus", dest="slurm_cpus", type=_int_arg, help="CPUs per run (default 4)")
    x.add_argument("--slurm-time", dest="slurm_time", help="time limit per run: minutes or [D-]HH:MM[:SS] "
                                                          "(default 24:00:00; runs resume when requeued)")
    x.add_argument("--slurm-mem", dest="slurm_mem_gb", type=float, help="memory per run, GB")
    x.add_argument("--slurm-array-parallelism", dest="slurm_array_parallelism", type=_int_arg,
                   help="array tasks running at once (default 16)")
    x.add_argument("--slurm-account", dest="slurm_account")
    x.add_argument("--slurm-qos", dest="slurm_qos")
    x.add_argument("--no-wait", dest="wait", action="store_false", help="slurm: submit and return")
    o = parser.add_argument_group("output")
    o.add_argument("--summarize-only", action="store_true", help="only rebuild OUT/summary.csv and aggregate.csv")
    o.add_argument("--dry-run", action="store_true", help="print the planned runs and their status, run nothing")
    o.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    o.add_argument("--verbose", action="store_true", help="inline: the engine's per-epoch lines")


def _int_arg(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


_SLURM_FLAGS = {"slurm_partition": "partition", "slurm_gpus": "gpus", "slurm_cpus": "cpus",
                "slurm_time": "time", "slurm_mem_gb": "mem_gb", "slurm_array_parallelism": "array_parallelism",
                "slurm_account": "account", "slurm_qos": "qos"}
_SPEC_FLAGS = ("methods", "pairs", "seeds", "profile", "dataset", "data_root", "epochs", "out", "teachers_dir",
               "teacher_checkpoint_dir", "executor", "workers", "threads", "device")


def spec_from_args(args: argparse.Namespace) -> GridSpec:
    """The grid the command line describes: the --config file's values, then the flags on top."""
    data: Dict[str, Any] = dict(load_grid(args.config)) if args.config else {}
    if "set" in data:
        data["overrides"] = data.pop("set")
    data["overrides"] = _parse_overrides(data.get("overrides"), args.config or "") + list(args.overrides or [])
    for name in _SPEC_FLAGS:
        if getattr(args, name, None) is not None:
            data[name] = getattr(args, name)
    checkpoints = dict(data.get("teacher_checkpoints") or {})
    for item in args.teacher_checkpoints or []:
        arch, sep, path = item.partition("=")
        if not sep or not arch.strip() or not path.strip():
            raise KDLibError(f"--teacher-checkpoint expects ARCH=PATH, got {item!r}")
        checkpoints[arch.strip()] = path.strip()
    data["teacher_checkpoints"] = checkpoints
    slurm = dict(data.get("slurm") or {})
    slurm.update({key: getattr(args, flag) for flag, key in _SLURM_FLAGS.items()
                  if getattr(args, flag, None) is not None})
    data["slurm"] = slurm
    return GridSpec.from_mapping(data, source=args.config or "")


def run(args: argparse.Namespace) -> int:
    if args.summarize_only:
        if not args.out:
            raise KDLibError("--summarize-only needs --out DIR (the sweep directory)")
        summary = write_summary(args.out)
        _print_tables(summary, aggregate(summary), None, [], [], True, Path(args.out))
        return 0
    spec = spec_from_args(args)
    if args.dry_run:
        return _dry_run(spec)
    result = run_sweep(spec, progress=args.progress, verbose=args.verbose, wait=args.wait, print_tables=True)
    if not args.wait:
        return 0
    if not result.ok:
        unfinished = int((result.summary["status"] != "finished").sum())
        print(f"{unfinished} of {result.planned} runs did not finish ({result.failed} failed): see "
              f"{result.out / SUMMARY}", file=sys.stderr)
    return 0 if result.ok else 1


def _dry_run(spec: GridSpec) -> int:
    import pandas as pd

    runs = plan(spec)
    rows = [{"method": r.method, "pair": f"{r.teacher}->{r.student}" if r.teacher else r.student, "seed": r.seed,
             "status": "finished" if _is_finished(r) else ("running" if RunLock.holder(r.run_dir) else "to run"),
             "run_dir": r.rel_dir, "overrides": r.overrides} for r in runs]
    with pd.option_context("display.width", 200, "display.max_rows", 1000, "display.max_colwidth", 80):
        print(pd.DataFrame(rows).to_string(index=False))
    print(f"\n{len(runs)} runs planned in {Path(spec.out).expanduser().absolute()} (dry run: nothing started)")
    return 0
