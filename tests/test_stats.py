"""kdlib.stats on synthetic records whose answer is known: a clear effect, pure noise, noise shared by a seed.

Every rule is checked twice: by hand on a few numbers, and by simulation that its false-alarm rate stays
at the rate it states (and that it finds what it claims to find). The simulations use fixed generators
and enough repetitions that each assertion is a binomial bound with a tail probability below 1e-4 for a
correct rule, so they cannot flake: a failure means the rule's error rate is not what it says.
"""
import math

import numpy as np
import pandas as pd
import pytest

from kdlib import stats
from kdlib.records import RunTables

C = 100


def binomial_pmf(k, n, p):
    return math.exp(math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)
                    + k * math.log(p) + (n - k) * math.log1p(-p))


def binomial_upper(n, p, tail=1e-4):
    """The smallest k with P(X > k) < tail for X ~ Binomial(n, p)."""
    total, k = 0.0, 0
    while True:
        total += binomial_pmf(k, n, p)
        if 1 - total < tail:
            return k
        k += 1


def binomial_lower(n, p, tail=1e-4):
    """The largest k with P(X < k) < tail."""
    total, k = 0.0, 0
    while True:
        total += binomial_pmf(k, n, p)
        if total >= tail:
            return k
        k += 1


def runs_frame(values, metric="last_test_acc"):
    """``{label: [value per seed]}`` -> a runs frame (seed i = position i)."""
    rows = [{"label": label, "run": f"/runs/{label}-s{s}", "method": label.split()[0], "seed": s, metric: v,
             "status": "finished"} for label, accs in values.items() for s, v in enumerate(accs)]
    return pd.DataFrame(rows)


def classes_frame(per_class):
    """``{label: array (seeds, C)}`` -> a classes frame."""
    frames = []
    for label, m in per_class.items():
        m = np.asarray(m, float)
        seeds, c = m.shape
        frames.append(pd.DataFrame({"label": label, "run": np.repeat([f"{label}-{s}" for s in range(seeds)], c),
                                    "seed": np.repeat(np.arange(seeds), c), "class_index": np.tile(np.arange(c), seeds),
                                    "class_name": [f"class{i}" for i in np.tile(np.arange(c), seeds)],
                                    "acc": m.ravel()}))
    return pd.concat(frames, ignore_index=True)


# -- Student's t ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("df, value", [(1, 12.7062), (2, 4.3027), (3, 3.1824), (4, 2.7764), (10, 2.2281),
                                       (30, 2.0423), (float("inf"), 1.9600)])
def test_t_critical_values_match_the_tables(df, value):
    assert stats.t_critical(df) == pytest.approx(value, abs=1e-4)


def test_t_cdf_is_symmetric_and_inverts():
    for df in (1, 3, 7.5, 40):
        for t in (-3.0, -0.4, 0.0, 1.1, 5.0):
            assert stats.t_cdf(t, df) + stats.t_cdf(-t, df) == pytest.approx(1.0, abs=1e-12)
            assert stats.t_quantile(stats.t_cdf(t, df), df) == pytest.approx(t, abs=1e-7)
    # df = 1 is the Cauchy distribution: P(T <= 1) = 3/4
    assert stats.t_cdf(1.0, 1) == pytest.approx(0.75, abs=1e-12)


# -- one number per run ----------------------------------------------------------------------------------------------
def test_paired_difference_by_hand():
    runs = runs_frame({"vanilla": [50.0, 52.0, 51.0], "kd": [55.0, 56.0, 57.0]})
    d = stats.paired_difference(runs, "kd", "vanilla")
    # paired differences 5, 4, 6: mean 5, sd 1, se 1/sqrt(3), t with 2 df
    assert d.paired and d.n == 3 and d.df == 2 and d.diff == pytest.approx(5.0)
    assert d.sd == pytest.approx(1.0) and d.se == pytest.approx(1 / math.sqrt(3))
    assert d.ci == pytest.approx((5 - 4.302653 / math.sqrt(3), 5 + 4.302653 / math.sqrt(3)), abs=1e-5)
    assert d.distinguishable and d.sign == 1
    assert d.p_value == pytest.approx(2 * (1 - stats.t_cdf(5 * math.sqrt(3), 2)))
    # two seeds: one degree of freedom, t = 12.71, the interval is wide and honest
    d2 = stats.paired_difference(runs_frame({"vanilla": [50.0, 52.0], "kd": [55.0, 56.0]}), "kd", "vanilla")
    # paired differences 5 and 4: sd 0.707, se 0.5, half-width 12.71 x 0.5
    assert d2.df == 1 and d2.half_width == pytest.approx(12.7062 * 0.5, rel=1e-4)
    assert not d2.distinguishable  # 4.5 +- 6.35: one degree of freedom makes even this not a finding


