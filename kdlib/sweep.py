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

import argparse
import collections
import copy
import dataclasses
import hashlib
import json
import math
import os
import platform
import re
import sys
import time
import traceback
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, Iterable, List, Mapping, Optional, Tuple

from kdlib import config as kconfig
from kdlib.errors import KDLibError, unknown_name
from kdlib.io import atomic_write, atomic_write_json

try:  # POSIX; without it (Windows) runs are not locked against a second sweep
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None  # type: ignore[assignment]

try:
    from submitit.helpers import Checkpointable as _JobBase
except ImportError:  # pragma: no cover - submitit is a dependency; inline mode works without it
    _JobBase = object  # type: ignore[assignment,misc]

if TYPE_CHECKING:  # pandas is imported where tables are made: `python -m kdlib train` does not need it
    import pandas as pd

__all__ = ["GridSpec", "SlurmOptions", "PlannedRun", "SweepResult", "RunLock", "RunLocked", "RunJob",
           "load_grid", "grid_names", "plan", "run_sweep", "execute_run", "summarize", "write_summary",
           "read_summary", "aggregate", "per_class_table", "EXECUTORS", "COMMUNITY_LAYOUT"]

GRIDS_DIR = Path(__file__).resolve().parent / "grids"
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


# == the grid ========================================================================================
@dataclass
class SlurmOptions:
    """Resources of each Slurm array task (submitit's AutoExecutor parameters)."""

    partition: Optional[str] = None
    gpus: int = 1
    cpus: int = 4
    time_min: int = 24 * 60
    array_parallelism: int = 16
    mem_gb: Optional[float] = None
    account: Optional[str] = None
    qos: Optional[str] = None


