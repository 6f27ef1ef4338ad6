"""Summaries from the run records alone: one row per run of a folder, the mean and spread over seeds,
per-class tables, and the final table a sweep or the book prints."""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Optional

from kdlib import config as kconfig
from kdlib.errors import KDLibError
from kdlib.io import atomic_write
from kdlib.runs.plan import ERROR, RUNS_DIR, Run, overrides_text, planned_runs, read_error, recipe_hash

if TYPE_CHECKING:  # pandas is imported where tables are made
    import pandas as pd

SUMMARY, AGGREGATE = "summary.csv", "aggregate.csv"
STATUSES = ("finished", "running", "failed", "incomplete", "missing")
SUMMARY_COLUMNS = ["method", "teacher", "student", "seed", "profile", "dataset", "best_test_acc",
                   "last_test_acc", "best_epoch", "epochs", "epochs_done", "wall_seconds", "status", "error",
                   "run_dir", "recipe", "overrides", "running_on"]
_INTEGERS = ["seed", "best_epoch", "epochs", "epochs_done"]
_TEXT = [c for c in SUMMARY_COLUMNS if c not in ("best_test_acc", "last_test_acc", "wall_seconds", *_INTEGERS)]


def summarize(out_dir: os.PathLike | str, plan_file: str = "sweep.json") -> pd.DataFrame:
    """One row per run in ``out_dir`` (see :data:`SUMMARY_COLUMNS`), from the files only: the runs of its
    plan file plus every other run directory under ``OUT/runs`` (teachers are not rows). ``run_dir`` is
    relative to ``out_dir``; accuracies are percent."""
    import pandas as pd

    out = Path(out_dir).expanduser().absolute()
    runs: Dict[Path, Optional[Run]] = {r.run_dir: r for r in planned_runs(out / plan_file) if r.role == "run"}
    if (out / RUNS_DIR).is_dir():  # runs no plan names: trained by a chapter, by hand, or the plan was lost
        for found in sorted([*(out / RUNS_DIR).rglob("metrics.json"), *(out / RUNS_DIR).rglob(ERROR)]):
            runs.setdefault(found.parent, None)
    frame = pd.DataFrame([_row(out, path, run) for path, run in runs.items()], columns=SUMMARY_COLUMNS)
    numbers = [c for c in SUMMARY_COLUMNS if c not in _TEXT]
    frame[numbers] = frame[numbers].apply(pd.to_numeric, errors="coerce")  # an unreadable value is no number
    return frame.astype({c: "Int64" for c in _INTEGERS})


def _row(out: Path, path: Path, run: Optional[Run]) -> Dict[str, Any]:
    from kdlib.engine.rundir import RunLock
    from kdlib.records import load_runs, read_metrics

    row: Dict[str, Any] = {"run_dir": path.relative_to(out).as_posix(), "running_on": RunLock.holder(path) or "",
                           "recipe": "", "overrides": ""}
    status, error = None, ""
    try:
        metrics = read_metrics(path) if (path / "metrics.json").is_file() else None
        if metrics is not None:
            run = run or Run(kconfig.RunConfig.from_dict(dict(metrics["config"]["run"])).replace(out=str(path)))
            record = load_runs([path]).runs.iloc[0].to_dict()
            row.update({k: record.get(k) for k in ("best_test_acc", "last_test_acc", "best_epoch", "epochs_done",
                                                   "wall_seconds", "dataset")})
    except (KDLibError, TypeError, KeyError) as exc:
        status, error = "failed", str(exc)
    if run is not None:
        c = run.config
        row.update(method=c.method, teacher=c.teacher if c.uses_teacher else None, student=c.student, seed=c.seed,
                   profile=c.profile, epochs=c.epochs, recipe=recipe_hash(c), overrides=overrides_text(c))
        row.setdefault("dataset", c.dataset)
        status = status or run.status()
        error = error or ((read_error(path) or {}).get("error") or (run.record() or {}).get("error") or ""
                          if status in ("failed", "incomplete") else "")
    else:  # a run_error.json without a record or a plan: the directory's name says what it is
        method_pair, seed, _ = path.name.rsplit("-", 2)
        parts = method_pair.split("-")
        row.update(method=parts[0], teacher=parts[1] if len(parts) == 3 else None, student=parts[-1],
                   seed=int(seed[1:]), profile=path.parent.name)
        error_file = read_error(path) or {}
        status = "incomplete" if error_file.get("status") == "incomplete" else "failed"
        error = str(error_file.get("error", ""))
    row.update(status=status, error=str(error))
    return row


def write_summary(out_dir: os.PathLike | str) -> pd.DataFrame:
    """Rebuild ``OUT/summary.csv`` and ``OUT/aggregate.csv`` from the run records (atomic writes)."""
    out = Path(out_dir).expanduser().absolute()
    if not out.is_dir():
        raise KDLibError(f"--out {str(out)!r} is not a folder of runs")
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
    frame = pd.read_csv(path, dtype={c: str for c in _TEXT}, keep_default_na=False,
                        na_values={c: [""] for c in SUMMARY_COLUMNS if c not in _TEXT})
    return frame.astype({c: "Int64" for c in _INTEGERS if c in frame})


