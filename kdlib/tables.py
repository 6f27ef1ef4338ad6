"""The tables the chapters show, computed from a :class:`~kdlib.records.RunTables`: per label, per class,
per epoch. Pure pandas over the records (no training, no models, no run directories);
:mod:`kdlib.experiments` re-exports them for the chapters (``ex.summarize`` and so on).
"""
from __future__ import annotations

import math
from typing import Dict

import numpy as np
import pandas as pd
from torch import Tensor

from kdlib.errors import KDLibError
from kdlib.records import RunTables


def pm(mean: float, std: float, digits: int = 2) -> str:
    """``"71.23 ± 0.40"``; a single run (std NaN) gives the mean alone."""
    if std is None or (isinstance(std, float) and math.isnan(std)):
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def summarize(tables: RunTables, by: str = "label") -> pd.DataFrame:
    """One row per ``by`` value: seeds (n), best and last test accuracy (mean, std over seeds), best
    epoch, the teacher's accuracy, and the cost (seconds per epoch, training images per second).

    ``std`` is the sample standard deviation (NaN for one seed). Order: as the values first appear.
    """
    runs, epochs = tables.runs, tables.epochs
    order = list(dict.fromkeys(runs[by]))
    cost = epochs.groupby(by).agg(seconds_per_epoch=("epoch_seconds", "mean"),
                                  images_per_second=("images_per_second", "median"))
    out = runs.groupby(by).agg(
        n=("seed", "count"),
        best_mean=("best_test_acc", "mean"), best_std=("best_test_acc", "std"),
        last_mean=("last_test_acc", "mean"), last_std=("last_test_acc", "std"),
        best_epoch=("best_epoch", "mean"), teacher_acc=("teacher_test_acc", "mean"),
        epochs=("epochs", "max"),
    ).join(cost)
    return out.loc[order]


def class_accuracy(tables: RunTables, by: str = "label") -> pd.DataFrame:
    """Per ``by`` value and class: accuracy averaged over seeds (``acc``), its std over seeds, and the
    teacher's accuracy on the class (``teacher_acc``, NaN without a teacher)."""
    c = tables.classes
    keys = [by, "class_index", "class_name", "superclass", "superclass_index"]
    agg = dict(acc=("acc", "mean"), acc_std=("acc", "std"), seeds=("seed", "count"))
    if "teacher_acc" in c:
        agg["teacher_acc"] = ("teacher_acc", "mean")
    return c.groupby(keys, sort=False, dropna=False).agg(**agg).reset_index()


def class_delta(tables: RunTables, label: str, baseline: str = "vanilla", by: str = "label") -> pd.DataFrame:
    """Per class: ``acc`` of ``label`` and ``baseline_acc`` (each the mean over its seeds) and ``delta``.

    Sorted by class index; the teacher's accuracy on the class comes along when known.
    """
    acc = class_accuracy(tables, by)
    for name in (label, baseline):
        if name not in set(acc[by]):
            raise KDLibError(f"no runs labelled {name!r}; labels: {', '.join(map(str, dict.fromkeys(acc[by])))}")
    a = acc[acc[by] == label].set_index("class_index")
    b = acc[acc[by] == baseline].set_index("class_index")
    out = a[["class_name", "superclass", "superclass_index", "acc"]].copy()
    out["baseline_acc"] = b["acc"]
    out["delta"] = out["acc"] - out["baseline_acc"]
    teacher = a["teacher_acc"] if "teacher_acc" in a else None
    if teacher is None or teacher.isna().all():
        teacher = b["teacher_acc"] if "teacher_acc" in b else None
    if teacher is not None:
        out["teacher_acc"] = teacher
    out.insert(0, "label", label)
    out.insert(1, "baseline", baseline)
    return out.reset_index().sort_values("class_index").reset_index(drop=True)


def helped_hurt(delta: pd.DataFrame, tolerance: float = 1e-9) -> Dict[str, int]:
    """How many classes gained (``delta > 0``), lost (``< 0``) or stayed equal under the method."""
    d = delta["delta"]
    return {"helped": int((d > tolerance).sum()), "hurt": int((d < -tolerance).sum()),
            "unchanged": int((d.abs() <= tolerance).sum())}


