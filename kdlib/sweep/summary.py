"""Summaries from the run records alone: ``OUT/summary.csv``, ``OUT/aggregate.csv``, per-class tables."""
from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Tuple

from kdlib.errors import KDLibError
from kdlib.io import atomic_write
from kdlib.sweep.common import AGGREGATE, ERROR, RUNS_DIR, STATUSES, SUMMARY, SUMMARY_COLUMNS
from kdlib.sweep.jobs import RunLock
from kdlib.sweep.planning import PlannedRun, _read_plan

if TYPE_CHECKING:  # pandas is imported where tables are made
    import pandas as pd


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
        return ("incomplete" if error_file.get("status") == "incomplete" else "failed"), str(error_file.get("error", ""))
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
