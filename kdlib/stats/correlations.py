"""Correlations of class effects, with seeds kept apart, tested by permuting the classes.

The rules are stated once in :mod:`kdlib.stats`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Sequence, TYPE_CHECKING

import numpy as np

# pandas is imported inside the functions that use it: a kernel that imports kdlib.stats only for a
# t quantile (a grading kernel of the exercises) does not pay the second pandas takes to import
if TYPE_CHECKING:
    import pandas as pd

from kdlib.errors import KDLibError
from kdlib.stats.tdist import ALPHA, PERMUTATIONS, _RNG_SEED
from kdlib.stats.classes import _per_seed_classes, ClassEffects


# -- correlations -----------------------------------------------------------------------------------------------
def spearman(x, y) -> float:
    """Spearman's rank correlation (Pearson's on average ranks), over the entries both have."""
    import pandas as pd
    both = pd.concat([pd.Series(x).reset_index(drop=True), pd.Series(y).reset_index(drop=True)], axis=1).dropna()
    if len(both) < 3:
        return float("nan")
    return float(both.iloc[:, 0].rank().corr(both.iloc[:, 1].rank()))


def _rank_rows(m: np.ndarray) -> np.ndarray:
    """Average ranks along the last axis, centred and scaled to unit norm (for Pearson on ranks)."""
    import pandas as pd
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
    import pandas as pd
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
    import pandas as pd
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


