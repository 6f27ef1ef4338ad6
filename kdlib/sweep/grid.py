"""The grid: :class:`GridSpec` (methods x pairs x seeds, recipe, executor), its YAML files and checks.

A thin front door: it gathers the profile, the fields and the ``--set`` items of every run and hands
them to :func:`kdlib.config.make_config`, the one place a recipe is assembled.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import os
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple

from kdlib import config as kconfig
from kdlib.errors import KDLibError, unknown_name
from kdlib.runs.executors import EXECUTORS, run_threads
from kdlib.runs.slurm import SlurmOptions

GRIDS_DIR = Path(__file__).resolve().parent.parent / "grids"
#: where the community checkpoints (RepDistiller/mdistiller ``cifar_teachers.tar``) keep each teacher
COMMUNITY_LAYOUT = "{dir}/{teacher}_vanilla/ckpt_epoch_240.pth"
#: grid dimensions: chosen with --methods/--pairs/--seeds/--profile/--out, never with --set
GRID_KEYS = ("method", "teacher", "student", "seed", "profile", "out", "teacher_checkpoint")


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
        data = dict(data)
        if "set" in data:
            data["overrides"] = data.pop("set")
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(data) - set(names))
        if unknown:
            raise KDLibError(f"{_at(source)}unknown key {', '.join(map(repr, unknown))}; valid keys: "
                             f"{', '.join(n if n != 'overrides' else 'set' for n in names)}")
        spec = cls(**{k: v for k, v in data.items() if v is not None and k != "slurm"})
        spec.slurm = SlurmOptions.from_mapping(data.get("slurm"), _at(source))
        return spec.normalised(source)

    def normalised(self, source: str = "") -> "GridSpec":
        """Check and canonicalise every field (names are checked against the registries in :meth:`configs`)."""
        s, at = copy.deepcopy(self), _at(source)
        s.methods = _dedupe(_expand_methods(_as_list(s.methods, "methods", source)))
        if not s.methods:
            raise KDLibError(f"{at}no methods given (--methods kd,dkd,...)")
        s.pairs = _dedupe([_parse_pair(p, source) for p in _as_list(s.pairs, "pairs", source)])
        s.seeds = _dedupe([_whole(x, "a seed", source, 0) for x in _seed_ranges(_as_list(s.seeds, "seeds", source))])
        if not s.seeds:
            raise KDLibError(f"{at}no seeds given (--seeds 0,1,2)")
        s.overrides = parse_overrides(s.overrides, source)
        if s.executor not in EXECUTORS:
            raise unknown_name("executor", str(s.executor), EXECUTORS)
        s.workers = _whole(s.workers, "workers", source)
        s.threads = None if s.threads is None else _whole(s.threads, "threads", source)
        s.epochs = None if s.epochs is None else _whole(s.epochs, "epochs", source)
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
        return run_threads(self.threads, self.slurm.cpus, self.workers)

    def configs(self) -> List[kconfig.RunConfig]:
        """Every run's validated config, or a :class:`KDLibError` naming the run and what is wrong."""
        from kdlib import methods

        spec = self.normalised()
        if spec.profile not in kconfig.PROFILES:
            raise unknown_name("profile", str(spec.profile), kconfig.PROFILES)
        for name in spec.methods:
            methods.get(name)  # unknown method -> KDLibError listing the valid ones
        preset = kconfig.PROFILES[spec.profile]
        pairs = spec.pairs or [(preset["teacher"], preset["student"])]
        scoped = scope_overrides(spec.overrides, spec.methods)
        checkpoints = self._checkpoints(pairs)
        shared = {"teachers_dir": os.path.abspath(os.path.expanduser(str(spec.teachers_dir or spec.root() / "teachers"))),
                  "dataset": spec.dataset, "epochs": spec.epochs, "device": spec.device,
                  "data_root": os.path.abspath(os.path.expanduser(spec.data_root)) if spec.data_root else None}
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
                found[teacher] = os.path.abspath(os.path.expanduser(path))
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
        for flag, value in (("--dataset", s.dataset), ("--data-root", s.data_root), ("--epochs", s.epochs),
                            ("--teachers-dir", s.teachers_dir), ("--teacher-checkpoint-dir", s.teacher_checkpoint_dir),
                            ("--device", s.device), ("--threads", s.threads)):
            args += [flag, str(value)] if value is not None else []
        for arch, path in sorted(s.teacher_checkpoints.items()):
            args += ["--teacher-checkpoint", f"{arch}={path}"]
        args += ["--set", *s.overrides] if s.overrides else []
        args += ["--executor", s.executor] + (["--workers", str(s.workers)] if s.workers != 1 else [])
        if s.executor == "slurm":
            args += [w for f in dataclasses.fields(SlurmOptions) if getattr(s.slurm, f.name) != getattr(d, f.name)
                     for w in (SLURM_FLAGS[f.name], str(getattr(s.slurm, f.name)))]
        return shlex.join(args + (["--out", str(s.out)] if s.out else []))

    def to_dict(self) -> Dict[str, Any]:
        data = dataclasses.asdict(self)
        data["pairs"] = [f"{t}:{s}" for t, s in self.pairs]
        return data


