"""Plan: configurations become runs, each in the one directory its identity names, teachers first.

A run lives in ``ROOT/runs/<profile>/<method>-<teacher>-<student>-s<seed>-<hash>`` (vanilla:
``<method>-<student>-...``), ``hash`` being :meth:`kdlib.config.RunConfig.identity_hash` (the resolved
recipe minus the execution fields). ``ROOT`` is ``$KDLIB_HOME`` for the book and the default of
``kdlib sweep --out``, so a run a sweep trained is a chapter's run and the other way round. A teacher the
engine has to train is a run of its own (:func:`kdlib.teachers.teacher_run_config`), planned before the
students that ``need`` it.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional

from kdlib import config as kconfig
from kdlib.engine.rundir import RunLock, diff, identity_from_metrics, normalised, read_metrics_file
from kdlib.errors import KDLibError
from kdlib.io import atomic_write_json

RUNS_DIR = "runs"
#: why a run's last attempt ended without finishing it (written by :func:`kdlib.runs.executors.execute_run`)
ERROR = "run_error.json"


def run_directory(cfg: kconfig.RunConfig, root: Optional[Path] = None) -> Path:
    """Where the run ``cfg`` lives under ``root`` (default ``$KDLIB_HOME``)."""
    r = cfg.resolved()
    pair = f"{r.teacher}-{r.student}" if r.teacher else r.student
    root = Path(root).expanduser().absolute() if root else kconfig.kdlib_home()
    return root / RUNS_DIR / r.profile / f"{r.method}-{pair}-s{r.seed}-{cfg.identity_hash()}"


def recipe_hash(cfg: kconfig.RunConfig) -> str:
    """8 hex digits of the run's identity without its seed: the runs one row of a table averages over."""
    data = {k: v for k, v in cfg.identity().items() if k != "seed"}
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:8]


def overrides_text(cfg: kconfig.RunConfig) -> str:
    """What sets the run apart from its profile's recipe for its method and pair: ``"epochs=1 beta=2.0"``."""
    r = cfg.resolved()
    # the same length as the run, so that what the length scales (milestones, warm-up) is not a difference
    same = {k: getattr(r, k) for k in ("method", "teacher", "student", "seed", "epochs", "teacher_epochs",
                                       "teacher_checkpoint") if getattr(r, k) is not None}
    old, new = _flat(kconfig.make_config(r.profile, **same)), _flat(cfg)
    changed = {k: new.get(k) for k in set(old) | set(new) if old.get(k) != new.get(k)}
    preset = kconfig.PROFILES[r.profile]
    changed.update({k: same[k] for k in ("epochs", "teacher_epochs") if k in same and same[k] != preset.get(k)})
    return " ".join(f"{k}={json.dumps(v, separators=(',', ':')).strip(chr(34))}" for k, v in sorted(changed.items()))


def _flat(cfg: kconfig.RunConfig) -> Dict[str, Any]:
    data = normalised(cfg.identity())
    return {**{k: v for k, v in data.items() if k != "method_params"}, **(data.get("method_params") or {})}


@dataclass(frozen=True)
class Run:
    """One planned run: its config (``out`` set), whether it trains a teacher, the teacher run it needs."""

    config: kconfig.RunConfig
    role: str = "run"  # or "teacher": the vanilla run behind a cached teacher checkpoint
    needs: Optional[str] = None  # the directory of the teacher run to train first, when there is one

    @property
    def run_dir(self) -> Path:
        return Path(self.config.out)

    @property
    def label(self) -> str:
        c = self.config
        if self.role == "teacher":
            return f"teacher {c.student} ({c.profile}, {c.epochs} epoch{'s' if c.epochs != 1 else ''}, seed {c.seed})"
        pair = f"{c.teacher}->{c.student}" if c.uses_teacher else c.student
        params = ", ".join(f"{k}={v}" for k, v in sorted((c.method_params or {}).items()) if k != "warmup")
        return f"{c.method} {pair} seed {c.seed}" + (f" ({params})" if params else "")

    def record(self) -> Optional[Dict[str, Any]]:
        try:
            return read_metrics_file(self.run_dir / "metrics.json") if (self.run_dir / "metrics.json").is_file() else None
        except KDLibError:
            return None

    def finished(self) -> bool:
        if self.role == "teacher":
            return self.run_dir.with_suffix(".pt").is_file()
        record = self.record()
        return bool(record and record.get("final")) and not differences(record, self.config)

    def status(self) -> str:
        """finished, running (its lock is held), failed, incomplete (started, or stopped from outside) or missing."""
        if self.finished():
            return "finished"
        if RunLock.holder(self.run_dir):
            return "running"
        error = read_error(self.run_dir)
        if error is not None:
            return "incomplete" if error.get("status") == "incomplete" else "failed"
        record = self.record() or {}
        return "failed" if record.get("status") == "failed" else ("incomplete" if record else "missing")

    def entry(self, root: Path) -> Dict[str, Any]:
        """What a plan file keeps: enough to rebuild the run, and its resolved recipe for a reader."""
        return {"label": self.label, "role": self.role, "needs": _relative(self.needs, root),
                "overrides": overrides_text(self.config), "config": self.config.resolved().to_dict()}

    @classmethod
    def from_entry(cls, entry: Dict[str, Any], root: Path, rel: str) -> "Run":
        config = kconfig.RunConfig.from_dict(dict(entry["config"])).replace(out=str(root / rel))
        return cls(config, entry.get("role", "run"), str(root / entry["needs"]) if entry.get("needs") else None)