def within_between(matrix, groups) -> Dict[str, float]:
    """Mean of the off-diagonal entries of a C x C ``matrix`` whose two classes share a group (``within``)
    and whose classes do not (``between``), e.g. groups = the superclass of each class; ``n_within`` and
    ``n_between`` count the entries. Accepts numpy arrays or tensors.
    """
    m = matrix.detach().cpu().numpy() if isinstance(matrix, Tensor) else np.asarray(matrix, dtype=float)
    g = groups.detach().cpu().numpy() if isinstance(groups, Tensor) else np.asarray(groups)
    if m.ndim != 2 or m.shape[0] != m.shape[1] or m.shape[0] != len(g):
        raise KDLibError(f"need a C x C matrix and C groups, got {m.shape} and {len(g)}")
    same = g[:, None] == g[None, :]
    off = ~np.eye(len(g), dtype=bool)
    within, between = m[same & off], m[~same & off]
    return {"within": float(within.mean()) if within.size else float("nan"),
            "between": float(between.mean()) if between.size else float("nan"),
            "n_within": int(within.size), "n_between": int(between.size)}


def method_history(tables: RunTables, key: str, by: str = "label") -> pd.DataFrame:
    """A fact a method reported at the end of every epoch (``history[i]["method"][key]`` in each run's
    ``metrics.json``, e.g. CWKD's ``hard_classes``), as a long table: one row per run, epoch and list
    item, with ``by`` (when the tables have it), ``run``, ``method``, ``seed``, ``epoch``, ``position``
    (the item's place in the list) and ``value``. A scalar fact gives one row per epoch (position 0); an
    empty list gives no row. The tables' ``epochs`` frame keeps only scalar facts (``method_NAME``
    columns); this reads the lists too, from the records themselves.
    """
    from kdlib.records import read_metrics

    rows = []
    runs = tables.runs
    for r in runs.itertuples(index=False):
        record = read_metrics(r.run)
        for h in record.get("history") or []:
            value = (h.get("method") or {}).get(key)
            if value is None:
                continue
            items = value if isinstance(value, (list, tuple)) else [value]
            for position, item in enumerate(items):
                row = {"run": r.run, "method": r.method, "seed": r.seed, "epoch": h.get("epoch"),
                       "position": position, "value": item}
                if by in runs.columns:
                    row = {by: getattr(r, by), **row}
                rows.append(row)
    columns = ([by] if by in runs.columns else []) + ["run", "method", "seed", "epoch", "position", "value"]
    return pd.DataFrame(rows, columns=columns)


def tail_accuracy(tables: RunTables, k: int = 10, by: str = "label") -> pd.DataFrame:
    """How the weakest classes fare: per run, the mean accuracy over the classes (``mean``), the accuracy
    of the worst class (``worst``) and the mean of the ``k`` worst classes (``bottom_k``), each run ranking
    its own classes; then per ``by`` value the mean and sample std over the runs (seeds) of each
    (``mean_mean``, ``mean_std``, ``worst_mean``, ``worst_std``, ``bottom_k_mean``, ``bottom_k_std``)
    and ``n`` runs. Order: as the values first appear. Accuracies in percent.
    """
    if k < 1:
        raise KDLibError(f"k must be >= 1, got {k}")
    c = tables.classes
    if c.empty:
        raise KDLibError("no per-class accuracies in these tables (are the runs finished?)")
    per_run = c.groupby([by, "run"], sort=False)["acc"].agg(
        mean="mean", worst="min", bottom_k=lambda a: float(np.sort(a.to_numpy())[:k].mean())).reset_index()
    order = list(dict.fromkeys(per_run[by]))
    out = per_run.groupby(by, sort=False).agg(
        n=("run", "count"), mean_mean=("mean", "mean"), mean_std=("mean", "std"),
        worst_mean=("worst", "mean"), worst_std=("worst", "std"),
        bottom_k_mean=("bottom_k", "mean"), bottom_k_std=("bottom_k", "std"))
    return out.loc[order]
