"""``python -m kdlib sweep``: a grid of methods x teacher/student pairs x seeds, run, summarised.

Examples::

    python -m kdlib sweep --methods kd,dkd --pairs resnet20:resnet8 --seeds 0,1 --epochs 1 --workers 2
    python -m kdlib sweep --config paper --executor slurm --slurm-partition gpu --out sweeps/paper \\
        --teacher-checkpoint-dir download_ckpts/cifar_teachers
    python -m kdlib sweep --summarize-only --out sweeps/paper

The grid comes from the flags, a YAML file (``--config FILE`` or a shipped grid of ``kdlib/grids/``) or
both, flags winning. :class:`GridSpec` is a thin front door: it gathers each run's profile, fields and
``--set`` items for :func:`kdlib.config.make_config`, the one place a recipe is assembled. The run layer
(:mod:`kdlib.runs`) plans the grid -- every run in the directory its identity names,
``OUT/runs/<profile>/<method>-<pair>-s<seed>-<hash>``, the same a chapter of the book gives it (``OUT``
defaults to ``$KDLIB_HOME``: the book reuses what a sweep trained, and the other way round), teachers to
train first -- checks everything before anything is submitted, skips finished runs, runs the rest
(``local``, ``slurm``, ``pool`` or ``inline``), and rebuilds ``OUT/summary.csv`` and ``OUT/aggregate.csv``
from the records. ``OUT/sweep.json`` keeps every planned run's resolved recipe; ``--dry-run`` prints the
plan. Teacher checkpoints: ``--teacher-checkpoint ARCH=PATH`` or ``--teacher-checkpoint-dir DIR`` (the
community layout ``{dir}/{teacher}_vanilla/ckpt_epoch_240.pth``). Exit code 0 when every run of the grid
finished, 1 otherwise.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import re
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Mapping, Optional, Tuple

from kdlib import config as kconfig
from kdlib import runs
from kdlib.errors import KDLibError, check_keys, unknown_name, whole_number
from kdlib.runs import ERROR, EXECUTORS, RunJob, SlurmOptions, execute_run, parse_time_minutes  # noqa: F401
from kdlib.runs import summary as run_summary
from kdlib.runs.summary import SUMMARY, aggregate, per_class_table, read_summary, summarize, write_summary  # noqa: F401

if TYPE_CHECKING:  # pandas is imported where tables are made
    import pandas as pd

GRIDS_DIR = Path(__file__).resolve().parent / "grids"
#: where the community checkpoints (RepDistiller/mdistiller ``cifar_teachers.tar``) keep each teacher
COMMUNITY_LAYOUT = "{dir}/{teacher}_vanilla/ckpt_epoch_240.pth"
#: grid dimensions: chosen with --methods/--pairs/--seeds/--profile/--out, never with --set
GRID_KEYS = ("method", "teacher", "student", "seed", "profile", "out", "teacher_checkpoint")
PLAN, JOBS_DIR = "sweep.json", "submitit"
#: --slurm-* flags of the command line, by SlurmOptions field (shared by `kdlib sweep` and `kdlib book`)
SLURM_FLAGS = {f.name: "--slurm-" + {"time_min": "time", "mem_gb": "mem"}.get(f.name, f.name).replace("_", "-")
               for f in dataclasses.fields(SlurmOptions)}


def _dedupe(items) -> list:
    return list(dict.fromkeys(items))


@dataclass
class GridSpec:
    """A sweep: the grid (methods x pairs x seeds), the shared recipe, where it goes and how it runs.

    ``None`` means "the profile's value"; ``out`` defaults to ``$KDLIB_HOME``, the book's own runs. The
    field names are the YAML keys of a grid file (``set`` is accepted for ``overrides``; ``slurm`` is a
    mapping of :class:`~kdlib.runs.SlurmOptions`; ``time`` may be written ``"HH:MM:SS"``).
    """

    methods: List[str] = field(default_factory=list)
    pairs: List[Tuple[str, str]] = field(default_factory=list)  # empty: the profile's teacher -> student
    seeds: List[int] = field(default_factory=lambda: [0])
    profile: str = "smoke"
    dataset: Optional[str] = None
    data_root: Optional[str] = None
    epochs: Optional[int] = None
    overrides: List[str] = field(default_factory=list)
    out: Optional[str] = None
    teachers_dir: Optional[str] = None  # None: OUT/teachers
    teacher_checkpoints: Dict[str, str] = field(default_factory=dict)
    teacher_checkpoint_dir: Optional[str] = None
    teacher_checkpoint_pattern: str = COMMUNITY_LAYOUT
    device: Optional[str] = None
    executor: str = "local"
    workers: int = 1
    threads: Optional[int] = None  # torch threads per run; None: see run_threads()
    slurm: SlurmOptions = field(default_factory=SlurmOptions)

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], source: str = "") -> "GridSpec":
        """A validated spec from a YAML-like mapping (lists may also be comma-separated strings)."""
        if not isinstance(data, Mapping):
            raise KDLibError(f"{_at(source)}a grid must be a mapping of grid keys, got {type(data).__name__}")
        data = {("overrides" if k == "set" else k): v for k, v in data.items()}
        names = [f.name for f in dataclasses.fields(cls)]
        check_keys(data, names, "key", _at(source), [n if n != "overrides" else "set" for n in names])
        return cls(**{k: v for k, v in data.items() if v is not None}).normalised(source)

    def normalised(self, source: str = "") -> "GridSpec":
        """Check and canonicalise the grid's own fields; the recipe's are checked where it is assembled
        (:meth:`configs`, :func:`kdlib.config.make_config`)."""
        from kdlib import methods

        s, at = copy.deepcopy(self), _at(source)
        distillers = [m for m in methods.names() if m != "vanilla"]  # what `all` stands for
        s.methods = _dedupe(m for n in _as_list(s.methods, "methods", at) for m in (distillers if n == "all" else [str(n)]))
        s.pairs = _dedupe(_pair(p, at) for p in _as_list(s.pairs, "pairs", at))
        s.seeds = _dedupe(_seeds(_as_list(s.seeds, "seeds", at), at))
        if not s.methods:
            raise KDLibError(f"{at}no methods given (--methods kd,dkd,...)")
        if not s.seeds:
            raise KDLibError(f"{at}no seeds given (--seeds 0,1,2)")
        s.overrides = parse_overrides(s.overrides)
        if s.executor not in EXECUTORS:
            raise unknown_name("executor", str(s.executor), EXECUTORS)
        s.workers = whole_number(s.workers, f"{at}workers")
        s.threads = None if s.threads is None else whole_number(s.threads, f"{at}threads")
        if not isinstance(s.teacher_checkpoints, Mapping):
            raise KDLibError(f"{at}teacher_checkpoints must map a teacher architecture to a file")
        s.teacher_checkpoints = {str(k): str(v) for k, v in s.teacher_checkpoints.items()}
        if "{teacher}" not in str(s.teacher_checkpoint_pattern):
            raise KDLibError(f"{at}teacher_checkpoint_pattern must contain {{teacher}}, e.g. {COMMUNITY_LAYOUT!r}")
        s.slurm = SlurmOptions.from_mapping(s.slurm, at)
        return s

    def root(self) -> Path:
        """The folder the runs go to (``OUT/runs/...``, ``OUT/teachers``): ``--out``, else ``$KDLIB_HOME``."""
        return Path(self.out).expanduser().absolute() if self.out else kconfig.kdlib_home()

    def run_threads(self) -> int:
        """The thread count of every run of the grid, whatever the executor (:func:`kdlib.runs.run_threads`)."""
        return runs.run_threads(self.threads, self.slurm.cpus, self.workers)

    def configs(self) -> List[kconfig.RunConfig]:
        """Every run's validated config, or a :class:`KDLibError` naming the run and what is wrong."""
        from kdlib import methods

        spec = self.normalised()
        if spec.profile not in kconfig.PROFILES:
            raise unknown_name("profile", str(spec.profile), kconfig.PROFILES)
        preset = kconfig.PROFILES[spec.profile]
        pairs = spec.pairs or [(preset["teacher"], preset["student"])]
        scoped = scope_overrides(spec.overrides, spec.methods)  # unknown methods refused here
        checkpoints = self._checkpoints(pairs)
        shared = {"teachers_dir": _absolute(spec.teachers_dir or spec.root() / "teachers"), "dataset": spec.dataset,
                  "epochs": spec.epochs, "device": spec.device, "data_root": _absolute(spec.data_root)}
        shared = {k: v for k, v in shared.items() if v is not None}
        configs = []
        for method in spec.methods:
            uses_teacher = methods.get(method).uses_teacher
            for teacher, student in _dedupe((t if uses_teacher else None, s) for t, s in pairs):
                extra = {"teacher_checkpoint": checkpoints[teacher]} if teacher in checkpoints else {}
                for seed in spec.seeds:
                    try:
                        configs.append(kconfig.make_config(spec.profile, overrides=scoped[method], **shared, **extra,
                                                           method=method, teacher=teacher, student=student, seed=seed))
                    except KDLibError as exc:
                        raise KDLibError(f"{method} {teacher or '-'}:{student} seed {seed}: {exc}") from None
        return configs

    def _checkpoints(self, pairs: List[Tuple[str, str]]) -> Dict[str, str]:
        """Absolute checkpoint path per teacher (explicit mapping first, then the directory pattern); absolute
        because the path is part of a run's identity: the same file named from elsewhere is the same run."""
        found, missing = {}, []
        for teacher in _dedupe(t for t, _ in pairs):
            path = self.teacher_checkpoints.get(teacher)
            if path is None and self.teacher_checkpoint_dir:
                path = self.teacher_checkpoint_pattern.format(dir=self.teacher_checkpoint_dir.rstrip("/"), teacher=teacher)
            if path is not None:
                found[teacher] = _absolute(path)
                missing += [f"{teacher}: {found[teacher]}"] if not Path(found[teacher]).is_file() else []
        if missing:
            raise KDLibError(f"teacher checkpoint(s) not found: {'; '.join(missing)} (layout "
                             f"{self.teacher_checkpoint_pattern!r}; unpack cifar_teachers.tar or drop "
                             f"--teacher-checkpoint-dir to train the teachers)")
        return found

    def command(self) -> str:
        """A ``python -m kdlib sweep`` command line that describes this grid: running it again skips the
        finished runs and resumes the others (what the summary offers for a run left unfinished)."""
        s, d = self, SlurmOptions()
        args = ["python", "-m", "kdlib", "sweep", "--methods", ",".join(s.methods),
                "--seeds", ",".join(map(str, s.seeds)), "--profile", s.profile]
        if s.pairs:
            args += ["--pairs", ",".join(f"{t}:{u}" for t, u in s.pairs)]
        args += flag_words((("--dataset", s.dataset), ("--data-root", s.data_root), ("--epochs", s.epochs),
                            ("--teachers-dir", s.teachers_dir), ("--teacher-checkpoint-dir", s.teacher_checkpoint_dir),
                            ("--device", s.device), ("--threads", s.threads)))
        args += flag_words(("--teacher-checkpoint", f"{arch}={path}") for arch, path in sorted(s.teacher_checkpoints.items()))
        args += ["--set", *s.overrides] if s.overrides else []
        args += ["--executor", s.executor] + (["--workers", str(s.workers)] if s.workers != 1 else [])
        if s.executor == "slurm":
            args += flag_words((flag, getattr(s.slurm, name)) for name, flag in SLURM_FLAGS.items()
                               if getattr(s.slurm, name) != getattr(d, name))
        return shlex.join(args + (["--out", str(s.out)] if s.out else []))

    def to_dict(self) -> Dict[str, Any]:
        return {**dataclasses.asdict(self), "pairs": [f"{t}:{s}" for t, s in self.pairs]}