def aggregate(summary: pd.DataFrame) -> pd.DataFrame:
    """Mean and standard deviation over seeds of the best and the last test accuracy, per method, pair and
    recipe (``recipe``: the runs' identity without the seed). Only finished runs count. ``std`` is the
    sample standard deviation (ddof=1, NaN for one seed), as papers that report "mean +- std over N runs"
    use; ``best``/``last`` are the same numbers as text (``71.23 ± 0.31``)."""
    import pandas as pd

    keys = [k for k in ("method", "teacher", "student", "profile", "dataset", "recipe") if k in summary]
    columns = keys + ["n", "best_mean", "best_std", "last_mean", "last_std", "best", "last", "seeds", "overrides"]
    done = summary[summary["status"] == "finished"] if "status" in summary else summary
    if done.empty:
        return pd.DataFrame(columns=columns)
    done = done.assign(**{k: done[k].fillna("") for k in keys})  # vanilla has no teacher: keep its group
    table = done.groupby(keys, sort=False, dropna=False).agg(
        n=("best_test_acc", "count"), best_mean=("best_test_acc", "mean"), best_std=("best_test_acc", "std"),
        last_mean=("last_test_acc", "mean"), last_std=("last_test_acc", "std"),
        seeds=("seed", lambda s: " ".join(str(int(x)) for x in sorted(s))),
        overrides=("overrides", lambda o: _common_words(list(o)))).reset_index()
    table["best"] = [_mean_std(m, s) for m, s in zip(table["best_mean"], table["best_std"])]
    table["last"] = [_mean_std(m, s) for m, s in zip(table["last_mean"], table["last_std"])]
    return table[columns]


def _common_words(texts: List[str]) -> str:
    """The override items every seed of a group shares (``seed=1`` differs between them)."""
    words = [set(str(t or "").split()) for t in texts]
    common = set.intersection(*words) if words else set()
    return " ".join(w for w in str(texts[0] or "").split() if w in common)


def _mean_std(mean: float, std: float) -> str:
    return f"{mean:.2f}" if std is None or (isinstance(std, float) and math.isnan(std)) else f"{mean:.2f} ± {std:.2f}"


def per_class_table(out_dir: os.PathLike | str) -> pd.DataFrame:
    """Final per-class test accuracy of every finished run of the folder, one row per run and class:
    run (relative run directory), method, teacher, student, seed, recipe, class (index), class_name,
    superclass, acc, teacher_acc (the teacher's accuracy on that class, when there is one)."""
    import pandas as pd

    from kdlib.records import load_runs

    out = Path(out_dir).expanduser().absolute()
    done = summarize(out)
    done = done[done["status"] == "finished"]
    columns = ["run", "method", "teacher", "student", "seed", "recipe", "class", "class_name", "superclass", "acc",
               "teacher_acc"]
    if done.empty:
        return pd.DataFrame(columns=columns)
    classes = load_runs([out / rel for rel in done["run_dir"]]).classes
    rel_of = {str((out / rel).resolve()): rel for rel in done["run_dir"]}
    classes = classes.assign(run=[rel_of.get(str(Path(r).resolve()), r) for r in classes["run"]])
    classes = classes.join(done.set_index("run_dir")[["recipe"]], on="run").rename(columns={"class_index": "class"})
    if "teacher_acc" not in classes:
        classes["teacher_acc"] = None
    return classes[columns].reset_index(drop=True)


def print_tables(summary: pd.DataFrame) -> None:
    """The final table, one line per run, and the mean over seeds."""
    import pandas as pd

    table = summary.copy()
    table["pair"] = [f"{t}->{s}" if isinstance(t, str) and t else s for t, s in zip(table["teacher"], table["student"])]
    table["error"] = table["error"].map(lambda e: e if len(e) <= 80 else e[:77] + "...")
    shown = ["method", "pair", "seed", "overrides", "status", "best_test_acc", "last_test_acc", "wall_seconds", "error"]
    shown = [c for c in shown if c not in ("overrides", "error") or table[c].astype(bool).any()]
    agg = aggregate(table)
    with pd.option_context("display.width", 200, "display.max_colwidth", 80, "display.max_rows", 500):
        print(table[shown].to_string(index=False, float_format=lambda x: f"{x:.2f}"))
        if len(agg):
            cols = [c for c in ("method", "teacher", "student", "overrides", "n", "best", "last")
                    if c != "overrides" or agg[c].astype(bool).any()]
            print("\n" + agg[cols].to_string(index=False))
    counts = table["status"].value_counts().to_dict()
    print(f"\n{len(table)} runs: " + ", ".join(f"{counts.get(s, 0)} {s}" for s in STATUSES if counts.get(s)))
