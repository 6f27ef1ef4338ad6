"""Noise as a result: every verdict the book prints, computed from the runs it is about.

Pure functions over the pandas frames of :class:`kdlib.records.RunTables` (``runs``: one row per run with
``seed`` and the accuracies; ``classes``: one row per run and class with ``acc``), grouped by a label
column (``label`` in the chapters' tables). The rules, stated once (:data:`RULE` is the footnote the
chapters print under their verdict table):

**Two methods, one number per run** (:func:`paired_difference`, :func:`compare`). The runs of ``A`` and
of the baseline ``B`` with the same seed share the student's initialisation and data order, so the
comparison is *paired by seed*: ``d_s = A_s - B_s`` over the seeds both were run with, and the noise is
the spread of those ``n`` differences and of nothing else (no other method's runs enter it, so the same
comparison gets the same interval in every chapter). The interval is ``mean(d) ± t · sd(d) / sqrt(n)``
with ``t`` the 97.5 % quantile of Student's t with ``n - 1`` degrees of freedom (12.71 for 1, 4.30 for 2,
2.78 for 4). A difference is **distinguishable from seed noise** when that 95 % interval excludes 0 (a
two-sided paired t-test at 5 %). Runs without common seeds are compared unpaired (Welch's t; a single run
against several by the prediction interval of one new run). One seed on both sides measures no noise:
no verdict. The **detectable difference** is the one a build of this many seeds and
this noise finds with 80 % probability, ``(t_0.975 + t_0.80) · sd(d) / sqrt(n)``.

**Many comparisons** (:func:`holm`, :func:`benjamini_hochberg`): a table of several comparisons adds a
Holm-adjusted verdict (family-wise 5 %); per-class lists and pairs of methods are corrected with
Benjamini-Hochberg or labelled *exploratory*.

**Class by class** (:func:`class_effects`). Per seed, the class deltas ``A_s,c - B_s,c`` are *centred*
(their 20 %-trimmed mean over the classes, the typical shift, is removed: trimmed, so that a few classes
with a large effect do not push all the others; a mean, because class accuracies move in steps of
100 / test images and a median would land on a step, not on the shift), so what remains is
class-specific. The
observed change of class c is the mean of its centred deltas over the seeds, ``O_c``; its *null twin*
``N_c`` is the same mean with the signs of the last ``n // 2`` seeds flipped (a class-specific effect
cancels in it, seed noise does not). When seed noise is independent between seeds and symmetric, ``O_c``
and ``N_c`` are exchangeable under "no class-specific effect", with this build's own heavy tails and each
class's own noise level. A class *gains* when ``O_c`` lies in the top 10 % of all the ``O`` and ``N``
values together and *loses* in the bottom 10 %; gains and losses are counted apart, and each count is an
exact sign test (under the null each tail value is an observed change or a twin with probability 1/2),
judged at 2.5 % so that "some classes gain or lose specifically" keeps 5 %. Use an even number of seeds:
with an odd number the twin keeps a third (or less) of the effect, which costs power, not validity.
Naming single classes is one test per class: such lists are exploratory.

**Two methods' class effects** (:func:`effect_correlation`). Runs of one seed share per-class noise
whatever the method, and deltas against one shared baseline share its noise. So each method's per-class
delta is taken within one seed (``A_s - B_s``) and correlated with the other's from a *different* seed
(``C_t - B_t``, ``t != s``): no run, and no seed, is shared. The rank correlation is averaged over
disjoint seed pairs (each seed used once: pairs (s, t) and (t, s) together would share the baseline runs
of both seeds) and tested by permuting the classes (1,999 permutations).

Every function here is tested on synthetic records with a known answer (a clear effect, pure noise, noise
shared by a seed) in ``tests/test_stats.py``, including that each rule's false-alarm rate stays at its
stated level.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import pandas as pd

from kdlib.errors import KDLibError

__all__ = ["ALPHA", "POWER", "PERMUTATIONS", "RULE", "t_cdf", "t_quantile", "t_critical", "Difference",
           "paired_difference", "seed_values", "difference_of_values", "compare", "holm",
           "benjamini_hochberg", "detectable_difference", "seeds_needed", "ClassEffects", "class_effects",
           "Correlation", "effect_correlation", "effect_association", "permutation_correlation", "matrix_correlation", "group_contrast", "spearman",
           "collapsed_runs", "drop_runs", "verdict_difference", "verdict_classes", "verdict_correlation",
           "verdict_collapsed", "verdict_table", "verdict_word", "fmt_p", "power_sentence", "fmt_diff", "fmt_interval",
           "verdict_records", "comparison_key"]

#: two-sided error rate of every verdict
ALPHA = 0.05
#: the probability with which the stated detectable difference is found
POWER = 0.80
#: randomisations/permutations behind every per-class and correlation p-value (p resolves to 1/2000)
PERMUTATIONS = 1999
#: the random stream of every randomisation test: the same data give the same p-value in every chapter
_RNG_SEED = 20240


# -- Student's t ---------------------------------------------------------------------------------------------
def _betacf(a: float, b: float, x: float) -> float:
    """The continued fraction of the incomplete beta function (modified Lentz), x < (a + 1) / (a + b + 2)."""
    tiny, c, d = 1e-300, 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 400):
        for num in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                    -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return h


def _betainc(a: float, b: float, x: float) -> float:
    """Regularised incomplete beta function I_x(a, b)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = (math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _betacf(a, b, x) / a
    return 1.0 - math.exp(log_front) * _betacf(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with ``df`` degrees of freedom (``df = inf``: the normal)."""
    if not np.isfinite(t):
        return 1.0 if t > 0 else 0.0
    if not np.isfinite(df):
        return 0.5 * math.erfc(-t / math.sqrt(2.0))
    tail = 0.5 * _betainc(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t > 0 else tail


def t_quantile(p: float, df: float) -> float:
    """The ``p`` quantile of Student's t with ``df`` degrees of freedom (bisection on :func:`t_cdf`)."""
    if not 0.0 < p < 1.0:
        raise KDLibError(f"a quantile needs 0 < p < 1, got {p!r}")
    if p == 0.5:
        return 0.0
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < p:
        hi *= 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if t_cdf(mid, df) < p else (lo, mid)
        if hi - lo < 1e-12 * max(1.0, hi):
            break
    return 0.5 * (lo + hi)


def t_critical(df: float, alpha: float = ALPHA) -> float:
    """The two-sided critical value: ``t_quantile(1 - alpha / 2, df)`` (1.96 for infinite df)."""
    return t_quantile(1.0 - alpha / 2.0, df)


def detectable_difference(sd: float, n: int, alpha: float = ALPHA, power: float = POWER) -> float:
    """The true paired difference a two-sided t-test at ``alpha`` over ``n`` paired seeds with this
    ``sd`` of the paired differences finds with probability ``power``: ``(t_{1-a/2} + t_power) sd/sqrt(n)``
    (n - 1 degrees of freedom; NaN for fewer than two seeds)."""
    if n < 2 or not np.isfinite(sd):
        return float("nan")
    df = n - 1
    return (t_critical(df, alpha) + t_quantile(power, df)) * sd / math.sqrt(n)


def seeds_needed(sd: float, difference: float, alpha: float = ALPHA, power: float = POWER,
                 most: int = 1000) -> int:
    """The fewest paired seeds whose :func:`detectable_difference` is at most ``difference``."""
    if not (np.isfinite(sd) and np.isfinite(difference)) or difference <= 0:
        raise KDLibError("seeds_needed needs a finite noise and a positive difference")
    for n in range(2, most + 1):
        if detectable_difference(sd, n, alpha, power) <= difference:
            return n
    return most


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


def compare(runs: pd.DataFrame, baseline: str, labels: Optional[Sequence[str]] = None,
            metric: str = "last_test_acc", by: str = "label", exclude: Iterable[str] = ()) -> pd.DataFrame:
    """Every label (or ``labels``) against ``baseline``: one row each with ``diff``, ``ci_low``, ``ci_high``,
    ``se``, ``df``, ``n``, ``p``, ``distinguishable``, ``sign``, ``detectable``, ``p_holm`` (Holm over the
    rows) and ``holm_distinguishable``, ``key`` and the ``verdict`` sentence. ``exclude``: labels left out
    (collapsed runs). Each row's interval comes from its own two labels' runs only."""
    exclude = set(exclude)
    names = [l for l in (labels if labels is not None else dict.fromkeys(runs[by]))
             if l != baseline and l not in exclude]
    rows = []
    for name in names:
        d = paired_difference(runs, name, baseline, metric, by)
        rows.append(_row(d, by))
    table = pd.DataFrame(rows, columns=[by, "baseline", "diff", "ci_low", "ci_high", "se", "df", "n", "p",
                                        "distinguishable", "sign", "detectable", "key", "verdict"])
    table["p_holm"] = holm(table["p"].to_numpy(float)) if len(table) else []
    table["holm_distinguishable"] = table["p_holm"] < ALPHA
    return table


def _row(d: Difference, by: str = "label") -> Dict[str, object]:
    lo, hi = d.ci
    return {by: d.label, "baseline": d.baseline, "diff": d.diff, "ci_low": lo, "ci_high": hi, "se": d.se,
            "df": d.df, "n": d.n, "p": d.p_value, "distinguishable": d.distinguishable, "sign": d.sign,
            "detectable": d.detectable, "key": d.key, "verdict": verdict_difference(d)}


# -- class by class -------------------------------------------------------------------------------------------
def _trimmed_mean(values, cut: float = 0.2) -> float:
    """The mean of the middle ``1 - 2 cut`` of the values (20 % off each end)."""
    v = np.sort(np.asarray(values, dtype=float))
    k = int(cut * v.size)
    return float(v[k:v.size - k].mean()) if v.size > 2 * k else float(np.median(v))


def _per_seed_classes(classes: pd.DataFrame, label: str, by: str) -> pd.DataFrame:
    sub = classes[classes[by] == label]
    if sub.empty:
        raise KDLibError(f"no per-class accuracies for {label!r}; labels: "
                         f"{', '.join(map(str, dict.fromkeys(classes[by])))}")
    return sub.groupby(["class_index", "seed"])["acc"].mean().unstack("seed")


@dataclass(frozen=True)
class ClassEffects:
    """What ``label`` does to single classes against ``baseline``, beyond its typical shift and beyond
    seed noise (see the module's rules). ``table``: one row per class with ``delta`` (mean over the paired
    seeds), ``centred`` (minus the typical shift), ``null`` (the class's null twin on the same scale) and
    ``p_gain``/``p_loss`` (one-sided, against the pooled null twins; exploratory: one test per class)."""

    label: str
    baseline: str
    n: int
    table: pd.DataFrame
    shift: float  # the typical change over the classes (per seed, the trimmed mean over classes; mean over seeds)
    upper: float  # a class gains when its centred change is above this (see class_effects)
    lower: float  # and loses below this one
    gains: int
    losses: int
    expected_gains: float  # what pure noise would give, on average
    expected_losses: float
    p_gains: float  # exact sign-test p-values, one-sided, each judged at ALPHA / 2
    p_losses: float

    @property
    def measured(self) -> bool:
        return self.n >= 2

    @property
    def gains_beyond_noise(self) -> bool:
        return bool(self.measured and self.p_gains < ALPHA / 2)

    @property
    def losses_beyond_noise(self) -> bool:
        return bool(self.measured and self.p_losses < ALPHA / 2)

    @property
    def beyond_noise(self) -> bool:
        return self.gains_beyond_noise or self.losses_beyond_noise

    def top(self, k: int = 5, side: str = "loss") -> pd.DataFrame:
        """The ``k`` classes with the largest centred loss (or gain): an exploratory list."""
        t = self.table.sort_values("centred", ascending=(side == "loss"))
        return t.head(k)


def _sign_test(k: int, m: int) -> float:
    """P(X >= k) for X ~ Binomial(m, 1/2)."""
    if m == 0:
        return 1.0
    return float(sum(math.comb(m, i) for i in range(k, m + 1)) / 2.0 ** m)


def _tail_test(obs: np.ndarray, null: np.ndarray, cut: float, upper: bool) -> Tuple[int, float, float]:
    """Of the classes whose observed change or null twin (not both) lies beyond ``cut``, how many have the
    observed one there, and the exact one-sided p-value of that count (each is a fair coin under H0)."""
    o = obs > cut if upper else obs < cut
    z = null > cut if upper else null < cut
    both = int((o & z).sum())
    one = o ^ z
    k = int((o & one).sum())
    m = int(one.sum())
    return both + k, _sign_test(k, m), both + m / 2.0


def class_effects(classes: pd.DataFrame, label: str, baseline: str, by: str = "label",
                  tail: float = 0.10) -> ClassEffects:
    """Class-specific gains and losses of ``label`` against ``baseline`` (module docstring, "Class by
    class"): centred per seed, judged against null twins from the same runs, gains and losses apart.

    A class *gains* when its centred change is among the top ``tail`` of all centred changes and null twins
    together, and *loses* when among the bottom ``tail``. Swapping a class's change with its twin leaves
    that pooled threshold unchanged, so the count of observed changes in a tail is an exact sign test over
    the classes with exactly one of the two in it (those with both count either way)."""
    a, b = _per_seed_classes(classes, label, by), _per_seed_classes(classes, baseline, by)
    seeds = sorted(set(a.columns) & set(b.columns))
    if not seeds:
        raise KDLibError(f"{label!r} and {baseline!r} share no seed: a paired comparison needs common seeds")
    d = (a[seeds] - b[seeds]).dropna()
    n = len(seeds)
    delta = d.mean(axis=1)
    names = (classes.drop_duplicates("class_index").set_index("class_index")["class_name"]
             if "class_name" in classes else pd.Series(dtype=str))
    table = pd.DataFrame({"class_index": d.index, "class_name": names.reindex(d.index).to_numpy(),
                          "delta": delta.to_numpy(float)})
    centre = d.apply(_trimmed_mean)  # per seed
    shift = float(centre.mean())
    table["centred"] = table["delta"] - shift
    nan = float("nan")
    if n < 2:
        table["null"] = table["p_gain"] = table["p_loss"] = nan
        return ClassEffects(label, baseline, n, table, shift, nan, nan, 0, 0, nan, nan, nan, nan)
    signs = np.ones(n)
    signs[n - n // 2:] = -1.0  # the last n // 2 seeds flipped: a class effect cancels (n even) or shrinks
    values = (d - centre).to_numpy(float)
    obs = values.sum(1) / n  # = the centred mean delta
    null = (values * signs).sum(1) / n  # its null twin: the same noise, on the same scale
    # what is left of a location (the per-seed centres are estimates) is taken out of both alike: the test
    # is about tails, and an offset between the two would pass for gains or losses
    obs, null = obs - _trimmed_mean(obs), null - _trimmed_mean(null)
    table["centred"] = obs
    table["null"] = null
    pooled = np.sort(null)
    table["p_gain"] = [(1 + (pooled >= o).sum()) / (1 + pooled.size) for o in obs]
    table["p_loss"] = [(1 + (pooled <= o).sum()) / (1 + pooled.size) for o in obs]
    both = np.concatenate([obs, null])
    upper, lower = float(np.quantile(both, 1 - tail)), float(np.quantile(both, tail))
    gains, p_g, e_g = _tail_test(obs, null, upper, True)
    losses, p_l, e_l = _tail_test(obs, null, lower, False)
    return ClassEffects(label, baseline, n, table, shift, upper, lower, gains, losses, e_g, e_l, p_g, p_l)


# -- correlations -----------------------------------------------------------------------------------------------
def spearman(x, y) -> float:
    """Spearman's rank correlation (Pearson's on average ranks), over the entries both have."""
    both = pd.concat([pd.Series(x).reset_index(drop=True), pd.Series(y).reset_index(drop=True)], axis=1).dropna()
    if len(both) < 3:
        return float("nan")
    return float(both.iloc[:, 0].rank().corr(both.iloc[:, 1].rank()))


def _rank_rows(m: np.ndarray) -> np.ndarray:
    """Average ranks along the last axis, centred and scaled to unit norm (for Pearson on ranks)."""
    r = pd.DataFrame(m.T).rank().to_numpy(float).T
    r = r - r.mean(axis=-1, keepdims=True)
    norm = np.linalg.norm(r, axis=-1, keepdims=True)
    return np.divide(r, norm, out=np.zeros_like(r), where=norm > 0)


@dataclass(frozen=True)
class Correlation:
    """A rank correlation over classes with its permutation p-value."""

    what: str
    r: float
    p: float
    n: int  # classes
    pairs: int  # seed pairs averaged (0: not drawn)
    naive: float = float("nan")  # the same correlation with shared runs (to show the artefact)
    reason: str = ""
    null_mean: float = 0.0  # the correlation noise alone gives on average (not 0 for sizes of changes)

    @property
    def drawn(self) -> bool:
        return self.pairs > 0 and np.isfinite(self.r)

    @property
    def distinguishable(self) -> bool:
        return bool(self.drawn and self.p < ALPHA)


def permutation_correlation(xs: Sequence[np.ndarray], ys: Sequence[np.ndarray], reps: int = PERMUTATIONS,
                            what: str = "") -> Correlation:
    """Mean Spearman correlation of ``xs[i]`` with ``ys[i]`` (aligned class vectors), tested by permuting
    the classes of every ``ys[i]`` with one common permutation (two-sided)."""
    if not xs:
        return Correlation(what, float("nan"), float("nan"), 0, 0)
    xr = _rank_rows(np.vstack([np.asarray(x, float) for x in xs]))
    yr = _rank_rows(np.vstack([np.asarray(y, float) for y in ys]))
    r = float((xr * yr).sum(1).mean())
    rng = np.random.default_rng(_RNG_SEED)
    c = xr.shape[1]
    perms = np.argsort(rng.random((reps, c)), axis=1)
    null = np.einsum("pc,rpc->r", xr, yr[:, perms].transpose(1, 0, 2)) / xr.shape[0]
    p = (1 + int((np.abs(null) >= abs(r) - 1e-12).sum())) / (1 + reps)
    return Correlation(what, r, p, c, len(xs))


def effect_correlation(classes: pd.DataFrame, a: str, b: Optional[str], baseline: str, by: str = "label",
                       other: Optional[pd.Series] = None, what: str = "", reps: int = PERMUTATIONS) -> Correlation:
    """Rank correlation over classes between ``a - baseline`` and ``b - baseline`` (or ``other - baseline``,
    ``other`` a per-class Series such as the teacher's accuracy), with crossed seeds: ``a``'s delta from
    seed s, the other from a seed t != s, averaged over disjoint pairs (s, t) (each seed used once, so no
    two terms share a run); permutation p-value."""
    base = _per_seed_classes(classes, baseline, by)
    xa = _per_seed_classes(classes, a, by)
    if b is not None:
        yb = _per_seed_classes(classes, b, by)
    elif other is None:
        raise KDLibError("effect_correlation needs b or other")
    seeds_x = sorted(set(xa.columns) & set(base.columns))
    seeds_y = sorted(set(yb.columns) & set(base.columns)) if b is not None else list(base.columns)
    index = xa.index
    naive = float("nan")
    if seeds_x and seeds_y:
        dx = (xa[seeds_x] - base[seeds_x]).mean(axis=1)
        dy = ((yb[seeds_y] - base[seeds_y]).mean(axis=1) if b is not None
              else pd.Series(other).reindex(base.index) - base[seeds_y].mean(axis=1))
        naive = spearman(dx.reindex(index), dy.reindex(index))
    # disjoint pairs of seeds, each seed used once: with both (s, t) and (t, s) the two terms would share
    # the baseline runs of s and t and the permutation test would be too sure of itself
    pairs, free = [], list(dict.fromkeys(seeds_x + seeds_y))
    for s in seeds_x:
        if s not in free:
            continue
        t = next((t for t in seeds_y if t != s and t in free), None)
        if t is not None:
            pairs.append((s, t))
            free.remove(s)
            free.remove(t)
    if not pairs:
        return Correlation(what, float("nan"), float("nan"), len(index), 0, naive,
                           "it needs two seeds, so that the two changes share no run and no seed")
    xs, ys = [], []
    for s, t in pairs:
        xs.append((xa[s] - base[s]).reindex(index).to_numpy(float))
        y = (yb[t] - base[t]) if b is not None else pd.Series(other).reindex(base.index) - base[t]
        ys.append(y.reindex(index).to_numpy(float))
    ok = np.all(np.isfinite(np.vstack(xs + ys)), axis=0)
    result = permutation_correlation([x[ok] for x in xs], [y[ok] for y in ys], reps, what)
    return Correlation(what, result.r, result.p, result.n, result.pairs, naive)


def effect_association(effects: "ClassEffects", covariate, magnitude: bool = True, reps: int = PERMUTATIONS,
                       what: str = "") -> Correlation:
    """Rank correlation over classes between the class-specific changes of ``effects`` (their size
    ``|O_c|`` with ``magnitude=True``, else ``O_c``) and a per-class ``covariate`` (a Series by class index,
    e.g. the teacher's confidence), tested against the null twins: under "no class-specific effect" each
    class's change and its twin are exchangeable, so swapping them at random gives the null distribution,
    classes' own noise levels included (a noisy class is large in both). Two-sided p-value."""
    t = effects.table.set_index("class_index")
    x = pd.Series(covariate).reindex(t.index).to_numpy(float)
    o, z = t["centred"].to_numpy(float), t["null"].to_numpy(float)
    ok = np.isfinite(x) & np.isfinite(o) & np.isfinite(z)
    if not effects.measured or ok.sum() < 3:
        return Correlation(what, float("nan"), float("nan"), int(ok.sum()), 0,
                           reason="it needs two seeds (one seed has no null twins)")
    x, o, z = x[ok], o[ok], z[ok]
    f = np.abs if magnitude else (lambda v: v)
    xr = _rank_rows(x[None, :])[0]
    r = float(_rank_rows(f(o)[None, :])[0] @ xr)
    rng = np.random.default_rng(_RNG_SEED)
    swap = rng.random((reps, o.size)) < 0.5
    null = _rank_rows(f(np.where(swap, z, o))) @ xr
    centre = float(null.mean())
    p = (1 + int((np.abs(null - centre) >= abs(r - centre) - 1e-12).sum())) / (1 + reps)
    return Correlation(what, r, p, int(o.size), 1, null_mean=centre)


def group_contrast(matrix, groups, reps: int = PERMUTATIONS) -> Dict[str, float]:
    """Mean off-diagonal entry of a C x C ``matrix`` within a group minus between groups, and its
    permutation p-value (two-sided: the classes' group labels shuffled, group sizes kept)."""
    m = np.asarray(matrix, dtype=float)
    g = np.asarray(groups)
    if m.ndim != 2 or m.shape[0] != m.shape[1] or m.shape[0] != len(g):
        raise KDLibError(f"need a C x C matrix and C groups, got {m.shape} and {len(g)}")
    off = ~np.eye(len(g), dtype=bool)

    def contrast(labels):
        same = labels[:, None] == labels[None, :]
        return m[same & off].mean() - m[~same & off].mean()

    observed = float(contrast(g))
    rng = np.random.default_rng(_RNG_SEED)
    null = np.array([contrast(rng.permutation(g)) for _ in range(reps)])
    p = (1 + int((np.abs(null) >= abs(observed) - 1e-15).sum())) / (1 + reps)
    return {"contrast": observed, "p": float(p), "null_sd": float(null.std())}


def matrix_correlation(a, b, reps: int = PERMUTATIONS, what: str = "") -> Correlation:
    """Spearman correlation of the off-diagonal entries of two C x C matrices, tested by permuting the
    classes of one of them (rows and columns together: a Mantel test). The entries of a matrix are not
    independent (each class appears in a whole row), so a plain correlation test would be far too sure."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.shape != b.shape or a.ndim != 2 or a.shape[0] != a.shape[1]:
        raise KDLibError(f"need two C x C matrices, got {a.shape} and {b.shape}")
    c = a.shape[0]
    off = ~np.eye(c, dtype=bool)
    ar = _rank_rows(a[off][None, :])[0]
    r = float(ar @ _rank_rows(b[off][None, :])[0])
    rng = np.random.default_rng(_RNG_SEED)
    null = np.empty(reps)
    for i in range(reps):
        perm = rng.permutation(c)
        null[i] = ar @ _rank_rows(b[np.ix_(perm, perm)][off][None, :])[0]
    p = (1 + int((np.abs(null) >= abs(r) - 1e-12).sum())) / (1 + reps)
    return Correlation(what, r, p, c, 1)


# -- failed runs ----------------------------------------------------------------------------------------------------
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
        if isinstance(status, str) and status != "finished":
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


# -- sentences and tables ---------------------------------------------------------------------------------------------
RULE = ("Differences are paired by seed (same initialisation and data order) and their noise comes from "
        "the two compared methods' runs alone: the 95 % interval is the mean paired difference ± t × its "
        "standard error, t from Student's distribution with seeds − 1 degrees of freedom; a verdict needs the "
        "interval to exclude 0. \"Detectable\": the true difference these seeds find with 80 % probability at "
        "the measured noise. Class counts: per seed, the class changes minus their trimmed mean; a class gains (loses) "
        "when its change lies in the top (bottom) 10 % of all changes and of their null twins, the same seeds "
        "with half of them sign-flipped; gains and losses are exact sign tests at 2.5 % each. Correlations "
        "pair runs of different seeds and are tested by permuting the classes. \"Whole table\": Holm's "
        "correction over every tested row.")


def fmt_diff(diff: float, digits: int = 2) -> str:
    return f"{diff:+.{digits}f}"


def fmt_interval(d: Difference, digits: int = 2) -> str:
    """``"[+1.20, +5.30]"``, or ``"not measured"`` (one seed)."""
    if not d.measured:
        return "not measured"
    lo, hi = d.ci
    return f"[{lo:+.{digits}f}, {hi:+.{digits}f}]"


def verdict_difference(d: Difference, name: Optional[str] = None, base: Optional[str] = None,
                       unit: str = "points") -> str:
    """One short plain-text sentence: the difference, its 95 % interval and what it means."""
    name, base = name or d.label, base or d.baseline
    if not d.measured:
        return (f"{name} differs from {base} by {d.diff:+.2f} {unit} on one seed: no noise is measured, so "
                f"this is not a finding.")
    seeds = f"{d.n} paired seeds" if d.paired else "unpaired"
    core = f"{d.diff:+.2f} {unit}, 95 % interval {fmt_interval(d)}, {seeds}"
    if d.distinguishable:
        return f"{name} is {'above' if d.diff > 0 else 'below'} {base} ({core})."
    return f"{name} and {base} are not distinguishable ({core})."


def verdict_word(d: Difference) -> str:
    if not d.measured:
        return "not measured (1 seed)"
    return {1: "above", -1: "below", 0: "not distinguishable"}[d.sign]


def fmt_p(p: float) -> str:
    """``"p = 0.034"``, ``"p < 0.001"`` (a randomisation p-value never reaches 0)."""
    return "p < 0.001" if p < 0.001 else f"p = {p:.3f}"


def _unit(metric: str) -> str:
    return " points" if ("acc" in metric or "%" in metric) else ""


def _table_row(name: str, item, side: str = "") -> Dict[str, object]:
    """One row of :func:`verdict_table` and the p-value of its 5 % test (for Holm)."""
    if isinstance(item, Difference):
        digits = 2 if _unit(item.metric) or abs(item.diff) >= 0.1 else 4
        return {"claim": name, "estimate": f"{item.diff:+.{digits}f}{_unit(item.metric)}",
                "95 % interval or test": (f"{fmt_interval(item, digits)}, t with {item.df:.0f} df" if item.measured
                                          else "one seed: not measured"),
                "verdict": verdict_word(item),
                "detectable (80 %)": (f"{item.detectable:.{digits}f}{_unit(item.metric)}"
                                      if np.isfinite(item.detectable) else "–"),
                "_p": item.p_value}
    if isinstance(item, ClassEffects) and side == "either":
        p = min(1.0, 2 * min(item.p_gains, item.p_losses)) if item.measured else float("nan")
        return {"claim": name, "estimate": (f"{item.gains} gain, {item.losses} lose (noise: about "
                                            f"{item.expected_gains:.0f}, {item.expected_losses:.0f})"
                                            if item.measured else "–"),
                "95 % interval or test": (f"sign tests, {fmt_p(item.p_gains)} (gains), {fmt_p(item.p_losses)} (losses)"
                                          if item.measured else "one seed: not measured"),
                "verdict": (("beyond noise" if item.beyond_noise else "not distinguishable") if item.measured
                            else "not measured (1 seed)"),
                "detectable (80 %)": "–", "_p": p}
    if isinstance(item, ClassEffects):
        gains = side == "gains"
        count, expected = (item.gains, item.expected_gains) if gains else (item.losses, item.expected_losses)
        p = item.p_gains if gains else item.p_losses
        beyond = item.gains_beyond_noise if gains else item.losses_beyond_noise
        return {"claim": name, "estimate": (f"{count} classes (noise: about {expected:.0f})" if item.measured
                                            else "–"),
                "95 % interval or test": f"sign test, {fmt_p(p)}" if item.measured else "one seed: not measured",
                "verdict": ("beyond noise" if beyond else "not distinguishable") if item.measured else
                "not measured (1 seed)",
                "detectable (80 %)": "–", "_p": min(1.0, 2 * p) if item.measured else float("nan")}
    if isinstance(item, Correlation):
        return {"claim": name, "estimate": (f"r = {item.r:+.2f}" + (f" (noise: {item.null_mean:+.2f})"
                                                                     if abs(item.null_mean) > 0.005 else ""))
                if item.drawn else "–",
                "95 % interval or test": (f"permutation, {fmt_p(item.p)}" if item.drawn else
                                          f"not drawn: {item.reason or 'too few seeds'}"),
                "verdict": ("distinguishable" if item.distinguishable else "not distinguishable") if item.drawn
                else "not measured",
                "detectable (80 %)": "–", "_p": item.p if item.drawn else float("nan")}
    if isinstance(item, dict) and "verdict" in item:  # a summary row a chapter builds itself
        return {"claim": name, "estimate": item.get("estimate", "–"), "95 % interval or test": item.get("test", "–"),
                "verdict": item["verdict"], "detectable (80 %)": "–", "_p": float(item.get("p", float("nan")))}
    if isinstance(item, dict) and "contrast" in item:  # group_contrast
        return {"claim": name, "estimate": f"{item['contrast']:+.4f}", "95 % interval or test":
                f"permutation, {fmt_p(item['p'])}",
                "verdict": "distinguishable" if item["p"] < ALPHA else "not distinguishable",
                "detectable (80 %)": "–", "_p": item["p"]}
    raise KDLibError(f"verdict_table cannot show a {type(item).__name__}")


def verdict_table(rows: Sequence[Tuple]) -> pd.DataFrame:
    """The chapter's one verdict table. ``rows``: ``(claim, Difference)``, ``(claim, ClassEffects, "gains",
    "losses" or "either")``, ``(claim, Correlation)`` or ``(claim, group_contrast(...))``. Columns: the estimate, its 95 % interval (or the test and
    its p-value), the verdict, the detectable difference, and with several tested rows the Holm verdict
    over the whole table (class counts enter Holm with twice their one-sided p-value)."""
    shown = [_table_row(*row) for row in rows]
    table = pd.DataFrame(shown, columns=["claim", "estimate", "95 % interval or test", "verdict",
                                         "detectable (80 %)", "_p"])
    p = table["_p"].to_numpy(float)
    if np.isfinite(p).sum() > 1:
        adjusted = holm(p)
        table["whole table (Holm)"] = ["–" if not np.isfinite(q) else ("holds" if q < ALPHA else "does not hold")
                                       for q in adjusted]
    return table.drop(columns="_p").set_index("claim")


def verdict_records(diffs: Sequence[Tuple[str, Difference]]) -> List[Dict[str, object]]:
    """The numbers behind a verdict table, keyed by :func:`comparison_key`, for a cross-chapter check."""
    out = []
    for name, d in diffs:
        if not d.key:  # a comparison of values a chapter computed itself: nothing another chapter could share
            continue
        lo, hi = d.ci
        out.append({"name": name, "key": d.key, "diff": round(d.diff, 6), "ci_low": round(lo, 6) if np.isfinite(lo) else None,
                    "ci_high": round(hi, 6) if np.isfinite(hi) else None, "df": d.df, "n": d.n,
                    "verdict": verdict_word(d)})
    return out


def power_sentence(diffs: Sequence[Difference]) -> str:
    """What this build can detect: the range of the comparisons' detectable differences."""
    found = [d for d in diffs if d.measured and np.isfinite(d.detectable)]
    if not found:
        return ("With one seed this build measures no seed noise, so it cannot say how large a difference it "
                "would detect; run it with several seeds (`-p seeds \"[0, 1, 2, 3]\"`).")
    lo = min(d.detectable for d in found)
    hi = max(d.detectable for d in found)
    n = max(d.n for d in found)
    span = f"{lo:.1f}" if hi - lo < 0.05 else f"{lo:.1f} to {hi:.1f}"
    return (f"With {n} seeds and the noise measured here, this build detects a true difference of {span} "
            f"points with 80 % probability; smaller differences may go unseen.")


def verdict_classes(c: ClassEffects, name: Optional[str] = None, base: Optional[str] = None) -> str:
    """One sentence on the class-specific gains and losses of ``c``."""
    name, base = name or c.label, base or c.baseline
    if not c.measured:
        return (f"Class by class, one seed measures no per-class noise, so nothing is said about single "
                f"classes of {name} against {base}.")
    parts = []
    for count, expected, p, word, limit in ((c.gains, c.expected_gains, c.p_gains, "gain", c.upper),
                                            (c.losses, c.expected_losses, c.p_losses, "lose", c.lower)):
        parts.append(f"{count} classes {word} more than {abs(limit):.1f} points (noise alone: about "
                     f"{expected:.0f}; {fmt_p(p)})")
    head = f"Beyond the typical shift of {c.shift:+.2f} points, " + " and ".join(parts)
    if c.beyond_noise:
        which = " and ".join(w for w, b in (("gains", c.gains_beyond_noise), ("losses", c.losses_beyond_noise)) if b)
        return head + f": {name} has class-specific {which} against {base}."
    return head + f": no class-specific effect of {name} against {base} is distinguishable from seed noise."


def verdict_correlation(c: Correlation, what: Optional[str] = None) -> str:
    """One sentence on an :func:`effect_correlation` result."""
    what = what or c.what
    if not c.drawn:
        return f"The correlation between {what} is not drawn: {c.reason or 'too few seeds'}."
    naive = (f" (with shared runs it would read {c.naive:.2f})" if np.isfinite(c.naive) else "")
    if abs(c.null_mean) > 0.005:
        naive += f"; noise alone gives {c.null_mean:+.2f} on average"
    if c.distinguishable:
        return (f"The rank correlation between {what}, from different seeds, is {c.r:.2f} (permutation, "
                f"{fmt_p(c.p)}): {'positive' if c.r > c.null_mean else 'negative'} beyond chance{naive}.")
    return (f"The rank correlation between {what}, from different seeds, is {c.r:.2f} (permutation, "
            f"{fmt_p(c.p)}): not distinguishable from no association{naive}.")


def verdict_collapsed(flagged: pd.DataFrame, by: str = "label") -> str:
    """A sentence naming the collapsed runs left out of the statistics, or ``""`` when there are none."""
    if flagged is None or flagged.empty:
        return ""
    parts = [f"{r[by] if by in flagged else r['method']} seed {int(r['seed'])} ({r['reason']})"
             for _, r in flagged.iterrows()]
    return ("Left out of the statistics and colour scales: " + "; ".join(parts)
            + " — a collapsed or failed run, reported here and not averaged with the others.")