def flag_words(pairs) -> List[str]:
    """``[flag, value, ...]`` of the ``(flag, value)`` pairs whose value is set: a command line's options."""
    return [word for flag, value in pairs if value is not None for word in (flag, str(value))]


def _at(source: str) -> str:
    """Error prefix naming the grid file a bad value came from (nothing for the command line)."""
    return f"{source}: " if source else ""


def _absolute(path: Any) -> Optional[str]:
    return os.path.abspath(os.path.expanduser(str(path))) if path else None


def scope_overrides(overrides: List[str], method_names: List[str]) -> Dict[str, List[str]]:
    """The ``--set`` items each method's runs receive: a recipe field (``lr=0.1``) goes to every run, a
    hyperparameter to the methods that have it (``beta=2`` to DKD, not to KD), ``dkd.beta=2`` to DKD
    alone. A key no method of the grid knows is an error, as is a grid dimension (``--set seed=1``). What
    a key means for one run is :func:`kdlib.config.apply_overrides`' business; this only picks the runs.
    """
    from kdlib import methods

    fields = [f for f in kconfig.field_names() if f != "method_params"]
    hparams = {m: list(methods.get(m).defaults) for m in method_names}
    scoped: Dict[str, List[str]] = {m: [] for m in method_names}
    for item in overrides:
        key, equals, value = item.partition("=")
        if not equals or not key.strip():
            raise KDLibError(f"--set expects key=value, got {item!r}")
        target, _, name = key.strip().rpartition(".")
        if target not in ("", "method_params", *method_names):
            raise KDLibError(f"--set {item!r}: {target!r} is not a method of this grid ({', '.join(method_names)})")
        if name in GRID_KEYS:
            raise KDLibError(f"--set {name}=... is a grid dimension: use --methods, --pairs, --seeds, "
                             f"--profile, --out or --teacher-checkpoint")
        is_field = name in fields and target != "method_params"
        owners = [m for m in method_names if target in ("", "method_params", m) and (is_field or name in hparams[m])]
        if not owners:
            where = f"method {target!r}" if target in method_names else "any method of this grid"
            valid = sorted(set(fields) - set(GRID_KEYS)) + sorted({h for hs in hparams.values() for h in hs})
            raise KDLibError(f"unknown --set key {key.strip()!r} (not a recipe field, nor a hyperparameter of "
                             f"{where}); valid keys: {', '.join(valid)}")
        for m in owners:
            scoped[m].append(f"{name}={value}" if is_field else f"method_params.{name}={value}")
    return scoped