@dataclass
class GridSpec:
    """A sweep: the grid (methods x pairs x seeds), the shared recipe, where it goes and how it runs.

    ``None`` means "the profile's value". The field names are the YAML keys of a grid file (``set`` is
    accepted for ``overrides``; ``slurm`` is a mapping of :class:`SlurmOptions`; ``time`` may be written
    ``"HH:MM:SS"``).
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
    threads: Optional[int] = None  # torch threads per job; None: cores / workers (local), --slurm-cpus
    slurm: SlurmOptions = field(default_factory=SlurmOptions)

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], source: str = "") -> "GridSpec":
        """A validated spec from a YAML-like mapping (lists may also be comma-separated strings)."""
        if not isinstance(data, Mapping):
            raise KDLibError(f"{_at(source)}a grid must be a mapping of grid keys, got {type(data).__name__}")
        data = dict(data)
        if "set" in data:
            data["overrides"] = data.pop("set")
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(data) - set(names))
        if unknown:
            raise KDLibError(f"{_at(source)}unknown key {', '.join(map(repr, unknown))}; valid keys: "
                             f"{', '.join(n if n != 'overrides' else 'set' for n in names)}")
        values = {k: v for k, v in data.items() if v is not None}
        spec = cls(**{k: v for k, v in values.items() if k != "slurm"})
        spec.slurm = _slurm_options(data.get("slurm"), source)
        return spec.normalised(source)

    def normalised(self, source: str = "") -> "GridSpec":
        """Check and canonicalise every field (names are checked against the registries in :func:`plan`)."""
        s = copy.deepcopy(self)
        s.methods = _dedupe(_expand_methods(_as_list(s.methods, "methods", source)))
        if not s.methods:
            raise KDLibError(f"{_at(source)}no methods given (--methods kd,dkd,...)")
        s.pairs = _dedupe([_parse_pair(p, source) for p in _as_list(s.pairs, "pairs", source)])
        s.seeds = _dedupe([_parse_seed(x, source) for x in _expand_seed_ranges(_as_list(s.seeds, "seeds", source))])
        if not s.seeds:
            raise KDLibError(f"{_at(source)}no seeds given (--seeds 0,1,2)")
        s.overrides = _parse_overrides(s.overrides, source)
        if s.executor not in EXECUTORS:
            raise unknown_name("executor", str(s.executor), EXECUTORS)
        s.workers = _positive_int(s.workers, "workers", source)
        if s.threads is not None:
            s.threads = _positive_int(s.threads, "threads", source)
        if s.epochs is not None:
            s.epochs = _positive_int(s.epochs, "epochs", source)
        if not isinstance(s.teacher_checkpoints, Mapping):
            raise KDLibError(f"{_at(source)}teacher_checkpoints must map a teacher architecture to a file")
        s.teacher_checkpoints = {str(k): str(v) for k, v in s.teacher_checkpoints.items()}
        if "{teacher}" not in str(s.teacher_checkpoint_pattern):
            raise KDLibError(f"{_at(source)}teacher_checkpoint_pattern must contain {{teacher}}, "
                             f"e.g. {COMMUNITY_LAYOUT!r}")
        return s

    def to_dict(self) -> Dict[str, Any]:
        data = dataclasses.asdict(self)
        data["pairs"] = [f"{t}:{s}" for t, s in self.pairs]
        return data


def _at(source: str) -> str:
    """Error prefix naming the grid file a bad value came from (nothing for the command line)."""
    return f"{source}: " if source else ""


def _slurm_options(value: Any, source: str) -> SlurmOptions:
    if value is None:
        return SlurmOptions()
    if isinstance(value, SlurmOptions):
        value = dataclasses.asdict(value)
    if not isinstance(value, Mapping):
        raise KDLibError(f"{_at(source)}slurm must be a mapping (partition, gpus, cpus, time, ...)")
    data = dict(value)
    if "time" in data:
        data["time_min"] = parse_time_minutes(data.pop("time"))
    names = [f.name for f in dataclasses.fields(SlurmOptions)]
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise KDLibError(f"{_at(source)}unknown slurm key {', '.join(map(repr, unknown))}; valid: "
                         f"{', '.join(n if n != 'time_min' else 'time' for n in names)}")
    opts = SlurmOptions(**{k: v for k, v in data.items() if v is not None})
    for name in ("gpus",):
        if isinstance(opts.gpus, bool) or not isinstance(opts.gpus, int) or opts.gpus < 0:
            raise KDLibError(f"{_at(source)}slurm {name} must be an integer >= 0, got {opts.gpus!r}")
    for name in ("cpus", "time_min", "array_parallelism"):
        setattr(opts, name, _positive_int(getattr(opts, name), f"slurm {name}", source))
    return opts


def parse_time_minutes(value: Any) -> int:
    """Slurm-style time limits as whole minutes: ``90``, ``"90"``, ``"HH:MM:SS"``, ``"D-HH:MM"``."""
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    text = str(value).strip()
    match = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", text)
    if not match:
        raise KDLibError(f"slurm time must be minutes or [D-]HH:MM[:SS], got {value!r}")
    days, first, second, third = match.groups()
    if second is None and days is None:
        minutes = int(first)
    elif third is None and days is None:  # HH:MM... slurm reads "MM:SS" here; people mean HH:MM
        minutes = int(first) * 60 + int(second)
    else:
        hours, mins, secs = int(first), int(second or 0), int(third or 0)
        minutes = int(days or 0) * 1440 + hours * 60 + mins + math.ceil(secs / 60)
    if minutes < 1:
        raise KDLibError(f"slurm time must be at least one minute, got {value!r}")
    return minutes


def _as_list(value: Any, name: str, source: str) -> List[Any]:
    if value is None:
        return []
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return [value]
    if isinstance(value, (list, tuple)):
        out: List[Any] = []
        for item in value:
            out.extend(_as_list(item, name, source) if isinstance(item, str) and "," in item else [item])
        return out
    raise KDLibError(f"{_at(source)}{name} must be a list or a comma-separated string, got {value!r}")


def _dedupe(items: Iterable[Any]) -> List[Any]:
    seen, out = set(), []
    for item in items:
        if item not in seen:
            seen.add(item)
            out.append(item)
    return out


def _expand_methods(names: List[Any]) -> List[str]:
    """``all`` stands for every registered distillation method (vanilla not included)."""
    from kdlib import methods

    out: List[str] = []
    for name in names:
        if not isinstance(name, str):
            raise KDLibError(f"a method must be a name, got {name!r}")
        out.extend([m for m in methods.names() if m != "vanilla"] if name == "all" else [name])
    return out


def _parse_pair(value: Any, source: str) -> Tuple[str, str]:
    if isinstance(value, Mapping) and set(value) == {"teacher", "student"}:
        parts = [value["teacher"], value["student"]]
    elif isinstance(value, (list, tuple)):
        parts = list(value)
    elif isinstance(value, str):
        parts = value.split(":")
    else:
        parts = []
    parts = [str(p).strip() for p in parts]
    if len(parts) != 2 or not all(parts):
        raise KDLibError(f"{_at(source)}a pair is TEACHER:STUDENT (e.g. resnet56:resnet20), got {value!r}")
    return parts[0], parts[1]


def _expand_seed_ranges(items: List[Any]) -> List[Any]:
    out: List[Any] = []
    for item in items:
        match = re.fullmatch(r"\s*(\d+)\s*-\s*(\d+)\s*", item) if isinstance(item, str) else None
        out.extend(range(int(match.group(1)), int(match.group(2)) + 1) if match else [item])
    return out


def _parse_seed(value: Any, source: str) -> int:
    try:
        seed = int(value) if not isinstance(value, (bool, float)) else None
    except (TypeError, ValueError):
        seed = None
    if seed is None or seed < 0:
        raise KDLibError(f"{_at(source)}a seed is an integer >= 0 (--seeds 0,1,2 or 0-4), got {value!r}")
    return seed


def _positive_int(value: Any, name: str, source: str) -> int:
    try:
        number = int(value) if not isinstance(value, (bool, float)) else None
    except (TypeError, ValueError):
        number = None
    if number is None or number < 1:
        raise KDLibError(f"{_at(source)}{name} must be an integer >= 1, got {value!r}")
    return number


def _parse_overrides(value: Any, source: str) -> List[str]:
    """``--set`` items as ``key=value`` strings; a YAML mapping ``{lr: 0.1}`` is accepted too."""
    if value is None:
        return []
    if isinstance(value, Mapping):
        return [f"{k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in value.items()]
    items = [value] if isinstance(value, str) else list(value)
    for item in items:
        if not isinstance(item, str) or "=" not in item or not item.partition("=")[0].strip():
            raise KDLibError(f"{_at(source)}--set expects key=value, got {item!r}")
    return [str(item) for item in items]


# -- grid files ----------------------------------------------------------------------------------
def grid_names() -> List[str]:
    """The grids shipped in ``kdlib/grids/`` (``--config NAME``)."""
    return sorted(p.stem for p in GRIDS_DIR.glob("*.yaml"))


def _grid_path(name_or_path: str) -> Path:
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return path
    if name_or_path in grid_names():
        return GRIDS_DIR / f"{name_or_path}.yaml"
    raise KDLibError(f"grid {name_or_path!r} is neither a file nor a shipped grid; shipped grids: "
                     f"{', '.join(grid_names())}")


def load_grid(name_or_path: str) -> Dict[str, Any]:
    """The raw mapping of a grid file or a shipped grid's name (validated by :meth:`GridSpec.from_mapping`)."""
    import yaml

    path = _grid_path(str(name_or_path))
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise KDLibError(f"cannot read grid {str(path)!r}: {exc}") from None
    if not isinstance(data, dict):
        raise KDLibError(f"grid {str(path)!r} must be a mapping of grid keys (methods, pairs, seeds, ...)")
    return data


# == the plan ========================================================================================
@dataclass
class PlannedRun:
    """One run of the grid: what it is, where it goes, and its validated config."""

    method: str
    teacher: Optional[str]
    student: str
    seed: int
    override_hash: str
    overrides: str  # readable: "beta=2.0 lr=0.1" (the non-default values behind the hash)
    run_dir: Path
    rel_dir: str  # relative to the sweep's --out (portable: the CSVs use it)
    config: kconfig.RunConfig

    @property
    def label(self) -> str:
        pair = f"{self.teacher}->{self.student}" if self.teacher else self.student
        suffix = f" [{self.overrides}]" if self.overrides else ""
        return f"{self.method} {pair} seed {self.seed}{suffix}"

    def record(self) -> Dict[str, Any]:
        """What ``sweep.json`` keeps about the run (enough to list it as missing before it starts)."""
        return {"method": self.method, "teacher": self.teacher, "student": self.student, "seed": self.seed,
                "profile": self.config.profile, "dataset": self.config.dataset,
                "override_hash": self.override_hash, "overrides": self.overrides}


