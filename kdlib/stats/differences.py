"""Two methods, one number per run: paired (or unpaired) differences over seeds, and many comparisons at once.

The rules are stated once in :mod:`kdlib.stats`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence, TYPE_CHECKING, Tuple

import numpy as np

# pandas is imported inside the functions that use it: a kernel that imports kdlib.stats only for a
# t quantile (a grading kernel of the exercises) does not pay the second pandas takes to import
if TYPE_CHECKING:
    import pandas as pd

from kdlib.errors import KDLibError
from kdlib.stats.tdist import POWER, t_cdf, t_quantile, t_critical, detectable_difference


# -- one number per run ------------------------------------------------------------------------------------------
def seed_values(runs: pd.DataFrame, label: str, metric: str = "last_test_acc", by: str = "label") -> pd.Series:
    """``metric`` per seed of the runs labelled ``label`` (a mean if a seed appears twice)."""
    sub = runs[runs[by] == label]
    if sub.empty:
        raise KDLibError(f"no runs labelled {label!r}; labels: {', '.join(map(str, dict.fromkeys(runs[by])))}")
    return sub.groupby("seed")[metric].mean().dropna()


@dataclass(frozen=True)
class Difference:
    """``label`` minus ``baseline``: the mean paired (by seed) difference and its t interval."""

    label: str
    baseline: str
    metric: str
    diff: float
    sd: float  # standard deviation of the paired differences (of one run each, when unpaired: see se)
    se: float  # standard error of diff; NaN: not measured (one seed)
    n: int  # paired seeds (unpaired: the smaller group)
    df: float  # degrees of freedom of the t interval
    paired: bool = True
    seeds: Tuple[int, ...] = ()
    key: str = ""  # what was compared (run directories and metric): equal keys, equal intervals

    @property
    def measured(self) -> bool:
        return bool(np.isfinite(self.se) and self.df >= 1)

    @property
    def t_crit(self) -> float:
        return t_critical(self.df) if self.measured else float("nan")

    @property
    def half_width(self) -> float:
        return self.t_crit * self.se if self.measured else float("nan")

    @property
    def ci(self) -> Tuple[float, float]:
        return (self.diff - self.half_width, self.diff + self.half_width)

    @property
    def p_value(self) -> float:
        if not self.measured:
            return float("nan")
        if self.se == 0:
            return 1.0 if self.diff == 0 else 0.0
        return 2.0 * (1.0 - t_cdf(abs(self.diff) / self.se, self.df))

    @property
    def distinguishable(self) -> bool:
        return bool(self.measured and abs(self.diff) > self.half_width)

    @property
    def sign(self) -> int:
        """+1 above, -1 below, 0 not distinguishable from seed noise (or not measured)."""
        return int(np.sign(self.diff)) if self.distinguishable else 0

    @property
    def detectable(self) -> float:
        """The difference this comparison's design (seeds, noise) finds with 80 % probability."""
        if not self.measured:
            return float("nan")
        if self.paired:
            return detectable_difference(self.sd, self.n)
        return (t_critical(self.df) + t_quantile(POWER, self.df)) * self.se


def _runs_key(runs: pd.DataFrame, label: str, by: str, seeds) -> str:
    if "run" not in runs:
        return label
    sub = runs[(runs[by] == label) & runs["seed"].isin(list(seeds))]
    return ",".join(sorted(str(r).rstrip("/").rsplit("/", 1)[-1] for r in sub["run"]))


def comparison_key(runs: pd.DataFrame, label: str, baseline: str, metric: str, by: str = "label",
                   seeds=None) -> str:
    """What a comparison is about, independent of the names a chapter gives it: the metric and the run
    directories on both sides. Two chapters comparing the same runs get the same key."""
    seeds = seeds if seeds is not None else sorted(set(runs["seed"]))
    return f"{metric}: {_runs_key(runs, label, by, seeds)} - {_runs_key(runs, baseline, by, seeds)}"