def _as_list(value: Any, name: str, at: str) -> List[Any]:
    """A YAML list or a comma-separated string (``"kd,dkd"``) as a list; a number as a list of one."""
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    if isinstance(value, (list, tuple)):
        return [x for item in value for x in (_as_list(item, name, at) if isinstance(item, str) else [item])]
    if isinstance(value, int) and not isinstance(value, bool):
        return [value]
    raise KDLibError(f"{at}{name} must be a list or a comma-separated string, got {value!r}")


def _pair(value: Any, at: str) -> Tuple[str, str]:
    if isinstance(value, Mapping) and set(value) == {"teacher", "student"}:
        parts = [value["teacher"], value["student"]]
    else:
        parts = list(value) if isinstance(value, (list, tuple)) else value.split(":") if isinstance(value, str) else []
    parts = [str(p).strip() for p in parts]
    if len(parts) != 2 or not all(parts):
        raise KDLibError(f"{at}a pair is TEACHER:STUDENT (e.g. resnet56:resnet20), got {value!r}")
    return parts[0], parts[1]


def _seeds(items: List[Any], at: str) -> List[int]:
    """Seeds and ranges of seeds: ``0,1,2`` or ``0-4``."""
    found: List[int] = []
    for item in items:
        span = re.fullmatch(r"\s*(\d+)\s*-\s*(\d+)\s*", item) if isinstance(item, str) else None
        if span:
            found += range(int(span[1]), int(span[2]) + 1)
        else:
            found.append(whole_number(item, f"{at}a seed (--seeds 0,1,2 or 0-4)", 0))
    return found