#: --slurm-* flags of the command line, by SlurmOptions field (shared by `kdlib sweep` and `kdlib book`)
SLURM_FLAGS = {"partition": "--slurm-partition", "gpus": "--slurm-gpus", "cpus": "--slurm-cpus",
               "time_min": "--slurm-time", "array_parallelism": "--slurm-array-parallelism",
               "mem_gb": "--slurm-mem", "account": "--slurm-account", "qos": "--slurm-qos",
               "runs_per_task": "--slurm-runs-per-task"}


def _at(source: str) -> str:
    """Error prefix naming the grid file a bad value came from (nothing for the command line)."""
    return f"{source}: " if source else ""


def scope_overrides(overrides: List[str], method_names: List[str]) -> Dict[str, List[str]]:
    """The ``--set`` items each method's runs receive.

    A recipe field (``lr=0.1``) goes to every run. A method hyperparameter goes to the runs of the
    methods that have it (``beta=2`` to DKD, not to KD); ``dkd.beta=2`` names the method explicitly.
    A key no method of the grid knows is an error, as is a grid dimension (``--set seed=1``).
    """
    from kdlib import methods

    fields = [f for f in kconfig.field_names() if f != "method_params"]
    hparams = {m: list(methods.get(m).defaults) for m in method_names}
    scoped: Dict[str, List[str]] = {m: [] for m in method_names}
    for item in overrides:
        key, _, value = item.partition("=")
        key = key.strip()
        target, _, name = key.partition(".") if "." in key else (None, "", key)
        explicit_hp = target == "method_params"
        target = None if explicit_hp else target
        if target is not None and target not in hparams:
            raise KDLibError(f"--set {item!r}: {target!r} is not a method of this grid ({', '.join(method_names)})")
        if name in GRID_KEYS:
            raise KDLibError(f"--set {name}=... is a grid dimension: use --methods, --pairs, --seeds, "
                             f"--profile, --out or --teacher-checkpoint")
        owners = [m for m in method_names if target in (None, m) and name in hparams[m]]
        if name in fields and not explicit_hp:
            for m in ([target] if target else method_names):
                scoped[m].append(f"{name}={value}")
        elif owners:
            for m in owners:
                scoped[m].append(f"method_params.{name}={value}")
        else:
            where = f"method {target!r}" if target else "any method of this grid"
            valid = sorted(set(fields) - set(GRID_KEYS)) + sorted({h for hs in hparams.values() for h in hs})
            raise KDLibError(f"unknown --set key {key!r} (not a recipe field, nor a hyperparameter of {where}); "
                             f"valid keys: {', '.join(valid)}")
    return scoped


def _as_list(value: Any, name: str, source: str) -> List[Any]:
    if isinstance(value, (list, tuple)):
        return [x for item in value for x in (_as_list(item, name, source) if isinstance(item, str) else [item])]
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    if value is None or isinstance(value, (int, float)) and not isinstance(value, bool):
        return [] if value is None else [value]
    raise KDLibError(f"{_at(source)}{name} must be a list or a comma-separated string, got {value!r}")


def _expand_methods(names: List[Any]) -> List[str]:
    """``all`` stands for every registered distillation method (vanilla not included)."""
    from kdlib import methods

    if not all(isinstance(n, str) for n in names):
        raise KDLibError(f"a method must be a name, got {next(n for n in names if not isinstance(n, str))!r}")
    return [m for n in names for m in ([m for m in methods.names() if m != "vanilla"] if n == "all" else [n])]


def _parse_pair(value: Any, source: str) -> Tuple[str, str]:
    if isinstance(value, Mapping) and set(value) == {"teacher", "student"}:
        parts = [value["teacher"], value["student"]]
    else:
        parts = list(value) if isinstance(value, (list, tuple)) else value.split(":") if isinstance(value, str) else []
    parts = [str(p).strip() for p in parts]
    if len(parts) != 2 or not all(parts):
        raise KDLibError(f"{_at(source)}a pair is TEACHER:STUDENT (e.g. resnet56:resnet20), got {value!r}")
    return parts[0], parts[1]


def _seed_ranges(items: List[Any]) -> List[Any]:
    matches = [(item, re.fullmatch(r"\s*(\d+)\s*-\s*(\d+)\s*", item) if isinstance(item, str) else None)
               for item in items]
    return [x for item, m in matches for x in (range(int(m.group(1)), int(m.group(2)) + 1) if m else [item])]


def _whole(value: Any, name: str, source: str, minimum: int = 1) -> int:
    try:
        number = int(value) if not isinstance(value, (bool, float)) else None
    except (TypeError, ValueError):
        number = None
    if number is None or number < minimum:
        hint = " (--seeds 0,1,2 or 0-4)" if name == "a seed" else ""
        raise KDLibError(f"{_at(source)}{name} must be an integer >= {minimum}{hint}, got {value!r}")
    return number


def parse_overrides(value: Any, source: str = "") -> List[str]:
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