def plan(spec: GridSpec) -> List[PlannedRun]:
    """Expand and validate the grid: every run's config and directory, or a :class:`KDLibError`.

    Nothing is written. Runs whose directory holds a different run are refused here, all at once, so a
    sweep never starts half-way and then stops on a conflict.
    """
    from kdlib import methods

    spec = spec.normalised()
    if not spec.out:
        raise KDLibError("the sweep needs an output directory (--out DIR)")
    if spec.profile not in kconfig.PROFILES:
        raise unknown_name("profile", str(spec.profile), kconfig.PROFILES)
    for name in spec.methods:
        methods.get(name)  # unknown method -> KDLibError listing the valid ones
    out = Path(spec.out).expanduser().absolute()
    preset = kconfig.PROFILES[spec.profile]
    pairs = spec.pairs or [(preset["teacher"], preset["student"])]
    _check_architectures(pairs, spec.teacher_checkpoints)
    scoped = _scope_overrides(spec.overrides, spec.methods)
    checkpoints = _teacher_checkpoints(spec, pairs)
    shared = _shared_fields(spec, out)

    runs: List[PlannedRun] = []
    for method in spec.methods:
        uses_teacher = methods.get(method).uses_teacher
        targets = _dedupe((t, s) if uses_teacher else (None, s) for t, s in pairs)
        for teacher, student in targets:
            for seed in spec.seeds:
                runs.append(_plan_run(spec, out, shared, method, teacher, student, seed,
                                      scoped[method], checkpoints.get(teacher)))
    _check_unique(runs)
    _check_conflicts(runs)
    return runs


def _check_architectures(pairs: List[Tuple[str, str]], checkpoints: Mapping[str, str]) -> None:
    from kdlib import models

    archs = list(models.names())
    for teacher, student in pairs:
        for role, name in (("teacher", teacher), ("student", student)):
            if name not in archs:
                raise KDLibError(f"unknown {role} architecture {name!r} in pair {teacher}:{student}; valid "
                                 f"architectures: {', '.join(archs)}")
    for name in checkpoints:
        if name not in archs:
            raise KDLibError(f"teacher checkpoint given for unknown architecture {name!r}")


def _scope_overrides(overrides: List[str], method_names: List[str]) -> Dict[str, List[str]]:
    """The ``--set`` items each method's runs receive.

    A recipe field (``lr=0.1``) goes to every run. A method hyperparameter goes to the runs of the
    methods that have it (``beta=2`` to DKD, not to KD); ``dkd.beta=2`` names the method explicitly.
    A key no method of the grid knows is an error, as is a grid dimension (``--set seed=1``).
    """
    from kdlib import methods

    fields = [f for f in kconfig.field_names() if f not in ("method_params",)]
    hparams = {m: list(methods.get(m).defaults) for m in method_names}
    scoped: Dict[str, List[str]] = {m: [] for m in method_names}
    for item in overrides:
        key, _, value = item.partition("=")
        key = key.strip()
        target, _, name = key.partition(".") if "." in key else (None, "", key)
        explicit_hp = target == "method_params"
        if explicit_hp:
            target = None
        elif target is not None and target not in hparams:
            raise KDLibError(f"--set {item!r}: {target!r} is not a method of this grid "
                             f"({', '.join(method_names)})")
        if name in _GRID_KEYS:
            raise KDLibError(f"--set {name}=... is a grid dimension: use --methods, --pairs, --seeds, "
                             f"--profile, --out or --teacher-checkpoint")
        owners = [m for m in method_names if (target in (None, m)) and name in hparams[m]]
        if name in fields and not explicit_hp:
            for m in ([target] if target else method_names):
                scoped[m].append(f"{name}={value}")
        elif owners:
            for m in owners:
                scoped[m].append(f"method_params.{name}={value}")
        else:
            where = f"method {target!r}" if target else "any method of this grid"
            valid = sorted(set(fields) - set(_GRID_KEYS)) + sorted({h for hs in hparams.values() for h in hs})
            raise KDLibError(f"unknown --set key {key!r} (not a recipe field, nor a hyperparameter of {where}); "
                             f"valid keys: {', '.join(valid)}")
    return scoped


def _teacher_checkpoints(spec: GridSpec, pairs: List[Tuple[str, str]]) -> Dict[str, str]:
    """Absolute checkpoint path per teacher (explicit mapping first, then the directory pattern).

    Paths are made absolute because the path is part of a run's identity: the same file named from
    another working directory must not look like another run.
    """
    found: Dict[str, str] = {}
    missing: List[str] = []
    for teacher in _dedupe(t for t, _ in pairs):
        path: Optional[str] = spec.teacher_checkpoints.get(teacher)
        if path is None and spec.teacher_checkpoint_dir:
            path = spec.teacher_checkpoint_pattern.format(dir=spec.teacher_checkpoint_dir.rstrip("/"),
                                                          teacher=teacher)
        if path is None:
            continue
        full = os.path.abspath(os.path.expanduser(path))
        if not Path(full).is_file():
            missing.append(f"{teacher}: {full}")
        found[teacher] = full
    if missing:
        raise KDLibError(f"teacher checkpoint(s) not found: {'; '.join(missing)} (layout "
                         f"{spec.teacher_checkpoint_pattern!r}; unpack cifar_teachers.tar or drop "
                         f"--teacher-checkpoint-dir to train the teachers)")
    return found


def _shared_fields(spec: GridSpec, out: Path) -> Dict[str, Any]:
    """Config fields every run of the sweep shares (one teacher cache for the whole sweep)."""
    teachers_dir = spec.teachers_dir or out / TEACHERS_DIR
    shared: Dict[str, Any] = {"teachers_dir": os.path.abspath(os.path.expanduser(str(teachers_dir)))}
    if spec.dataset is not None:
        shared["dataset"] = spec.dataset
    if spec.data_root is not None:
        shared["data_root"] = os.path.abspath(os.path.expanduser(spec.data_root))
    if spec.epochs is not None:
        shared["epochs"] = spec.epochs
    if spec.device is not None:
        shared["device"] = spec.device
    return shared


