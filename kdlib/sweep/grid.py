"""The grid: :class:`GridSpec` (methods x pairs x seeds, recipe, executor), its YAML files and checks."""
from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple

from kdlib.errors import KDLibError, unknown_name
from kdlib.sweep.common import COMMUNITY_LAYOUT, EXECUTORS, GRIDS_DIR, _at, _dedupe


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
    threads: Optional[int] = None  # torch threads per run; None: see run_threads()
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

    def run_threads(self) -> int:
        """The torch thread count of every run of this grid, the same under every executor.

        On a CPU the thread count changes a run's numbers (reductions split across threads add in another
        order), while the run keeps its identity. Were it left to each executor (local: cores / workers,
        Slurm: the task's CPUs, inline: the caller's), one run would give one number locally and another
        on the cluster. So it is one explicit value computed from the grid alone, never from the executor:
        ``threads``, else the CPUs of a Slurm task (``slurm.cpus``), at most this machine's cores shared
        by ``workers``. The engine records it in each segment of ``metrics.json`` (``segments[].threads``).
        """
        if self.threads is not None:
            return int(self.threads)
        return max(1, min(int(self.slurm.cpus), (os.cpu_count() or 1) // max(1, int(self.workers))))

    def command(self) -> str:
        """A ``python -m kdlib sweep`` command line that describes this grid: running it again skips the
        finished runs and resumes the others (what the summary offers for a run left unfinished)."""
        import shlex

        s, d = self, SlurmOptions()
        args = ["python", "-m", "kdlib", "sweep", "--methods", ",".join(s.methods),
                "--seeds", ",".join(map(str, s.seeds)), "--profile", s.profile]
        if s.pairs:
            args += ["--pairs", ",".join(f"{t}:{u}" for t, u in s.pairs)]
        for flag, value in (("--dataset", s.dataset), ("--data-root", s.data_root), ("--epochs", s.epochs),
                            ("--teachers-dir", s.teachers_dir), ("--teacher-checkpoint-dir", s.teacher_checkpoint_dir),
                            ("--device", s.device), ("--threads", s.threads)):
            if value is not None:
                args += [flag, str(value)]
        for arch, path in sorted(s.teacher_checkpoints.items()):
            args += ["--teacher-checkpoint", f"{arch}={path}"]
        if s.overrides:
            args += ["--set", *s.overrides]
        args += ["--executor", s.executor]
        if s.executor == "local" and s.workers != 1:
            args += ["--workers", str(s.workers)]
        if s.executor == "slurm":
            for flag, name in (("--slurm-partition", "partition"), ("--slurm-gpus", "gpus"), ("--slurm-cpus", "cpus"),
                               ("--slurm-time", "time_min"), ("--slurm-mem", "mem_gb"), ("--slurm-account", "account"),
                               ("--slurm-qos", "qos"), ("--slurm-array-parallelism", "array_parallelism")):
                if getattr(s.slurm, name) != getattr(d, name):
                    args += [flag, str(getattr(s.slurm, name))]
        args += ["--out", str(s.out)]
        return shlex.join(args)

    def to_dict(self) -> Dict[str, Any]:
        data = dataclasses.asdict(self)
        data["pairs"] = [f"{t}:{s}" for t, s in self.pairs]
        return data




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
        raise KDLibError(f"slurm time {value!r}: a time limit must be at least one minute; use e.g. --slurm-time 90 "
                         f"(minutes) or 24:00:00")
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
