"""Student's t distribution, its quantiles and the power of a paired t-test (the error rates every verdict uses).

The rules are stated once in :mod:`kdlib.stats`.
"""
from __future__ import annotations

import math

import numpy as np

from kdlib.errors import KDLibError


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


