"""The plan: one :class:`PlannedRun` (config, directory, override hash) per run of the grid, checked
before anything runs, and ``OUT/sweep.json``."""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple

from kdlib import config as kconfig
from kdlib.errors import KDLibError, unknown_name
from kdlib.io import atomic_write_json
from kdlib.sweep.common import PLAN, RUNS_DIR, TEACHERS_DIR, _GRID_KEYS, _dedupe
from kdlib.sweep.grid import GridSpec


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
    """How the run recorded in ``metrics.json`` differs from ``cfg``, by the engine's own definition of
    "the same run": :meth:`kdlib.config.RunConfig.identity` (the resolved config minus the execution
    fields), compared through :meth:`~kdlib.config.RunConfig.identity_hash`. No copy of that rule lives here,
    so the sweep's "finished, skip it" and "a different run, refuse" can never disagree with the engine's
    resume check. A record that no longer makes a config (a field this version does not know) differs.
    """
    try:
        recorded = kconfig.RunConfig.from_dict(dict(metrics.get("config", {}).get("run", {})))
        if recorded.identity_hash() == cfg.identity_hash():
            return []
        old = _normalised(recorded.identity())
    except (KDLibError, TypeError, ValueError) as exc:
        return [f"unreadable recorded config ({exc})"]
    new = _normalised(cfg.identity())
    return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]


def _is_finished(run: PlannedRun) -> bool:
    previous = _read_previous(run.run_dir)
    return bool(previous and previous.get("final")) and not _identity_differences(previous, run.config)


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