def parse_overrides(value: Any) -> List[str]:
    """``--set`` items as ``key=value`` strings (checked where they are applied,
    :func:`kdlib.config.apply_overrides`); a YAML mapping ``{lr: 0.1}`` is accepted too."""
    if isinstance(value, Mapping):
        return [f"{k}={v if isinstance(v, str) else json.dumps(v)}" for k, v in value.items()]
    return [str(item) for item in ([value] if isinstance(value, str) else value or [])]


def grid_names() -> List[str]:
    """The grids shipped in ``kdlib/grids/`` (``--config NAME``)."""
    return sorted(p.stem for p in GRIDS_DIR.glob("*.yaml"))


def load_grid(name_or_path: str) -> Dict[str, Any]:
    """The raw mapping of a grid file or a shipped grid's name (validated by :meth:`GridSpec.from_mapping`)."""
    import yaml

    path = Path(str(name_or_path)).expanduser()
    if not path.is_file():
        if name_or_path not in grid_names():
            raise KDLibError(f"grid {name_or_path!r} is neither a file nor a shipped grid; shipped grids: "
                             f"{', '.join(grid_names())}")
        path = GRIDS_DIR / f"{name_or_path}.yaml"
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise KDLibError(f"cannot read grid {str(path)!r}: {exc}") from None
    if not isinstance(data, dict):
        raise KDLibError(f"grid {str(path)!r} must be a mapping of grid keys (methods, pairs, seeds, ...)")
    return data