def test_a_comparison_uses_only_its_own_runs():
    """Adding a third, very noisy method changes nothing about KD - vanilla (it did when noise was pooled)."""
    base = {"vanilla": [50.0, 52.0, 51.0, 50.5], "kd": [53.1, 55.2, 54.0, 53.0]}
    alone = stats.compare(runs_frame(base), "vanilla").set_index("label").loc["kd"]
    crowded = stats.compare(runs_frame({**base, "mlkd": [30.0, 60.0, 41.0, 55.0]}), "vanilla")
    row = crowded.set_index("label").loc["kd"]
    for column in ("diff", "ci_low", "ci_high", "p", "distinguishable", "key", "verdict"):
        assert row[column] == alone[column], column
    assert row["key"] == stats.comparison_key(runs_frame(base), "kd", "vanilla", "last_test_acc")
    # the Holm column is a property of the table (two rows now), the row's own verdict is not
    assert crowded.set_index("label").loc["kd", "p_holm"] >= alone["p"]


def test_unpaired_runs_use_welch():
    a = pd.Series([55.0, 56.0, 57.0], index=[0, 1, 2])
    b = pd.Series([50.0, 52.0, 51.0, 49.0], index=[3, 4, 5, 6])
    d = stats.difference_of_values(a, b)
    va, vb = a.var(ddof=1) / 3, b.var(ddof=1) / 4
    assert not d.paired and d.se == pytest.approx(math.sqrt(va + vb))
    assert d.df == pytest.approx((va + vb) ** 2 / (va**2 / 2 + vb**2 / 3))


def test_one_run_against_several_uses_the_prediction_interval():
    one = pd.Series([40.0], index=[0])
    several = pd.Series([58.0, 60.0, 59.0, 57.0], index=[0, 1, 2, 3])
    d = stats.difference_of_values(one, several.loc[[1, 2, 3]].rename(lambda i: i + 10))
    sd = several.loc[[1, 2, 3]].std(ddof=1)
    assert not d.paired and d.df == 2 and d.se == pytest.approx(sd * math.sqrt(1 + 1 / 3))
    assert d.distinguishable and d.sign == -1


def test_one_seed_is_not_a_finding():
    d = stats.paired_difference(runs_frame({"vanilla": [50.0], "kd": [60.0]}), "kd", "vanilla")
    assert not d.measured and not d.distinguishable and d.sign == 0
    assert "not a finding" in stats.verdict_difference(d)
    assert stats.verdict_table([("kd − vanilla", d)]).iloc[0]["verdict"] == "not measured (1 seed)"


def simulate_pairs(n_seeds, experiments, effect, rng, shared=1.5, own=1.0):
    """Seeds share a component between the two methods (same initialisation and data order)."""
    seed_noise = rng.normal(0, shared, (experiments, n_seeds))
    a = 60 + effect + seed_noise + rng.normal(0, own, (experiments, n_seeds))
    b = 60 + seed_noise + rng.normal(0, own, (experiments, n_seeds))
    return a, b


@pytest.mark.parametrize("n_seeds", [2, 4])
def test_paired_rule_keeps_five_percent_under_pure_noise(n_seeds):
    rng = np.random.default_rng(n_seeds)
    experiments = 2000
    a, b = simulate_pairs(n_seeds, experiments, 0.0, rng)
    alarms = sum(stats.difference_of_values(pd.Series(x), pd.Series(y)).distinguishable for x, y in zip(a, b))
    assert binomial_lower(experiments, 0.05) <= alarms <= binomial_upper(experiments, 0.05)


