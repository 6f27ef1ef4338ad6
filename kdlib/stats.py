"""Noise as a result: method comparisons with their uncertainty, and the sentences the book prints about them.

Every verdict the chapters glue comes from here, so a sentence cannot say more than its numbers do.
Pure functions over the pandas frames of :class:`kdlib.records.RunTables` (``runs``: one row per run with
``seed`` and the accuracies; ``classes``: one row per run and class with ``acc``), grouped by a label column
(``label`` in the chapters' tables).

The rule ("distinguishable from seed noise"), stated once and used everywhere:

* A comparison of ``A`` with a baseline ``B`` is **paired by seed**: only seeds both were run with count,
  and the difference is the mean over those seeds of ``A_s - B_s`` (same seed: same initialisation and data
  order, so the pairing removes part of the noise).
* Its **standard error** is that of a *difference*, not of one run. With 3 or more paired seeds it is the
  sample standard deviation of the paired differences over ``sqrt(n)``. With 1 or 2 (one or two degrees of
  freedom give no usable spread of their own) it is ``sigma * sqrt(2 / n)``, where ``sigma`` is the
  seed-to-seed standard deviation of a single run pooled over every label of the setting that has two or
  more seeds; ``sqrt(2)`` because two runs' noises add, and this ignores the pairing's gain, so it errs on
  the side of "not distinguishable".
* A difference is **distinguishable from seed noise** when ``|difference| > 2 * standard error``
  (:data:`Z`, about 95 % two-sided for a normal error). Without any noise estimate (every label one seed)
  nothing is distinguishable, and the sentence says that the noise was not measured.
* **Per-class** claims use the per-class seed-to-seed noise of the same setting (``sigma_class``: the
  standard deviation of one class's accuracy between seeds of one label, pooled over classes and labels).
  A class moves when its paired difference exceeds ``2 * sigma_class * sqrt(2 / n)``; the verdict compares
  how many classes move with how many would by chance (:data:`CHANCE_RATE` of them), and speaks of a
  class-level effect only when the count is improbable under pure noise (binomial tail < 0.05).
* **Correlations between deltas that share a baseline** (``A - B`` against ``C - B``, or a method's gain
  against the teacher's headroom ``T - B``) are inflated by the baseline's own noise: even pure noise
  gives about 0.5. :func:`delta_correlation` computes each delta against a *different* seed of the
  baseline, so no noise is shared; with one baseline seed it draws no correlation and says why.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
import pandas as pd

from kdlib.errors import KDLibError

__all__ = ["Z", "CHANCE_RATE", "Difference", "ClassClaims", "seed_noise", "paired_difference", "compare",
           "class_noise", "class_claims", "delta_correlation", "correlation_threshold", "spearman", "collapsed_runs",
           "drop_runs", "verdict_difference", "verdict_classes", "verdict_correlation", "verdict_collapsed",
           "fmt_diff"]

#: standard errors a difference must exceed to count as distinguishable from seed noise
Z = 2.0
#: probability that pure normal noise exceeds Z standard errors (two-sided): P(|N(0,1)| > 2)
CHANCE_RATE = math.erfc(Z / math.sqrt(2))


# -- one number per run -----------------------------------------------------------------------------
def _per_seed(runs: pd.DataFrame, label: str, metric: str, by: str) -> pd.Series:
    sub = runs[runs[by] == label]
    if sub.empty:
        raise KDLibError(f"no runs labelled {label!r}; labels: {', '.join(map(str, dict.fromkeys(runs[by])))}")
    return sub.groupby("seed")[metric].mean()


def seed_noise(runs: pd.DataFrame, metric: str = "last_test_acc", by: str = "label",
               labels: Optional[Iterable[str]] = None) -> Tuple[float, int]:
    """The seed-to-seed standard deviation of one run's ``metric``, pooled over the labels with >= 2 seeds
    (each label's sample variance weighted by its degrees of freedom), and those degrees of freedom.
    ``(nan, 0)`` when no label has two seeds. ``labels`` restricts the pool (e.g. without collapsed runs)."""
    sub = runs if labels is None else runs[runs[by].isin(list(labels))]
    ss, dof = 0.0, 0
    for _, group in sub.groupby(by, sort=False):
        values = group.groupby("seed")[metric].mean().dropna().to_numpy(float)
        if len(values) >= 2:
            ss += float(((values - values.mean()) ** 2).sum())
            dof += len(values) - 1
    return (math.sqrt(ss / dof), dof) if dof else (float("nan"), 0)


@dataclass(frozen=True)
class Difference:
    """``label`` minus ``baseline``, paired by seed, with the standard error of the difference."""

    label: str
    baseline: str
    metric: str
    diff: float
    se: float  # NaN: no noise estimate
    n: int  # paired seeds
    how: str  # "paired": from the paired differences; "pooled": sigma * sqrt(2 / n); "none"
    sigma: float = float("nan")  # the pooled single-run noise used by "pooled"

    @property
    def threshold(self) -> float:
        return Z * self.se

    @property
    def distinguishable(self) -> bool:
        return bool(np.isfinite(self.se) and abs(self.diff) > Z * self.se)

    @property
    def sign(self) -> int:
        """+1 above, -1 below, 0 not distinguishable from seed noise."""
        return int(np.sign(self.diff)) if self.distinguishable else 0


def paired_difference(runs: pd.DataFrame, label: str, baseline: str, metric: str = "last_test_acc",
                      by: str = "label", sigma: Optional[float] = None) -> Difference:
    """``label - baseline`` over their common seeds, with its standard error (see the module's rule).

    ``sigma``: the single-run noise to use with fewer than 3 pairs (default: :func:`seed_noise` of ``runs``).
    """
    a, b = _per_seed(runs, label, metric, by), _per_seed(runs, baseline, metric, by)
    common = sorted(set(a.index) & set(b.index))
    if not common:
        raise KDLibError(f"{label!r} and {baseline!r} share no seed: a paired comparison needs common seeds")
    d = (a.loc[common] - b.loc[common]).to_numpy(float)
    n = len(d)
    if n >= 3:
        return Difference(label, baseline, metric, float(d.mean()), float(d.std(ddof=1) / math.sqrt(n)), n,
                          "paired")
    if sigma is None:
        sigma = seed_noise(runs, metric, by)[0]
    se = sigma * math.sqrt(2 / n) if np.isfinite(sigma) else float("nan")
    return Difference(label, baseline, metric, float(d.mean()), float(se), n,
                      "pooled" if np.isfinite(se) else "none", float(sigma))


def compare(runs: pd.DataFrame, baseline: str, labels: Optional[Sequence[str]] = None,
            metric: str = "last_test_acc", by: str = "label", exclude: Iterable[str] = ()) -> pd.DataFrame:
    """Every label against ``baseline``: one row each with ``diff``, ``se``, ``threshold`` (2 se), ``n``,
    ``how``, ``distinguishable``, ``sign`` and the ``verdict`` sentence. ``exclude``: labels left out of
    the comparison and of the pooled noise (collapsed runs)."""
    exclude = set(exclude)
    keep = [l for l in dict.fromkeys(runs[by]) if l not in exclude]
    sigma = seed_noise(runs, metric, by, labels=keep)[0]
    rows = []
    for name in (labels if labels is not None else keep):
        if name == baseline or name in exclude:
            continue
        d = paired_difference(runs, name, baseline, metric, by, sigma=sigma)
        rows.append({by: name, "diff": d.diff, "se": d.se, "threshold": d.threshold, "n": d.n, "how": d.how,
                     "distinguishable": d.distinguishable, "sign": d.sign, "verdict": verdict_difference(d)})
    return pd.DataFrame(rows, columns=[by, "diff", "se", "threshold", "n", "how", "distinguishable", "sign",
                                       "verdict"])


# -- per class ----------------------------------------------------------------------------------------
def class_noise(classes: pd.DataFrame, by: str = "label", labels: Optional[Iterable[str]] = None) -> Tuple[float, int]:
    """Per-class seed-to-seed noise: the standard deviation of one class's accuracy between seeds of one
    label, pooled over every class and every label with >= 2 seeds; and its degrees of freedom."""
    sub = classes if labels is None else classes[classes[by].isin(list(labels))]
    ss, dof = 0.0, 0
    for _, group in sub.groupby([by, "class_index"], sort=False):
        values = group.groupby("seed")["acc"].mean().dropna().to_numpy(float)
        if len(values) >= 2:
            ss += float(((values - values.mean()) ** 2).sum())
            dof += len(values) - 1
    return (math.sqrt(ss / dof), dof) if dof else (float("nan"), 0)


def _binomial_tail(k: int, n: int, p: float) -> float:
    """P(X >= k) for X ~ Binomial(n, p)."""
    return float(sum(math.comb(n, i) * p**i * (1 - p) ** (n - i) for i in range(k, n + 1)))


@dataclass(frozen=True)
class ClassClaims:
    """Which classes move under ``label`` against ``baseline``, measured against per-class seed noise."""

    label: str
    baseline: str
    table: pd.DataFrame  # class_index, class_name, delta, se, z, moved (-1/0/+1)
    sigma_class: float  # per-class noise of one run (NaN: not measured)
    n: int  # paired seeds
    up: int
    down: int
    expected: float  # classes expected to move by chance under pure noise
    p_value: float  # P(at least up + down classes move | pure noise); NaN without noise
    mean_abs_delta: float

    @property
    def beyond_noise(self) -> bool:
        return bool(np.isfinite(self.p_value) and self.p_value < 0.05)

    @property
    def threshold(self) -> float:
        return Z * self.sigma_class * math.sqrt(2 / self.n)


def class_claims(classes: pd.DataFrame, label: str, baseline: str, by: str = "label",
                 sigma_class: Optional[float] = None) -> ClassClaims:
    """Per-class differences ``label - baseline`` paired by seed, each tested against the per-class seed
    noise (``sigma_class``, default :func:`class_noise` of ``classes``)."""
    a = classes[classes[by] == label].pivot_table(index="class_index", columns="seed", values="acc")
    b = classes[classes[by] == baseline].pivot_table(index="class_index", columns="seed", values="acc")
    if a.empty or b.empty:
        raise KDLibError(f"no per-class accuracies for {label!r} or {baseline!r}")
    seeds = sorted(set(a.columns) & set(b.columns))
    if not seeds:
        raise KDLibError(f"{label!r} and {baseline!r} share no seed: a paired comparison needs common seeds")
    delta = (a[seeds] - b[seeds]).mean(axis=1)
    n = len(seeds)
    if sigma_class is None:
        sigma_class = class_noise(classes, by)[0]
    se = sigma_class * math.sqrt(2 / n) if np.isfinite(sigma_class) else float("nan")
    names = classes.drop_duplicates("class_index").set_index("class_index")["class_name"] \
        if "class_name" in classes else pd.Series(dtype=str)
    table = pd.DataFrame({"class_index": delta.index, "class_name": names.reindex(delta.index).to_numpy(),
                          "delta": delta.to_numpy(float), "se": se})
    table["z"] = table["delta"] / se if np.isfinite(se) and se > 0 else np.nan
    moved = np.where(table["z"] > Z, 1, np.where(table["z"] < -Z, -1, 0)) if np.isfinite(se) and se > 0 \
        else np.zeros(len(table), dtype=int)
    table["moved"] = moved
    up, down, c = int((moved > 0).sum()), int((moved < 0).sum()), len(table)
    p = _binomial_tail(up + down, c, CHANCE_RATE) if np.isfinite(se) and se > 0 else float("nan")
    return ClassClaims(label, baseline, table, float(sigma_class), n, up, down, CHANCE_RATE * c, p,
                       float(table["delta"].abs().mean()))


# -- correlations ----------------------------------------------------------------------------------------
def spearman(x: pd.Series, y: pd.Series) -> float:
    """Spearman's rank correlation (Pearson's on average ranks), over the entries both have."""
    both = pd.concat([pd.Series(x), pd.Series(y)], axis=1).dropna()
    if len(both) < 3:
        return float("nan")
    return float(both.iloc[:, 0].rank().corr(both.iloc[:, 1].rank()))


def correlation_threshold(n: int) -> float:
    """|r| a rank correlation over ``n`` independent points exceeds by chance with probability ~5 %:
    ``2 / sqrt(n - 1)`` (the large-sample standard error of Spearman's rho under no association)."""
    return Z / math.sqrt(max(n - 1, 1))


def delta_correlation(classes: pd.DataFrame, a: str, b: Optional[str], baseline: str, by: str = "label",
                      other: Optional[pd.Series] = None) -> Dict[str, object]:
    """Spearman correlation over classes between ``a - baseline`` and ``b - baseline`` (or, with ``b=None``,
    between ``a - baseline`` and ``other - baseline``, ``other`` a per-class Series such as the teacher's
    accuracy), each delta computed against a *different* seed of the baseline so that the baseline's noise
    is not shared. Returns ``r``, ``n`` (classes), ``threshold``, ``drawn`` (False with one baseline seed),
    ``naive`` (the correlation with the shared baseline mean, for comparison) and ``reason``."""
    base = classes[classes[by] == baseline].pivot_table(index="class_index", columns="seed", values="acc")

    def mean_acc(name):
        return classes[classes[by] == name].groupby("class_index")["acc"].mean()

    x = mean_acc(a)
    y = mean_acc(b) if b is not None else other
    if y is None:
        raise KDLibError("delta_correlation needs b or other")
    y = pd.Series(y).reindex(x.index)
    shared = base.mean(axis=1).reindex(x.index)
    naive = spearman(x - shared, y - shared)
    seeds = list(base.columns)
    out = {"r": float("nan"), "n": int(len(x)), "threshold": correlation_threshold(len(x)), "drawn": False,
           "naive": naive, "reason": ""}
    if len(seeds) < 2:
        out["reason"] = (f"{baseline} has one seed, so both deltas would share its noise (which alone gives "
                         f"a correlation near 0.5)")
        return out
    first, second = seeds[0], seeds[1]
    out["r"] = spearman(x - base[first].reindex(x.index), y - base[second].reindex(x.index))
    out["drawn"] = True
    return out


# -- failed runs --------------------------------------------------------------------------------------------
def collapsed_runs(runs: pd.DataFrame, num_classes: int, metric: str = "last_test_acc",
                   factor: float = 2.0) -> pd.DataFrame:
    """Runs that failed or collapsed: not finished, a non-finite ``metric``, or a ``metric`` below
    ``factor`` times chance (``100 / num_classes`` percent) in a setting whose median run is above twice
    that (a setting where nothing learns, such as the tests' one-epoch runs, flags no run for its
    accuracy). One row per such run with a ``reason``."""
    chance = 100.0 / num_classes
    values = pd.to_numeric(runs[metric], errors="coerce") if metric in runs else pd.Series(dtype=float)
    learns = bool(values.notna().any() and values.median() > 2 * factor * chance)
    rows = []
    for _, r in runs.iterrows():
        value = r.get(metric)
        status = r.get("status", "finished")
        if status not in (None, "finished") and isinstance(status, str) and status != "finished":
            reason = f"status {status}"
        elif value is None or not np.isfinite(value):
            reason = "no finite accuracy"
        elif learns and value < factor * chance:
            reason = f"{value:.1f} % accuracy, chance is {chance:.1f} %"
        else:
            continue
        rows.append({**r.to_dict(), "reason": reason})
    return pd.DataFrame(rows, columns=list(runs.columns) + ["reason"])


def drop_runs(tables, runs_to_drop: pd.DataFrame):
    """The :class:`~kdlib.records.RunTables` without the runs listed in ``runs_to_drop`` (its ``run`` column)."""
    from kdlib.records import RunTables

    gone = set(runs_to_drop["run"]) if len(runs_to_drop) else set()
    return RunTables(*[df[~df["run"].isin(gone)].reset_index(drop=True)
                       for df in (tables.runs, tables.epochs, tables.classes, tables.epoch_classes)])


# -- sentences ------------------------------------------------------------------------------------------------
def fmt_diff(diff: float, se: float, digits: int = 2) -> str:
    """``"+4.20 ± 0.80"`` (``± se``), or ``"+4.20"`` without a standard error."""
    if not np.isfinite(se):
        return f"{diff:+.{digits}f}"
    return f"{diff:+.{digits}f} ± {se:.{digits}f}"


def _how(d: Difference) -> str:
    seeds = f"{d.n} paired seed" + ("s" if d.n != 1 else "")
    if d.how == "paired":
        return f"mean over {seeds}; uncertainty from the spread of the paired differences"
    return (f"{seeds}; uncertainty of a difference, σ·√(2/{d.n}) with σ = {d.sigma:.2f} points, the "
            f"seed-to-seed spread of one run in this setting")


def verdict_difference(d: Difference, name: Optional[str] = None, base: Optional[str] = None,
                       unit: str = "points") -> str:
    """One plain-text sentence (no Markdown) on ``d``: above, below, or not distinguishable from seed noise."""
    name, base = name or d.label, base or d.baseline
    if d.how == "none":
        return (f"{name} differs from {base} by {d.diff:+.2f} {unit} over {d.n} seed(s), but no seed-to-seed "
                f"noise was measured in this setting (one seed per method), so this is not a finding.")
    if d.distinguishable:
        where = "above" if d.diff > 0 else "below"
        return (f"{name} is {where} {base} by {fmt_diff(d.diff, d.se)} {unit} ({_how(d)}), more than twice "
                f"the uncertainty of the difference: distinguishable from seed noise in this setting.")
    return (f"{name} and {base} differ by {fmt_diff(d.diff, d.se)} {unit} ({_how(d)}): not distinguishable "
            f"from seed noise in this setting.")


def verdict_classes(c: ClassClaims, name: Optional[str] = None, base: Optional[str] = None) -> str:
    """One sentence on the per-class changes of ``c``, measured against per-class seed noise."""
    name, base = name or c.label, base or c.baseline
    total = len(c.table)
    if not np.isfinite(c.p_value):
        return (f"Per class, {name} differs from {base} by {c.mean_abs_delta:.1f} points on average (absolute), but "
                f"the per-class seed-to-seed noise was not measured (one seed), so no class-level claim is made.")
    noise = (f"the per-class seed noise of this setting (σ = {c.sigma_class:.1f} points for one run; a class "
             f"counts as moved beyond {c.threshold:.1f} points over {c.n} paired seed{'s' if c.n != 1 else ''})")
    if c.beyond_noise:
        return (f"Per class, {c.up} of {total} classes gain and {c.down} lose under {name} compared with "
                f"{base} by more than {noise}; pure noise would move about {c.expected:.0f}, so the "
                f"class-level changes are distinguishable from seed noise.")
    return (f"Per class, {c.up + c.down} of {total} classes move beyond {noise}, where pure noise alone would "
            f"move about {c.expected:.0f}: the per-class changes (on average {c.mean_abs_delta:.1f} points) are "
            f"not distinguishable from seed noise in this setting, so no class can be said to gain or lose.")


def verdict_correlation(result: Dict[str, object], what: str) -> str:
    """One sentence on a :func:`delta_correlation` result; ``what`` names the two quantities."""
    if not result["drawn"]:
        return f"The correlation between {what} is not drawn: {result['reason']}."
    r, t, n = float(result["r"]), float(result["threshold"]), int(result["n"])
    if abs(r) > t:
        kind = "positive" if r > 0 else "negative"
        return (f"The rank correlation between {what}, each against a different seed of the baseline, is "
                f"{r:.2f} over {n} classes: {kind}, beyond the {t:.2f} that chance reaches about one time in "
                f"twenty.")
    return (f"The rank correlation between {what}, each against a different seed of the baseline, is "
            f"{r:.2f} over {n} classes, within the ±{t:.2f} that chance alone gives: no association is "
            f"distinguishable from noise (computed against one shared baseline it would read "
            f"{float(result['naive']):.2f}, an artefact of the shared noise).")


def verdict_collapsed(flagged: pd.DataFrame, by: str = "label") -> str:
    """A sentence naming the collapsed runs left out of the statistics, or ``""`` when there are none."""
    if flagged is None or flagged.empty:
        return ""
    parts = [f"{r[by] if by in flagged else r['method']} seed {int(r['seed'])} ({r['reason']})"
             for _, r in flagged.iterrows()]
    return ("Left out of the statistics and colour scales: " + "; ".join(parts)
            + " — a collapsed or failed run, reported here and not averaged with the others.")