# -- the sweep -----------------------------------------------------------------------------------------
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


def plan(spec: GridSpec) -> List[runs.Run]:
    """The grid's runs in the folder ``spec.root()``, teachers to train first; validated, nothing written."""
    return runs.plan(spec.configs(), root=spec.root())


def run_sweep(spec: GridSpec, *, progress: bool = True, verbose: bool = False, wait: bool = True,
              print_tables: bool = False) -> SweepResult:
    """Plan, skip what is finished, run the rest with ``spec.executor``, write the summaries.

    ``verbose`` prints the engine's per-epoch lines (inline executor; jobs write them to their logs).
    ``wait=False`` (Slurm only) returns once the arrays are submitted; summarise later.
    """
    spec = spec.normalised()
    out, planned_runs = spec.root(), plan(spec)  # every check before anything is written or submitted
    if spec.executor == "slurm":  # the options checked against the cluster before anything is written
        runs.slurm.executor(spec.slurm, out / JOBS_DIR)
    if not wait and spec.executor != "slurm":
        raise KDLibError("--no-wait applies to --executor slurm only")
    runs.write_plan(out / PLAN, planned_runs, {"command": spec.command(), "spec": spec.to_dict()})
    todo = [r for r in planned_runs if not r.finished()]
    try:
        outcomes, job_ids = runs.execute(todo, spec.executor, folder=out / JOBS_DIR, workers=spec.workers,
                                         threads=spec.run_threads(), device=spec.device, slurm=spec.slurm,
                                         progress=progress, wait=wait, verbose=verbose, resume=spec.command(),
                                         desc="sweep")
    finally:
        summary = write_summary(out)
    grid = [r for r in planned_runs if r.role == "run"]
    mine = summary[summary["run_dir"].isin({r.run_dir.relative_to(out).as_posix() for r in grid})]
    locked = [o for o in outcomes if o.status == "locked" and o.run.role == "run"]
    if print_tables:
        run_summary.print_tables(mine)
        for o in locked:
            print(f"skipped (being trained elsewhere: {o.error or 'lock released since'}): {o.run.label}")
        if job_ids and not wait:
            print(f"submitted Slurm job(s) {', '.join(job_ids)}; when they are done: "
                  f"python -m kdlib sweep --summarize-only --out {out}")
    students = [r for r in todo if r.role == "run"]
    return SweepResult(out, len(grid), len(grid) - len(students), len(students) - len(locked), len(locked),
                       mine.reset_index(drop=True), aggregate(summary), job_ids, len(todo) - len(students))


