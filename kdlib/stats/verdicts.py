"""Failed runs, and the sentences and tables the chapters print from the statistics.

The rules are stated once in :mod:`kdlib.stats`.
"""
from __future__ import annotations

from typing import Dict, Iterable, List, Optional, Sequence, TYPE_CHECKING, Tuple

import numpy as np

# pandas is imported inside the functions that use it: a kernel that imports kdlib.stats only for a
# t quantile (a grading kernel of the exercises) does not pay the second pandas takes to import
if TYPE_CHECKING:
    import pandas as pd

from kdlib.errors import KDLibError
from kdlib.stats.tdist import ALPHA
from kdlib.stats.differences import Difference, holm, paired_difference
from kdlib.stats.classes import ClassEffects
from kdlib.stats.correlations import Correlation


# -- many comparisons in one table --------------------------------------------------------------------------
def compare(runs: pd.DataFrame, baseline: str, labels: Optional[Sequence[str]] = None,
            metric: str = "last_test_acc", by: str = "label", exclude: Iterable[str] = ()) -> pd.DataFrame:
    """Every label (or ``labels``) against ``baseline``: one row each with ``diff``, ``ci_low``, ``ci_high``,
    ``se``, ``df``, ``n``, ``p``, ``distinguishable``, ``sign``, ``detectable``, ``p_holm`` (Holm over the
    rows) and ``holm_distinguishable``, ``key`` and the ``verdict`` sentence. ``exclude``: labels left out
    (collapsed runs). Each row's interval comes from its own two labels' runs only."""
    import pandas as pd
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


# -- failed runs ----------------------------------------------------------------------------------------------------
def collapsed_runs(runs: pd.DataFrame, num_classes: int, metric: str = "last_test_acc",
                   factor: float = 2.0) -> pd.DataFrame:
    """Runs that failed or collapsed: not finished, a non-finite ``metric``, or a ``metric`` below
    ``factor`` times chance (``100 / num_classes`` percent) in a setting whose median run is above twice
    that (a setting where nothing learns, such as the tests' one-epoch runs, flags no run for its
    accuracy). One row per such run with a ``reason``."""
    import pandas as pd
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
    import pandas as pd
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