def difference_of_values(a: pd.Series, b: pd.Series, label: str = "a", baseline: str = "b",
                         metric: str = "value", key: str = "", paired: bool = True) -> Difference:
    """``a - b`` for two Series indexed by seed: paired over the common seeds (``paired=False``: never),
    else Welch's t, or for one value against several the prediction interval of one new run."""
    a, b = a.dropna(), b.dropna()
    common = sorted(set(a.index) & set(b.index)) if paired else []
    if common:
        d = (a.loc[common] - b.loc[common]).to_numpy(float)
        n = len(d)
        sd = float(d.std(ddof=1)) if n >= 2 else float("nan")
        se = sd / math.sqrt(n) if n >= 2 else float("nan")
        return Difference(label, baseline, metric, float(d.mean()), sd, se, n, float(n - 1), True,
                          tuple(int(s) for s in common), key)
    if len(a) == 0 or len(b) == 0:
        raise KDLibError(f"{label!r} or {baseline!r} has no value to compare")
    if len(a) == 1 and len(b) >= 2:
        # one run against several: is it a draw from the baseline's runs? The prediction interval of one
        # new run, sd_b * sqrt(1 + 1/n_b), t with n_b - 1 df (assumes the single run is as noisy as them)
        sd_b = float(b.std(ddof=1))
        return Difference(label, baseline, metric, float(a.iloc[0] - b.mean()), sd_b,
                          sd_b * math.sqrt(1 + 1 / len(b)), 1, float(len(b) - 1), False, (), key)
    va = float(a.var(ddof=1)) if len(a) >= 2 else float("nan")
    vb = float(b.var(ddof=1)) if len(b) >= 2 else float("nan")
    qa, qb = va / len(a), vb / len(b)
    se = math.sqrt(qa + qb) if np.isfinite(qa + qb) else float("nan")
    df = ((qa + qb) ** 2 / (qa ** 2 / (len(a) - 1) + qb ** 2 / (len(b) - 1))
          if np.isfinite(se) and se > 0 else float(len(a) + len(b) - 2))
    return Difference(label, baseline, metric, float(a.mean() - b.mean()), float("nan"), se, min(len(a), len(b)),
                      float(df), False, (), key)


def paired_difference(runs: pd.DataFrame, label: str, baseline: str, metric: str = "last_test_acc",
                      by: str = "label") -> Difference:
    """``label - baseline`` paired by seed, its noise from these runs alone (see the module's rules)."""
    a, b = seed_values(runs, label, metric, by), seed_values(runs, baseline, metric, by)
    common = sorted(set(a.index) & set(b.index))
    key = comparison_key(runs, label, baseline, metric, by, common or sorted(set(a.index) | set(b.index)))
    return difference_of_values(a, b, label, baseline, metric, key)


def _adjusted(p_values: Sequence[float], step) -> np.ndarray:
    """Adjusted p-values: ``step(sorted finite p) -> adjusted, in that order``; NaN stays NaN."""
    p = np.asarray(p_values, dtype=float)
    out = np.full_like(p, np.nan)
    ok = np.flatnonzero(np.isfinite(p))
    if ok.size:
        order = ok[np.argsort(p[ok], kind="stable")]
        out[order] = np.minimum(step(p[order]), 1.0)
    return out


def holm(p_values: Sequence[float]) -> np.ndarray:
    """Holm's step-down adjusted p-values (family-wise error rate); NaN stays NaN."""
    return _adjusted(p_values, lambda q: np.maximum.accumulate((len(q) - np.arange(len(q))) * q))


def benjamini_hochberg(p_values: Sequence[float]) -> np.ndarray:
    """Benjamini-Hochberg adjusted p-values (false discovery rate); NaN stays NaN."""
    return _adjusted(p_values, lambda q: np.minimum.accumulate((q * len(q) / (np.arange(len(q)) + 1))[::-1])[::-1])