# -- the command line ----------------------------------------------------------------------------------
def add_execution_arguments(parser: argparse.ArgumentParser, book: bool = False) -> None:
    """--executor, --workers, --threads, the --slurm-* options (and for a sweep --device, --no-wait)."""
    x = parser.add_argument_group("execution" if not book else "the book's runs on an executor")
    x.add_argument("--executor", choices=[e for e in EXECUTORS if not book or e != "inline"],
                   help=("train every chapter's runs first, then execute the chapters: " if book else "")
                   + "local: subprocesses via submitit" + (" (default)" if not book else "") + "; slurm: array jobs, "
                   "the teachers' first; pool: worker processes" + ("" if book else "; inline: in this process"))
    x.add_argument("--workers", type=int, help="local and pool: runs at once (default 1)")
    x.add_argument("--threads", type=int,
                   help="torch threads of every run, under every executor (default: --slurm-cpus, at most this "
                        "machine's cores / --workers; CPU numbers depend on it)")
    if not book:
        x.add_argument("--device", help="cpu, cuda or auto for every run (default auto)")
        x.add_argument("--no-wait", dest="wait", action="store_false", help="slurm: submit and return")
    helps = {"gpus": "GPUs per run (default 1)", "cpus": "CPUs per run (default 4)",
             "time_min": "time limit per task: minutes or [D-]HH:MM[:SS] (default 24:00:00; runs resume when "
                         "requeued)", "mem_gb": "memory per task, GB", "array_parallelism": "tasks at once (default 16)",
             "runs_per_task": "runs one after the other in each array task (default 1)"}
    kinds = {"gpus": int, "cpus": int, "array_parallelism": int, "runs_per_task": int, "mem_gb": float}
    for name, flag in SLURM_FLAGS.items():
        x.add_argument(flag, dest=f"slurm_{name}", type=kinds.get(name, str), help=helps.get(name))


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
    g.add_argument("--epochs", type=int, help="epochs of every run (default: the profile's)")
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


_SPEC_FLAGS = ("methods", "pairs", "seeds", "profile", "dataset", "data_root", "epochs", "out", "teachers_dir",
               "teacher_checkpoint_dir", "executor", "workers", "threads", "device")


def slurm_from_args(args: argparse.Namespace, base: Any = None) -> Dict[str, Any]:
    return {**(base or {}), **{("time" if name == "time_min" else name): getattr(args, f"slurm_{name}")
                               for name in SLURM_FLAGS if getattr(args, f"slurm_{name}", None) is not None}}


def spec_from_args(args: argparse.Namespace) -> GridSpec:
    """The grid the command line describes: the --config file's values, then the flags on top."""
    data: Dict[str, Any] = dict(load_grid(args.config)) if args.config else {}
    data["overrides"] = parse_overrides(data.pop("set", data.get("overrides"))) + list(args.overrides or [])
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
        run_summary.print_tables(write_summary(Path(args.out).expanduser() if args.out else GridSpec().root()))
        return 0
    spec = spec_from_args(args)
    if args.dry_run:
        planned = plan(spec)
        runs.print_plan(planned, verbose=args.verbose)
        print(f"\n{len(planned)} runs planned in {spec.root()} (dry run: nothing started)")
        return 0
    result = run_sweep(spec, progress=args.progress, verbose=args.verbose, wait=args.wait, print_tables=True)
    if args.wait and not result.ok:
        unfinished = int((result.summary["status"] != "finished").sum())
        print(f"{unfinished} of {result.planned} runs did not finish ({result.failed} failed): see "
              f"{result.out / SUMMARY}", file=sys.stderr)
    return 0 if result.ok or not args.wait else 1
