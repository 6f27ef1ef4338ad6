"""Run records: read ``metrics.json`` files and turn many runs into tidy pandas tables.

:func:`load_runs` takes run directories, ``metrics.json`` paths, globs or parent folders (searched
recursively) and returns a :class:`RunTables`:

* ``runs``: one row per run: ``run`` (directory), ``method``, ``teacher``, ``student``, ``seed``,
  ``profile``, ``dataset`` (the dataset's one-line description), ``status``, ``epochs`` (configured),
  ``epochs_done``, ``best_test_acc``, ``best_epoch``, ``last_test_acc``, ``last_test_acc5``,
  ``teacher_test_acc``, ``wall_seconds``, ``lr``, ``batch_size``, and one ``hp_NAME`` column per method
  hyperparameter;
* ``epochs``: one row per run and epoch with every scalar of the history row (``lr``, ``train_loss``,
  each loss term, ``train_acc``, ``test_acc``, ``test_acc5``, ``test_loss``, ``epoch_seconds``,
  ``images_per_second``; scalar facts a method reports at the end of an epoch as ``method_NAME``);
* ``classes``: one row per run and class: the final per-class accuracy ``acc``, ``class_index``,
  ``class_name``, ``superclass`` (name), ``superclass_index``, and the teacher's accuracy on that class
  (``teacher_acc``) when the run had a teacher;
* ``epoch_classes``: one row per run, epoch and class (``acc``), for class-wise learning curves.

Every table repeats the run's identifying columns (``run``, ``method``, ``teacher``, ``student``,
``seed``, ``profile``, ``dataset``) so it can be grouped or plotted on its own. Accuracies are percent.
"""
from __future__ import annotations

import glob
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterable, List, Union

import pandas as pd

from kdlib.errors import KDLibError

METRICS = "metrics.json"
ID_COLUMNS = ["run", "method", "teacher", "student", "seed", "profile", "dataset"]

__all__ = ["RunTables", "read_metrics", "load_runs", "find_runs", "ID_COLUMNS"]


@dataclass
class RunTables:
    runs: pd.DataFrame
    epochs: pd.DataFrame
    classes: pd.DataFrame
    epoch_classes: pd.DataFrame

    def __repr__(self) -> str:
        return (f"RunTables(runs={len(self.runs)}, epochs={len(self.epochs)}, classes={len(self.classes)}, "
                f"epoch_classes={len(self.epoch_classes)})")


def read_metrics(run_dir: Union[str, os.PathLike]) -> Dict[str, Any]:
    """The parsed ``metrics.json`` of a run directory (or of the given ``metrics.json`` path)."""
    path = Path(run_dir)
    if path.is_dir():
        path = path / METRICS
    if not path.is_file():
        raise KDLibError(f"no {METRICS} in {str(Path(run_dir))!r}: not a run directory (or not started yet)")
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError) as exc:
        raise KDLibError(f"{path} is unreadable ({exc})") from None
    if not isinstance(data, dict) or "config" not in data or "history" not in data:
        raise KDLibError(f"{path} is not a kdlib metrics file")
    return data