def _plan_run(spec: GridSpec, out: Path, shared: Dict[str, Any], method: str, teacher: Optional[str],
              student: str, seed: int, overrides: List[str], checkpoint: Optional[str]) -> PlannedRun:
    fields = dict(shared, method=method, teacher=teacher, student=student, seed=seed)
    if checkpoint is not None and teacher is not None:
        fields["teacher_checkpoint"] = checkpoint
    where = f"{method} {teacher or '-'}:{student} seed {seed}"
    try:
        base = kconfig.make_config(spec.profile, **fields)
        cfg = kconfig.apply_overrides(base, overrides) if overrides else base
    except KDLibError as exc:
        raise KDLibError(f"{where}: {exc}") from None
    changed = _changed_identity(base, cfg) if overrides else {}
    digest = _override_hash(changed)
    pair_dir = f"{teacher}-{student}" if teacher else student
    rel = f"{RUNS_DIR}/{method}/{pair_dir}/seed{seed}" + (f"-{digest}" if digest else "")
    run_dir = out / rel
    readable = " ".join(f"{k}={_compact(v)}" for k, v in sorted(changed.items()))
    return PlannedRun(method, teacher, student, seed, digest, readable, run_dir, rel,
                      cfg.replace(out=str(run_dir)))


def _normalised(obj: Any) -> Any:
    return json.loads(json.dumps(obj, sort_keys=True, default=str))


def _flat_identity(cfg: kconfig.RunConfig) -> Dict[str, Any]:
    data = _normalised(cfg.identity())
    params = data.pop("method_params", {}) or {}
    for name, value in params.items():  # hyperparameters by their own names (readable: "beta=2.0")
        data[name if name not in data else f"method_params.{name}"] = value
    return data


def _changed_identity(base: kconfig.RunConfig, cfg: kconfig.RunConfig) -> Dict[str, Any]:
    """The identity fields (recipe + hyperparameters) the overrides changed, with their new values."""
    old, new = _flat_identity(base), _flat_identity(cfg)
    return {k: new.get(k) for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)}


def _override_hash(changed: Dict[str, Any]) -> str:
    if not changed:
        return ""
    blob = json.dumps(changed, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:8]


def _compact(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))


def _check_unique(runs: List[PlannedRun]) -> None:
    seen: Dict[Path, PlannedRun] = {}
    for run in runs:
        if run.run_dir in seen:  # only possible through a bug in the naming; never train twice
            raise KDLibError(f"two runs of the grid map to {run.run_dir}: {seen[run.run_dir].label} and {run.label}")
        seen[run.run_dir] = run


def _check_conflicts(runs: List[PlannedRun]) -> None:
    conflicts = []
    for run in runs:
        previous = _read_previous(run.run_dir)
        if previous is None:
            continue
        differences = _identity_differences(previous, run.config)
        if differences:
            conflicts.append(f"{run.run_dir} holds a different run ({'; '.join(differences[:4])})")
    if conflicts:
        more = f" (and {len(conflicts) - 3} more)" if len(conflicts) > 3 else ""
        raise KDLibError(f"{'; '.join(conflicts[:3])}{more}. Use another --out for another recipe, "
                         f"or delete those run directories")


def _read_previous(run_dir: Path) -> Optional[Dict[str, Any]]:
    """The run's metrics.json, or None when there is none or it is unreadable (the engine then reports it)."""
    from kdlib.records import read_metrics

    if not (run_dir / "metrics.json").is_file():
        return None
    try:
        return read_metrics(run_dir)
    except KDLibError:
        return None


def _identity_differences(metrics: Dict[str, Any], cfg: kconfig.RunConfig) -> List[str]:
    old = dict(metrics.get("config", {}).get("run", {}))
    for name in kconfig.EXECUTION_FIELDS:
        old.pop(name, None)
    new = _normalised(cfg.identity())
    old = _normalised(old)
    return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]


def _is_finished(run: PlannedRun) -> bool:
    previous = _read_previous(run.run_dir)
    return bool(previous and previous.get("final")) and not _identity_differences(previous, run.config)


# == locks ===========================================================================================
class RunLocked(KDLibError):
    """Another process is training this run right now."""


class RunLock:
    """An exclusive ``fcntl.flock`` on ``<run dir>/.sweep.lock``, held while the run trains.

    Why flock and not a pid file: the kernel releases the lock when the holding process exits, crashes
    or is killed, so there is no stale lock to detect; it works across hosts on NFS (Linux emulates flock
    with POSIX locks there); and two opens in one process conflict too, so inline sweeps and tests see
    it. The file's content (host, pid, start time) only serves the messages.
    """

    def __init__(self, run_dir: os.PathLike | str):
        self.path = Path(run_dir) / LOCK
        self._fd: Optional[int] = None

    def acquire(self, retry_seconds: float = 1.0) -> "RunLock":
        if fcntl is None:  # pragma: no cover
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        deadline = time.monotonic() + retry_seconds  # rides out a probe by holder() at the same instant
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    os.close(fd)
                    raise RunLocked(f"{self.path.parent} is being trained by another worker "
                                    f"({_read_holder(self.path) or 'unknown'})") from None
                time.sleep(0.1)
        stamp = f"{platform.node()} pid {os.getpid()} since {datetime.now(timezone.utc).isoformat(timespec='seconds')}"
        os.ftruncate(fd, 0)
        os.write(fd, stamp.encode())
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            try:
                os.ftruncate(self._fd, 0)
                fcntl.flock(self._fd, fcntl.LOCK_UN)
            finally:
                os.close(self._fd)
                self._fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()

    @staticmethod
    def holder(run_dir: os.PathLike | str) -> Optional[str]:
        """Who holds the run's lock right now ("host pid N since ..."), or None when nobody does."""
        path = Path(run_dir) / LOCK
        if fcntl is None or not path.is_file():
            return None
        fd = os.open(path, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)  # shared: never blocks another prober
        except BlockingIOError:
            return _read_holder(path) or "another process"
        finally:
            os.close(fd)  # closing drops a lock we may have taken
        return None


