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

from kdlib.stats.tdist import ALPHA, POWER, PERMUTATIONS, t_cdf, t_quantile, t_critical, detectable_difference, seeds_needed
from kdlib.stats.differences import seed_values, Difference, comparison_key, difference_of_values, paired_difference, holm, benjamini_hochberg
from kdlib.stats.classes import ClassEffects, class_effects
from kdlib.stats.correlations import spearman, Correlation, permutation_correlation, effect_correlation, effect_association, group_contrast, matrix_correlation
from kdlib.stats.verdicts import compare, collapsed_runs, drop_runs, RULE, fmt_diff, fmt_interval, verdict_difference, verdict_word, fmt_p, verdict_table, verdict_records, power_sentence, verdict_classes, verdict_correlation, verdict_collapsed

__all__ = ["ALPHA", "POWER", "PERMUTATIONS", "RULE", "t_cdf", "t_quantile", "t_critical", "Difference",
           "paired_difference", "seed_values", "difference_of_values", "compare", "holm",
           "benjamini_hochberg", "detectable_difference", "seeds_needed", "ClassEffects", "class_effects",
           "Correlation", "effect_correlation", "effect_association", "permutation_correlation", "matrix_correlation", "group_contrast", "spearman",
           "collapsed_runs", "drop_runs", "verdict_difference", "verdict_classes", "verdict_correlation",
           "verdict_collapsed", "verdict_table", "verdict_word", "fmt_p", "power_sentence", "fmt_diff", "fmt_interval",
           "verdict_records", "comparison_key"]
