"""Class by class: centred per-class changes against their null twins (gains and losses apart).

The rules are stated once in :mod:`kdlib.stats`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Tuple

import numpy as np

# pandas is imported inside the functions that use it: a kernel that imports kdlib.stats only for a
# t quantile (a grading kernel of the exercises) does not pay the second pandas takes to import
if TYPE_CHECKING:
    import pandas as pd

from kdlib.errors import KDLibError
from kdlib.stats.tdist import ALPHA


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
    import pandas as pd
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