def test_detectable_difference_is_found_four_times_in_five():
    rng = np.random.default_rng(7)
    n_seeds, experiments, own = 5, 2000, 1.0
    sd_of_difference = own * math.sqrt(2)  # the shared seed noise cancels in a paired difference
    effect = stats.detectable_difference(sd_of_difference, n_seeds)
    a, b = simulate_pairs(n_seeds, experiments, effect, rng, own=own)
    found = sum(stats.difference_of_values(pd.Series(x), pd.Series(y)).sign == 1 for x, y in zip(a, b))
    # the design formula is the usual normal-approximation to the noncentral t: within a few points of 80 %
    assert 0.74 * experiments <= found <= 0.86 * experiments
    assert stats.seeds_needed(sd_of_difference, effect) == n_seeds


def test_holm_and_benjamini_hochberg_by_hand():
    p = [0.01, 0.04, 0.03, float("nan")]
    assert np.allclose(stats.holm(p)[:3], [0.03, 0.06, 0.06]) and np.isnan(stats.holm(p)[3])
    assert np.allclose(stats.benjamini_hochberg([0.01, 0.04, 0.03]), [0.03, 0.04, 0.04])


def test_verdict_sentences_and_table():
    runs = runs_frame({"vanilla": [50.0, 51.0, 49.5, 50.2], "gain": [55.2, 55.7, 54.6, 55.0],
                       "loss": [44.8, 46.3, 44.4, 45.0], "noise": [50.8, 50.5, 49.3, 50.9]})
    table = stats.compare(runs, "vanilla").set_index("label")
    assert list(table["sign"]) == [1, -1, 0]
    assert table.loc["gain", "verdict"].startswith("gain is above vanilla (+")
    assert "95 % interval [" in table.loc["gain", "verdict"] and "4 paired seeds" in table.loc["gain", "verdict"]
    assert table.loc["noise", "verdict"].startswith("noise and vanilla are not distinguishable")
    assert not any(ch in v for v in table["verdict"] for ch in "*`_")  # plain text for {glue:text}
    diffs = [(name, stats.paired_difference(runs, name, "vanilla")) for name in ("gain", "loss", "noise")]
    shown = stats.verdict_table(diffs)
    assert list(shown["verdict"]) == ["above", "below", "not distinguishable"]
    assert list(shown["whole table (Holm)"]) == ["holds", "holds", "does not hold"]
    assert shown.loc["gain", "95 % interval or test"].endswith("t with 3 df")
    records = stats.verdict_records(diffs)
    assert records[0]["key"] == table.loc["gain", "key"] and records[0]["verdict"] == "above"
    assert "detects a true difference of" in stats.power_sentence([d for _, d in diffs])
    # class counts and correlations sit in the same table; one row alone has no Holm column
    effects = stats.class_effects(class_world(np.random.default_rng(0), 2), "kd", "vanilla")
    mixed = stats.verdict_table([("gain", diffs[0][1]), ("losses", effects, "losses")])
    assert mixed.loc["losses", "95 % interval or test"].startswith("sign test, p = ")
    assert "whole table (Holm)" not in stats.verdict_table(diffs[:1])


# -- class by class -------------------------------------------------------------------------------------------------
def class_world(rng, n_seeds, effect=None, shift=0.0, tails=3.0):
    """Per-class accuracies of vanilla and a method: classes differ in their noise level (heavy-tailed
    t noise), and one seed's noise is partly shared by both methods (same initialisation and order)."""
    truth = rng.uniform(30, 90, C)
    level = rng.uniform(2.0, 9.0, C)  # each class its own noise level
    shared = level * rng.standard_t(tails, (n_seeds, C)) * 0.6
    def run(extra):
        return truth + extra + shared + level * rng.standard_t(tails, (n_seeds, C)) * 0.8
    return classes_frame({"vanilla": run(0.0), "kd": run(shift + (0 if effect is None else effect))})


def discrete_world(rng, n_seeds, shift=6.5, effect=None, images=20):
    """Class accuracies as the book measures them: a count of right answers out of ``images`` test images
    per class (steps of 100 / images points), around a per-class truth that each seed's training moves."""
    truth = rng.uniform(0.25, 0.9, C)
    train = rng.normal(0, 0.06, (n_seeds, C))
    def run(extra):
        p = np.clip(truth + extra + train + rng.normal(0, 0.04, (n_seeds, C)), 0, 1)
        return 100 * rng.binomial(images, p) / images
    return classes_frame({"vanilla": run(0.0), "kd": run(shift / 100 + (0 if effect is None else effect / 100))})