def find_runs(paths: Union[str, os.PathLike, Iterable[Union[str, os.PathLike]]]) -> List[Path]:
    """Metrics files named by ``paths``: run directories, metrics files, globs, or folders searched recursively."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    found: List[Path] = []
    for item in paths:
        text = os.fspath(item)
        matches = sorted(glob.glob(os.path.expanduser(text), recursive=True)) if glob.has_magic(text) else [text]
        for match in matches:
            p = Path(match).expanduser()
            if p.is_file():
                found.append(p)
            elif (p / METRICS).is_file():
                found.append(p / METRICS)
            elif p.is_dir():
                found.extend(sorted(p.rglob(METRICS)))
    unique, seen = [], set()
    for p in found:
        key = p.resolve()
        if key not in seen:
            seen.add(key)
            unique.append(p)
    return unique


def _scalar(value: Any) -> bool:
    return value is None or isinstance(value, (int, float, str, bool))


def _identity(path: Path, metrics: Dict[str, Any]) -> Dict[str, Any]:
    cfg = metrics.get("config", {})
    run = cfg.get("run", {})
    return {
        "run": str(path.parent),
        "method": run.get("method"),
        "teacher": run.get("teacher"),
        "student": run.get("student"),
        "seed": run.get("seed"),
        "profile": run.get("profile"),
        "dataset": cfg.get("dataset", {}).get("description", run.get("dataset")),
    }


def load_runs(paths: Union[str, os.PathLike, Iterable[Union[str, os.PathLike]]]) -> RunTables:
    """Tidy tables over every run found in ``paths`` (see the module docstring for the columns)."""
    run_rows, epoch_rows, class_rows, epoch_class_rows = [], [], [], []
    for path in find_runs(paths):
        metrics = read_metrics(path)
        ident = _identity(path, metrics)
        run_rows.append(_run_row(ident, metrics))
        epoch_rows += _epoch_rows(ident, metrics.get("history") or [])
        classes, epoch_classes = _class_rows(ident, metrics)
        class_rows += classes
        epoch_class_rows += epoch_classes

    def frame(rows: List[Dict[str, Any]], first: List[str]) -> pd.DataFrame:
        df = pd.DataFrame(rows)
        if df.empty:
            return pd.DataFrame(columns=first)
        return df[first + [c for c in df.columns if c not in first]]

    return RunTables(
        runs=frame(run_rows, ID_COLUMNS),
        epochs=frame(epoch_rows, ID_COLUMNS + ["epoch"]),
        classes=frame(class_rows, ID_COLUMNS + ["class_index", "class_name", "superclass", "acc"]),
        epoch_classes=frame(epoch_class_rows, ID_COLUMNS + ["epoch", "class_index", "class_name", "superclass", "acc"]),
    )


def _run_row(ident: Dict[str, Any], metrics: Dict[str, Any]) -> Dict[str, Any]:
    """The ``runs`` row: status, epochs, best and last accuracy, the teacher's, cost, hyperparameters."""
    cfg = metrics.get("config", {})
    run = cfg.get("run", {})
    history = metrics.get("history") or []
    final = metrics.get("final") or {}
    best = metrics.get("best") or {}
    last = history[-1] if history else {}
    row = dict(ident)
    row.update({
        "status": metrics.get("status", "finished" if final else "running"),
        "epochs": run.get("epochs"),
        "epochs_done": len(history),
        "best_test_acc": final.get("best_test_acc", best.get("test_acc") if history else None),
        "best_epoch": final.get("best_epoch", best.get("epoch") if history else None),
        "last_test_acc": final.get("test_acc", last.get("test_acc")),
        "last_test_acc5": final.get("test_acc5", last.get("test_acc5")),
        "teacher_test_acc": (cfg.get("teacher") or {}).get("test_acc"),
        "wall_seconds": float(sum(r.get("epoch_seconds", 0.0) or 0.0 for r in history)),
        "lr": run.get("lr"),
        "batch_size": run.get("batch_size"),
    })
    for name, value in (cfg.get("method", {}).get("hparams") or run.get("method_params") or {}).items():
        row[f"hp_{name}"] = value if _scalar(value) else json.dumps(value)
    return row


def _epoch_rows(ident: Dict[str, Any], history: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """One row per epoch: every scalar of the history row, a method's scalar facts as ``method_NAME``."""
    rows = []
    for h in history:
        e = dict(ident)
        e.update({k: v for k, v in h.items() if k not in ("per_class_acc", "method") and _scalar(v)})
        e.update({f"method_{k}": v for k, v in (h.get("method") or {}).items() if _scalar(v)})
        rows.append(e)
    return rows


def _class_rows(ident: Dict[str, Any], metrics: Dict[str, Any]):
    """The final per-class accuracies (with the teacher's) and the per-epoch ones."""
    cfg = metrics.get("config", {})
    dataset = cfg.get("dataset", {})
    names = dataset.get("class_names") or []
    supers = dataset.get("superclass_names") or []
    to_super = dataset.get("class_to_superclass") or []
    teacher_pc = (cfg.get("teacher") or {}).get("per_class_acc") or []

    def class_fields(c: int) -> Dict[str, Any]:
        s = to_super[c] if c < len(to_super) else None
        return {"class_index": c, "class_name": names[c] if c < len(names) else str(c),
                "superclass_index": s,
                "superclass": supers[s] if s is not None and s < len(supers) else None}

    per_class = (metrics.get("final") or {}).get("per_class_acc")
    classes = [{**ident, **class_fields(c), "acc": acc, "teacher_acc": teacher_pc[c] if c < len(teacher_pc) else None}
               for c, acc in enumerate(per_class or [])]
    epoch_classes = [{**ident, "epoch": h.get("epoch"), **class_fields(c), "acc": acc}
                     for h in metrics.get("history") or [] for c, acc in enumerate(h.get("per_class_acc") or [])]
    return classes, epoch_classes