def _relative(path: Optional[str], root: Path) -> Optional[str]:
    if path is None or not Path(path).is_relative_to(root):
        return path and str(path)
    return Path(path).relative_to(root).as_posix()


def plan(configs: Iterable[kconfig.RunConfig], root: Optional[Path] = None, teachers_only: bool = False) -> List[Run]:
    """Every distinct run of ``configs`` (``out`` from :func:`run_directory` where unset), each teacher that
    still has to be trained before them (once), validated; refuses a directory holding another run.

    Nothing is written. ``teachers_only``: only the teachers ``configs`` need (a chapter's teacher model).
    """
    from kdlib import teachers

    found: Dict[Path, Run] = {}
    for cfg in configs:
        cfg = cfg if cfg.out else cfg.replace(out=str(run_directory(cfg, root)))
        cfg.validate()
        needs = None
        if cfg.uses_teacher and not cfg.teacher_checkpoint and not teachers.teacher_path(cfg).is_file():
            teacher = Run(teachers.teacher_run_config(cfg), "teacher")
            found.setdefault(teacher.run_dir, teacher)
            needs = str(teacher.run_dir)
        if not teachers_only:
            found.setdefault(Path(cfg.out), Run(cfg, "run", needs))
    runs = sorted(found.values(), key=lambda r: r.role != "teacher")  # teachers first, else in order
    conflicts = [f"{r.run_dir} holds a different run ({'; '.join(d[:4])})" for r in runs
                 for d in [differences(r.record(), r.config)] if d]
    if conflicts:
        more = f" (and {len(conflicts) - 3} more)" if len(conflicts) > 3 else ""
        raise KDLibError(f"{'; '.join(conflicts[:3])}{more}. Delete those run directories, or use another "
                         f"folder for another recipe")
    return runs


def differences(record: Optional[Dict[str, Any]], cfg: kconfig.RunConfig) -> List[str]:
    """How the run a ``metrics.json`` records differs from ``cfg``, by the engine's own resume check, so that
    "finished, reuse it" and "another run, refuse" never disagree with it. No record: no difference."""
    return diff(identity_from_metrics(record), normalised(cfg.identity())) if record else []


def read_error(run_dir: Path) -> Optional[Dict[str, Any]]:
    path = Path(run_dir) / ERROR
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {"error": f"unreadable {ERROR}"}
    return data if isinstance(data, dict) else {"error": str(data)}


# -- plan files ----------------------------------------------------------------------------------------
def write_plan(path: Path, runs: List[Run], about: Dict[str, Any]) -> None:
    """The plan as JSON beside its runs: every run ever planned there (merged), with its resolved recipe,
    so a summary lists runs that have not started as missing and a reader sees each run's recipe."""
    root = path.parent.absolute()
    entries = dict(read_plan(path).get("runs", {}))
    entries.update({_relative(str(r.run_dir), root): r.entry(root) for r in runs})
    atomic_write_json(path, {"schema": 2, "about": about, "runs": entries,
                             "updated": datetime.now(timezone.utc).isoformat(timespec="seconds")})


def read_plan(path: Path) -> Dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise KDLibError(f"{path} is unreadable ({exc}); delete it and plan again") from None
    return data if isinstance(data, dict) and data.get("schema") == 2 else {}


def planned_runs(path: Path) -> List[Run]:
    root = path.parent.absolute()
    return [Run.from_entry(entry, root, rel) for rel, entry in read_plan(path).get("runs", {}).items()]


def print_plan(runs: List[Run], verbose: bool = False) -> None:
    """One line per run (what, status, what sets it apart from its profile, directory); with ``verbose``
    every run's resolved recipe as JSON, what it will train with."""
    import pandas as pd

    rows = [{"run": r.label, "status": r.status(), "overrides": overrides_text(r.config), "run_dir": str(r.run_dir)}
            for r in runs]
    with pd.option_context("display.width", 250, "display.max_rows", 5000, "display.max_colwidth", 120):
        print(pd.DataFrame(rows, columns=["run", "status", "overrides", "run_dir"]).to_string(index=False))
    for r in runs if verbose else []:
        print(f"\n{r.label}: {r.run_dir}\n{json.dumps(r.config.resolved().to_dict(), indent=1, default=str)}")