@pytest.mark.parametrize("n_seeds", [2, 4])
def test_class_rule_is_not_fooled_by_a_shift_on_a_coarse_grid(n_seeds):
    """Class accuracies move in steps of 5 points (20 test images): a median would centre a +6.5 shift at
    5 or 10 and the leftover would pass for class-specific gains; the trimmed mean does not."""
    rng = np.random.default_rng(40 + n_seeds)
    experiments = 400
    gains = losses = 0
    for _ in range(experiments):
        e = stats.class_effects(discrete_world(rng, n_seeds), "kd", "vanilla")
        gains += e.gains_beyond_noise
        losses += e.losses_beyond_noise
    assert gains <= binomial_upper(experiments, 0.025) and losses <= binomial_upper(experiments, 0.025)


@pytest.mark.parametrize("n_seeds", [2, 3, 4])
def test_class_rule_keeps_its_rate_under_pure_noise(n_seeds):
    """Heavy tails, per-class noise levels, shared seed noise and an average shift, no class-specific
    effect: gains and losses are each flagged at most at their 2.5 %."""
    rng = np.random.default_rng(100 + n_seeds)
    experiments = 400
    gains = losses = 0
    for _ in range(experiments):
        e = stats.class_effects(class_world(rng, n_seeds, shift=4.0), "kd", "vanilla")
        gains += e.gains_beyond_noise
        losses += e.losses_beyond_noise
    assert gains <= binomial_upper(experiments, 0.025) and losses <= binomial_upper(experiments, 0.025)


def test_class_rule_finds_class_specific_losses_and_ignores_a_uniform_shift():
    rng = np.random.default_rng(11)
    effect = np.zeros(C)
    effect[:12] = -40.0  # twelve classes lose a lot (and pull the mean: the median centre is not fooled)
    hit = stats.class_effects(class_world(rng, 4, effect=effect, shift=3.0), "kd", "vanilla")
    assert hit.losses_beyond_noise and not hit.gains_beyond_noise
    assert set(hit.top(12, "loss")["class_index"]) & set(range(12))
    assert "class-specific losses" in stats.verdict_classes(hit)
    uniform = stats.class_effects(class_world(rng, 3, shift=8.0), "kd", "vanilla")
    assert uniform.shift == pytest.approx(8.0, abs=2.0) and not uniform.beyond_noise
    assert "no class-specific effect" in stats.verdict_classes(uniform)
    one = stats.class_effects(class_world(rng, 1), "kd", "vanilla")
    assert not one.measured and "one seed" in stats.verdict_classes(one)


def test_class_effects_are_deterministic():
    frame = class_world(np.random.default_rng(3), 3)
    first, second = stats.class_effects(frame, "kd", "vanilla"), stats.class_effects(frame, "kd", "vanilla")
    assert (first.p_gains, first.p_losses, first.gains) == (second.p_gains, second.p_losses, second.gains)


# -- correlations ---------------------------------------------------------------------------------------------------
def correlated_world(rng, n_seeds, common_effect=0.0):
    """vanilla, kd and dkd; one seed's per-class noise is shared by all three methods (strongly)."""
    truth = rng.uniform(30, 90, C)
    seed_noise = rng.normal(0, 6, (n_seeds, C))
    shared_effect = common_effect * rng.normal(0, 1, C)
    frame = {"vanilla": truth + seed_noise + rng.normal(0, 3, (n_seeds, C))}
    for name in ("kd", "dkd"):
        frame[name] = truth + shared_effect + seed_noise + rng.normal(0, 3, (n_seeds, C))
    return classes_frame(frame)


def test_crossed_seeds_keep_the_correlation_test_at_five_percent():
    """Same-seed runs share per-class noise: deltas from the same seed correlate with no effect at all;
    crossed seeds (and the permutation test) keep 5 %."""
    rng = np.random.default_rng(21)
    experiments, alarms, naive = 200, 0, []
    for _ in range(experiments):
        res = stats.effect_correlation(correlated_world(rng, 4), "kd", "dkd", "vanilla", reps=199)
        alarms += res.distinguishable
        naive.append(res.naive)
    assert alarms <= binomial_upper(experiments, 0.05)
    assert np.mean(naive) > 0.3  # the artefact the crossing removes