def _read_holder(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return ""


# == one job =========================================================================================
def _last_line(exc: BaseException, limit: int = 300) -> str:
    """The line a table can show: ``Type: last line of the message`` (a FailedJobError's trace end)."""
    text = str(exc)
    if "----------------------" in text:  # submitit's FailedJobError: the trace sits between rulers
        text = text.split("----------------------")[1]
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    line = lines[-1] if lines else ""
    if not re.match(r"^[\w.]+(Error|Exception|Interrupt|Locked|Exit)\b", line):
        line = f"{type(exc).__name__}: {line}" if line else type(exc).__name__
    return line if len(line) <= limit else line[:limit - 3] + "..."


def _write_error(run_dir: Path, message: str, detail: str = "", log: Optional[str] = None) -> None:
    atomic_write_json(run_dir / ERROR, {
        "error": message, "detail": detail, "log": log, "host": platform.node(),
        "time": datetime.now(timezone.utc).isoformat(timespec="seconds")})


def execute_run(config: Dict[str, Any] | kconfig.RunConfig, *, threads: Optional[int] = None,
                cuda_visible_devices: Optional[str] = None, verbose: bool = True) -> Dict[str, Any]:
    """Train one run under its lock; return ``{"status", "error", "best_test_acc", ...}``, never raise.

    Runs inside a job (or in process for ``--executor inline``). A failure is returned and written to
    ``<run dir>/sweep_error.json`` so that the summary, rebuilt later from the files, still knows it.
    """
    if cuda_visible_devices is not None:  # before anything initialises CUDA in this process
        os.environ["CUDA_VISIBLE_DEVICES"] = cuda_visible_devices
    run_dir: Optional[Path] = None
    try:
        from kdlib import engine

        cfg = config if isinstance(config, kconfig.RunConfig) else kconfig.RunConfig.from_dict(config)
        run_dir = Path(cfg.out)
        if threads is not None:
            import torch

            torch.set_num_threads(threads)
        with RunLock(run_dir):
            (run_dir / ERROR).unlink(missing_ok=True)  # a retry makes an old failure moot
            try:
                metrics = engine.train(cfg, progress=False, verbose=verbose)
            except engine.TrainingInterrupted as exc:
                return {"status": "incomplete", "error": _last_line(exc)}
            except Exception as exc:  # noqa: BLE001 - recorded while the lock is held: no retry races it
                return _failed(run_dir, exc)
    except RunLocked as exc:
        return {"status": "locked", "error": str(exc)}
    except Exception as exc:  # noqa: BLE001 - one failed run must not stop the sweep
        return _failed(run_dir, exc)
    final = metrics.get("final") or {}
    return {"status": "finished" if final else "incomplete", "error": "",
            "best_test_acc": final.get("best_test_acc"), "last_test_acc": final.get("test_acc")}


def _failed(run_dir: Optional[Path], exc: BaseException) -> Dict[str, Any]:
    message = _last_line(exc)
    if run_dir is not None:
        try:
            _write_error(run_dir, message, traceback.format_exc())
        except OSError:
            pass  # an unwritable run directory: the returned status still says it
    return {"status": "failed", "error": message}


class RunJob(_JobBase):  # type: ignore[misc,valid-type]
    """The callable each submitit job runs: :func:`execute_run` on one config.

    Being a ``submitit.helpers.Checkpointable``, a job that reaches its Slurm time limit is requeued
    with the same arguments, and the engine resumes the run from its last completed epoch.
    """

    def __init__(self, config: Dict[str, Any], threads: Optional[int] = None,
                 cuda_visible_devices: Optional[str] = None):
        self.config, self.threads, self.cuda_visible_devices = config, threads, cuda_visible_devices

    def __call__(self) -> Dict[str, Any]:
        return execute_run(self.config, threads=self.threads, cuda_visible_devices=self.cuda_visible_devices)


# == executors ========================================================================================
@dataclass
class _Outcome:
    run: PlannedRun
    status: str
    error: str = ""
    log: Optional[str] = None


def _job_outcome(run: PlannedRun, job: Any) -> Optional[_Outcome]:
    """What a submitit job says once it is over, or None while it runs.

    The result file counts as the end: submitit writes it atomically before the job's interpreter
    exits, and tearing down a process that imported torch takes seconds on a busy machine, which the
    next run need not wait for. A job that ended without a result (killed, out of memory, time limit)
    is a failed run, reported with the last line of what submitit saw.
    """
    import pickle

    log = str(job.paths.stderr)
    result_file = job.paths.result_pickle
    if result_file.exists():
        with open(result_file, "rb") as handle:
            kind, value = pickle.load(handle)
        if kind == "success":
            return _Outcome(run, value.get("status", "failed"), value.get("error", ""), log)
        exc: BaseException = RuntimeError(str(value))
    elif job.done():
        exc = job.exception() or RuntimeError(f"job {job.job_id} ended without a result")
    else:
        return None
    message = _last_line(exc)
    _write_error(run.run_dir, message, str(exc), log)
    return _Outcome(run, "failed", message, log)


class _Progress:
    """A tqdm bar over runs, with counts of finished and failed runs."""

    def __init__(self, total: int, initial: int, enabled: bool):
        from tqdm import tqdm

        self.counts: collections.Counter = collections.Counter()
        # disable=None: tqdm draws only on a terminal (logs and CI get the final table only)
        self.bar = tqdm(total=total, initial=initial, desc="sweep", unit="run", dynamic_ncols=True,
                        disable=None if enabled else True, file=sys.stderr)

    def done(self, outcome: _Outcome) -> None:
        self.counts[outcome.status] += 1
        self.bar.update(1)
        self.bar.set_postfix({k: v for k, v in sorted(self.counts.items())}, refresh=True)
        if outcome.status == "failed":
            self.bar.write(f"failed: {outcome.run.label}: {outcome.error}", file=sys.stderr)

    def close(self) -> None:
        self.bar.close()


def _run_inline(runs: List[PlannedRun], spec: GridSpec, bar: _Progress, verbose: bool) -> List[_Outcome]:
    outcomes = []
    for run in runs:
        result = execute_run(run.config, threads=spec.threads, verbose=verbose)
        outcomes.append(_Outcome(run, result["status"], result.get("error", "")))
        bar.done(outcomes[-1])
    return outcomes


def _local_gpus(device: Optional[str]) -> List[str]:
    """Device ids (as CUDA_VISIBLE_DEVICES entries) the local workers share round-robin."""
    if device is not None and not str(device).startswith(("auto", "cuda")):
        return []
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [d.strip() for d in visible.split(",") if d.strip()]
    import torch

    return [str(i) for i in range(torch.cuda.device_count())]


def _gpu_for_slot(slot: int, gpus: List[str], device: Optional[str]) -> str:
    """CUDA_VISIBLE_DEVICES of a worker: one GPU per slot, or all of them when a cuda:N is named."""
    if not gpus:
        return ""
    if device is not None and re.fullmatch(r"cuda:\d+", str(device)):
        return ",".join(gpus)
    return gpus[slot % len(gpus)]


def _teacher_pending(run: PlannedRun) -> Optional[str]:
    """The teacher cache file this run would have to train first, or None if it is there or not needed."""
    from kdlib import teachers

    cfg = run.config
    if not cfg.uses_teacher or cfg.teacher_checkpoint:
        return None
    path = teachers.teacher_path(cfg)
    return None if path.is_file() else str(path)


def _run_local(runs: List[PlannedRun], spec: GridSpec, out: Path, bar: _Progress) -> List[_Outcome]:
    """At most ``workers`` submitit local jobs at once (submitit's LocalExecutor has no cap of its own).

    A run whose teacher is being trained by a running job waits for it, so that free workers take runs
    that can start instead of blocking on the teacher's lock.
    """
    import submitit

    executor = submitit.LocalExecutor(folder=str(out / JOBS_DIR))
    executor.update_parameters(timeout_min=_LOCAL_TIMEOUT_MIN, gpus_per_node=0)
    threads = spec.threads or max(1, (os.cpu_count() or 1) // spec.workers)
    gpus = _local_gpus(spec.device)
    pending = collections.deque(runs)
    running: Dict[int, Tuple[Any, PlannedRun, Optional[str]]] = {}  # slot -> (job, run, teacher it trains)
    outcomes: List[_Outcome] = []
    try:
        while pending or running:
            for slot in [s for s in range(spec.workers) if s not in running]:
                run = _next_startable(pending, {t for _, _, t in running.values() if t})
                if run is None:
                    break
                job = executor.submit(RunJob(run.config.to_dict(), threads, _gpu_for_slot(slot, gpus, spec.device)))
                running[slot] = (job, run, _teacher_pending(run))
            finished = False
            for slot, (job, run, _) in list(running.items()):
                outcome = _job_outcome(run, job)
                if outcome is not None:
                    del running[slot]
                    outcomes.append(outcome)
                    bar.done(outcome)
                    finished = True
            if not finished:
                time.sleep(0.5)
    except KeyboardInterrupt:
        _stop_local_jobs([job for job, _, _ in running.values()])
        raise
    return outcomes


def _next_startable(pending: collections.deque, teachers_in_training: set) -> Optional[PlannedRun]:
    for index, run in enumerate(pending):
        teacher = _teacher_pending(run)
        if teacher is None or teacher not in teachers_in_training:
            del pending[index]
            return run
    return None


def _stop_local_jobs(jobs: List[Any], grace_seconds: float = 30.0) -> None:
    """Ctrl-C: SIGINT to every running job; the engine keeps each run's last completed epoch."""
    for job in jobs:
        job.cancel(check=False)
    deadline = time.monotonic() + grace_seconds
    while time.monotonic() < deadline and not all(job.done() for job in jobs):
        time.sleep(0.5)


def slurm_parameters(spec: GridSpec) -> Dict[str, Any]:
    """submitit AutoExecutor parameters of each array task (generic names, ``slurm_`` for the rest)."""
    s = spec.slurm
    params: Dict[str, Any] = {
        "name": "kdlib-sweep", "timeout_min": s.time_min, "cpus_per_task": s.cpus,
        "tasks_per_node": 1, "nodes": 1, "slurm_array_parallelism": s.array_parallelism,
    }
    if s.gpus:
        params["gpus_per_node"] = s.gpus
    if s.partition:
        params["slurm_partition"] = s.partition
    if s.mem_gb is not None:
        params["mem_gb"] = s.mem_gb
    if s.account:
        params["slurm_account"] = s.account
    if s.qos:
        params["slurm_qos"] = s.qos
    return params


def _slurm_executor(spec: GridSpec, out: Path):
    import submitit

    try:
        executor = submitit.AutoExecutor(folder=str(out / JOBS_DIR), cluster="slurm")
    except RuntimeError as exc:  # no srun on this machine
        raise KDLibError(f"--executor slurm: {exc}; use --executor local on a machine without Slurm") from None
    try:
        executor.update_parameters(**slurm_parameters(spec))
    except (ValueError, NameError, AssertionError) as exc:
        raise KDLibError(f"invalid Slurm parameters: {_last_line(exc)}") from None
    return executor


def _submit_slurm(runs: List[PlannedRun], spec: GridSpec, executor) -> List[Tuple[Any, PlannedRun]]:
    """Two array jobs when teachers must be trained: first one run per missing teacher (it trains and
    caches the teacher), then the rest, starting after the first array (``afterany``: a failed teacher
    is retried by the runs that need it instead of leaving them pending forever)."""
    threads = spec.threads or spec.slurm.cpus
    first: List[PlannedRun] = []
    seen: set = set()
    for run in runs:
        teacher = _teacher_pending(run)
        if teacher is not None and teacher not in seen:
            seen.add(teacher)
            first.append(run)
    rest = [run for run in runs if run not in first]
    submitted: List[Tuple[Any, PlannedRun]] = []
    dependency = None
    for group in (first, rest):
        if not group:
            continue
        if dependency:
            executor.update_parameters(slurm_dependency=dependency)
        jobs = executor.submit_array([RunJob(run.config.to_dict(), threads) for run in group])
        submitted.extend(zip(jobs, group))
        dependency = f"afterany:{str(jobs[0].job_id).split('_')[0]}"
    return submitted


def _wait_jobs(submitted: List[Tuple[Any, PlannedRun]], bar: _Progress, poll: float) -> List[_Outcome]:
    outcomes: List[_Outcome] = []
    waiting = list(submitted)
    while waiting:
        still = []
        for job, run in waiting:
            outcome = _job_outcome(run, job)
            if outcome is None:
                still.append((job, run))
            else:
                outcomes.append(outcome)
                bar.done(outcome)
        waiting = still
        if waiting:
            time.sleep(poll)
    return outcomes


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
                _wait_jobs(submitted, bar, poll=15.0)
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


def _write_plan(out: Path, spec: GridSpec, runs: List[PlannedRun]) -> None:
    """``OUT/sweep.json``: every run ever planned in this folder (merged), so the summary lists runs that
    have not started yet as missing, and ``--summarize-only`` needs nothing but the folder."""
    previous = _read_plan(out)
    entries = dict(previous.get("runs", {}))
    entries.update({r.rel_dir: r.record() for r in runs})
    atomic_write_json(out / PLAN, {"schema": 1, "spec": spec.to_dict(), "runs": entries,
                                   "updated": datetime.now(timezone.utc).isoformat(timespec="seconds")})


def _read_plan(out: Path) -> Dict[str, Any]:
    path = out / PLAN
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise KDLibError(f"{path} is unreadable ({exc}); delete it and run the sweep again") from None
    return data if isinstance(data, dict) else {}


# == summaries ========================================================================================
def summarize(out_dir: os.PathLike | str) -> pd.DataFrame:
    """One row per run of the sweep in ``out_dir`` (see :data:`SUMMARY_COLUMNS`), from the files only.

    Runs are those of ``sweep.json`` plus any other run directory under ``OUT/runs``. ``status``:
    ``finished`` (``final`` recorded), ``failed`` (the engine or the job recorded an error), ``incomplete``
    (epochs recorded, not all: interrupted, paused or running now, see ``running_on``), ``missing``
    (never started). ``run_dir`` is relative to ``out_dir``. Accuracies are percent.
    """
    import pandas as pd

    out = Path(out_dir).expanduser().absolute()
    entries = dict(_read_plan(out).get("runs", {}))
    if (out / RUNS_DIR).is_dir():  # runs no plan names (sweep.json lost, or trained by hand into runs/)
        for found in sorted([*(out / RUNS_DIR).rglob("metrics.json"), *(out / RUNS_DIR).rglob(ERROR)]):
            entries.setdefault(found.parent.relative_to(out).as_posix(), None)
    records = _run_records(out, [rel for rel in entries if (out / rel / "metrics.json").is_file()])
    rows = [_summary_row(out, rel, entry, records.get(rel)) for rel, entry in entries.items()]
    frame = pd.DataFrame(rows, columns=SUMMARY_COLUMNS)
    return frame.astype({"seed": "Int64", "best_epoch": "Int64", "epochs": "Int64", "epochs_done": "Int64"})


def _run_records(out: Path, rels: List[str]) -> Dict[str, Dict[str, Any]]:
    """``kdlib.records`` rows (plus the raw metrics) per run directory; unreadable files are skipped."""
    from kdlib.records import load_runs, read_metrics

    found: Dict[str, Dict[str, Any]] = {}
    for rel in rels:
        try:
            metrics = read_metrics(out / rel)
            table = load_runs([out / rel]).runs
        except KDLibError as exc:
            found[rel] = {"unreadable": str(exc)}
            continue
        row = table.iloc[0].to_dict() if len(table) else {}
        found[rel] = {"row": row, "metrics": metrics}
    return found


def _summary_row(out: Path, rel: str, entry: Optional[Dict[str, Any]],
                 record: Optional[Dict[str, Any]]) -> Dict[str, Any]:
    run_dir = out / rel
    metrics = (record or {}).get("metrics") or {}
    row = (record or {}).get("row") or {}
    config = metrics.get("config", {}).get("run", {})
    info = dict(entry or {})
    if not info:  # a run directory no plan names: its record says what it is, else its path does
        info = _info_from_path(rel)
        info.update({k: config[k] for k in ("method", "teacher", "student", "seed", "profile", "dataset")
                     if k in config})
    error_file = _read_error(run_dir)
    status, error = _status(record, metrics, error_file)
    return {
        "method": info.get("method"), "teacher": info.get("teacher"), "student": info.get("student"),
        "seed": info.get("seed"), "profile": info.get("profile"), "dataset": info.get("dataset"),
        "best_test_acc": _number(row.get("best_test_acc")), "last_test_acc": _number(row.get("last_test_acc")),
        "best_epoch": _integer(row.get("best_epoch")), "epochs": _integer(row.get("epochs", config.get("epochs"))),
        "epochs_done": _integer(row.get("epochs_done")) if record else None,
        "wall_seconds": _number(row.get("wall_seconds")),
        "status": status, "error": error, "run_dir": rel,
        "override_hash": info.get("override_hash") or "", "overrides": info.get("overrides") or "",
        "running_on": RunLock.holder(run_dir) or "",
    }


def _info_from_path(rel: str) -> Dict[str, Any]:
    """``runs/<method>/<teacher>-<student>/seed<k>[-<hash>]`` (vanilla: ``runs/vanilla/<student>/...``)."""
    match = re.fullmatch(rf"{RUNS_DIR}/([^/]+)/(?:([^/-]+)-)?([^/]+)/seed(\d+)(?:-([0-9a-f]{{8}}))?", rel)
    if not match:
        return {"method": None, "teacher": None, "student": None, "seed": None, "override_hash": "", "overrides": ""}
    method, teacher, student, seed, digest = match.groups()
    return {"method": method, "teacher": teacher, "student": student, "seed": int(seed),
            "override_hash": digest or "", "overrides": ""}


def _status(record: Optional[Dict[str, Any]], metrics: Dict[str, Any],
            error_file: Optional[Dict[str, Any]]) -> Tuple[str, str]:
    if record and "unreadable" in record:
        return "failed", record["unreadable"]
    if metrics.get("final"):
        return "finished", ""
    if error_file is not None:
        return "failed", str(error_file.get("error", ""))
    if metrics.get("status") == "failed":
        return "failed", str(metrics.get("error", ""))
    return ("incomplete", "") if metrics else ("missing", "")


def _read_error(run_dir: Path) -> Optional[Dict[str, Any]]:
    path = run_dir / ERROR
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {"error": f"unreadable {ERROR}"}
    return data if isinstance(data, dict) else {"error": str(data)}


def _number(value: Any) -> Optional[float]:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(number) else number


def _integer(value: Any) -> Optional[int]:
    number = _number(value)
    return None if number is None else int(number)


def write_summary(out_dir: os.PathLike | str) -> pd.DataFrame:
    """Rebuild ``OUT/summary.csv`` and ``OUT/aggregate.csv`` from the run records (atomic writes)."""
    out = Path(out_dir).expanduser().absolute()
    if not out.is_dir():
        raise KDLibError(f"--out {str(out)!r} is not a sweep directory")
    summary = summarize(out)
    atomic_write(out / SUMMARY, lambda f: summary.to_csv(f, index=False), mode="w")
    agg = aggregate(summary)
    atomic_write(out / AGGREGATE, lambda f: agg.to_csv(f, index=False), mode="w")
    return summary


def read_summary(out_dir_or_csv: os.PathLike | str) -> pd.DataFrame:
    """``summary.csv`` as written (hashes and names stay strings, empty cells stay empty strings)."""
    import pandas as pd

    path = Path(out_dir_or_csv)
    path = path / SUMMARY if path.is_dir() else path
    text_columns = ["method", "teacher", "student", "profile", "dataset", "status", "error", "run_dir",
                    "override_hash", "overrides", "running_on"]
    frame = pd.read_csv(path, dtype={c: str for c in text_columns}, keep_default_na=False,
                        na_values={c: [""] for c in SUMMARY_COLUMNS if c not in text_columns})
    return frame.astype({c: "Int64" for c in ("seed", "best_epoch", "epochs", "epochs_done") if c in frame})


def aggregate(summary: pd.DataFrame) -> pd.DataFrame:
    """Mean and standard deviation over seeds of the best and the last test accuracy, per method and pair.

    Only finished runs count. Groups are (method, teacher, student, profile, dataset, override_hash), the
    columns present. ``std`` is the sample standard deviation (ddof=1, NaN for one seed), as papers that
    report "mean +- std over N runs" use. ``best``/``last`` are the same numbers as text (``71.23 +- 0.31``).
    """
    import pandas as pd

    keys = [k for k in ("method", "teacher", "student", "profile", "dataset", "override_hash") if k in summary]
    columns = keys + ["n", "best_mean", "best_std", "last_mean", "last_std", "best", "last", "seeds"]
    done = summary[summary["status"] == "finished"] if "status" in summary else summary
    if done.empty:
        return pd.DataFrame(columns=columns)
    done = done.assign(**{k: done[k].fillna("") for k in keys})  # vanilla has no teacher: keep its group
    grouped = done.groupby(keys, sort=False, dropna=False)
    table = grouped.agg(n=("best_test_acc", "count"),
                        best_mean=("best_test_acc", "mean"), best_std=("best_test_acc", "std"),
                        last_mean=("last_test_acc", "mean"), last_std=("last_test_acc", "std"),
                        seeds=("seed", lambda s: " ".join(str(int(x)) for x in sorted(s)))).reset_index()
    table["best"] = [_mean_std(m, s) for m, s in zip(table["best_mean"], table["best_std"])]
    table["last"] = [_mean_std(m, s) for m, s in zip(table["last_mean"], table["last_std"])]
    return table[columns]


def _mean_std(mean: float, std: float) -> str:
    return f"{mean:.2f}" if std is None or (isinstance(std, float) and math.isnan(std)) else f"{mean:.2f} ± {std:.2f}"


def per_class_table(out_dir: os.PathLike | str) -> pd.DataFrame:
    """Final per-class test accuracy of every finished run of the sweep, one row per run and class.

    Columns: run (relative run directory), method, teacher, student, seed, override_hash, class (index),
    class_name, superclass, acc, teacher_acc (the teacher's accuracy on that class, when there is one).
    """
    import pandas as pd

    from kdlib.records import load_runs

    out = Path(out_dir).expanduser().absolute()
    summary = summarize(out)
    done = summary[summary["status"] == "finished"]
    columns = ["run", "method", "teacher", "student", "seed", "override_hash", "class", "class_name",
               "superclass", "acc", "teacher_acc"]
    if done.empty:
        return pd.DataFrame(columns=columns)
    classes = load_runs([out / rel for rel in done["run_dir"]]).classes
    rel_of = {str((out / rel).resolve()): rel for rel in done["run_dir"]}
    classes = classes.assign(run=[rel_of.get(str(Path(r).resolve()), r) for r in classes["run"]])
    extra = done.set_index("run_dir")[["override_hash"]]
    classes = classes.join(extra, on="run").rename(columns={"class_index": "class"})
    if "teacher_acc" not in classes:
        classes["teacher_acc"] = None
    return classes[columns].reset_index(drop=True)


def _print_tables(summary: pd.DataFrame, agg: pd.DataFrame, planned: Optional[set], locked: List[PlannedRun],
                  job_ids: List[str], wait: bool, out: Path) -> None:
    """The final table (one line per run of this grid, or all runs when ``planned`` is None) and the
    aggregate over seeds."""
    import pandas as pd

    table = (summary if planned is None else summary[summary["run_dir"].isin(planned)]).copy()
    table["pair"] = [f"{t}->{s}" if isinstance(t, str) and t else s for t, s in zip(table["teacher"], table["student"])]
    table["error"] = table["error"].map(lambda e: e if len(e) <= 80 else e[:77] + "...")
    shown = ["method", "pair", "seed", "override_hash", "status", "best_test_acc", "last_test_acc",
             "wall_seconds", "error"]
    shown = [c for c in shown if c != "override_hash" or table[c].astype(bool).any()]
    if not table["error"].astype(bool).any():
        shown.remove("error")
    with pd.option_context("display.width", 200, "display.max_colwidth", 80, "display.max_rows", 500):
        print(table[shown].to_string(index=False, float_format=lambda x: f"{x:.2f}"))
        if len(agg):
            print()
            cols = [c for c in ("method", "teacher", "student", "override_hash", "n", "best", "last") if c in agg]
            cols = [c for c in cols if c != "override_hash" or agg[c].astype(bool).any()]
            print(agg[cols].to_string(index=False))
    counts = table["status"].value_counts().to_dict()
    print(f"\n{len(table)} runs: " + ", ".join(f"{counts.get(s, 0)} {s}" for s in STATUSES if counts.get(s)))
    for run in locked:
        print(f"skipped (being trained elsewhere: {RunLock.holder(run.run_dir) or 'lock released since'}): {run.label}")
    if job_ids and not wait:
        print(f"submitted Slurm job(s) {', '.join(job_ids)}; when they are done: "
              f"python -m kdlib sweep --summarize-only --out {out}")


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
                   help="torch threads per run (default: cores / workers; slurm: --slurm-cpus)")
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