def test_a_shared_class_effect_is_found():
    res = stats.effect_correlation(correlated_world(np.random.default_rng(4), 3, common_effect=10.0),
                                   "kd", "dkd", "vanilla")
    assert res.pairs == 1 and res.distinguishable and res.r > 0.3  # 3 seeds: one disjoint pair
    assert "positive beyond chance" in stats.verdict_correlation(res, "the two gains")
    one = stats.effect_correlation(correlated_world(np.random.default_rng(4), 1), "kd", "dkd", "vanilla")
    assert not one.drawn and "not drawn" in stats.verdict_correlation(one, "the two gains")


def test_correlation_with_a_fixed_vector():
    rng = np.random.default_rng(8)
    world = correlated_world(rng, 2)
    teacher = pd.Series(rng.uniform(50, 95, C))
    res = stats.effect_correlation(world, "kd", None, "vanilla", other=teacher)
    assert res.pairs == 1 and 0 < res.p <= 1


def test_effect_association_is_calibrated_against_the_null_twins():
    """Noisy classes are large in both the change and its twin: a covariate that tracks the noise level
    correlates with the size of the changes under pure noise, and the twin-swap null absorbs that."""
    rng = np.random.default_rng(31)
    experiments, alarms, raw = 300, 0, []
    for _ in range(experiments):
        frame = class_world(rng, 4, shift=2.0)
        effects = stats.class_effects(frame, "kd", "vanilla")
        noisy = frame[frame.label == "vanilla"].groupby("class_index")["acc"].std()  # tracks the noise level
        res = stats.effect_association(effects, noisy, reps=199)
        alarms += res.distinguishable
        raw.append(res.r)
    assert alarms <= binomial_upper(experiments, 0.05)
    assert np.mean(raw) > 0.1  # the naive reading of r would see an association that is only noise


def test_effect_association_finds_an_effect_that_grows_with_the_covariate():
    rng = np.random.default_rng(2)
    covariate = pd.Series(np.linspace(0, 1, C))
    effect = 30.0 * covariate.to_numpy() * np.where(np.arange(C) % 2, 1.0, -1.0)  # larger with x, either sign
    effects = stats.class_effects(class_world(rng, 4, effect=effect), "kd", "vanilla")
    res = stats.effect_association(effects, covariate)
    assert res.distinguishable and res.r > res.null_mean
    signed = stats.effect_association(effects, covariate, magnitude=False)
    assert not signed.distinguishable  # the signs cancel: a signed test misses an unsigned prediction


def test_matrix_correlation_is_a_mantel_test():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(C, 3))
    a = x @ x.T                                   # class similarity from hidden features
    b = a + rng.normal(0, 1.0, (C, C))
    assert stats.matrix_correlation(a, b, reps=199).distinguishable
    unrelated = np.random.default_rng(2).normal(size=(C, 3))
    assert not stats.matrix_correlation(a, unrelated @ unrelated.T, reps=199).distinguishable


def test_group_contrast_permutation():
    groups = np.repeat(np.arange(20), 5)
    rng = np.random.default_rng(0)
    noise = rng.normal(0, 1, (C, C))
    block = (groups[:, None] == groups[None, :]) * 1.0
    assert stats.group_contrast(noise + block, groups, reps=499)["p"] < 0.01
    assert stats.group_contrast(noise, groups, reps=499)["p"] > 0.01


# -- failed runs ----------------------------------------------------------------------------------------------------
def test_collapsed_runs_are_flagged_and_left_out():
    runs = runs_frame({"vanilla": [50.0, 51.0], "clkd": [1.2, 49.0]})
    flagged = stats.collapsed_runs(runs, num_classes=C)
    assert list(flagged["run"]) == ["/runs/clkd-s0"]
    sentence = stats.verdict_collapsed(flagged)
    assert "clkd seed 0" in sentence and "Left out" in sentence
    assert stats.verdict_collapsed(stats.collapsed_runs(runs.iloc[[0, 1, 3]], C)) == ""
    empty = pd.DataFrame(columns=["run"])
    tables = RunTables(runs, runs.copy(), runs.copy(), empty)
    kept = stats.drop_runs(tables, flagged)
    assert "/runs/clkd-s0" not in set(kept.runs["run"]) and len(kept.runs) == 3 and len(kept.epochs) == 3


def test_importing_stats_leaves_pandas_unimported():
    """A grading kernel imports kdlib.stats for a t quantile only: pandas (a second to import) waits for a
    function that makes a table."""
    import subprocess
    import sys

    code = "import sys; from kdlib import stats, exercises; stats.t_critical(3); print('pandas' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
