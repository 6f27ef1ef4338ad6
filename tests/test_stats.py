"""kdlib.stats: the verdicts on synthetic records whose answer is known (a clear gain, a clear loss, pure noise)."""
import math

import numpy as np
import pandas as pd
import pytest

from kdlib import stats
from kdlib.records import RunTables

C = 100


def runs_frame(values):
    """``{label: [acc per seed]}`` -> a runs frame (seed i = position i)."""
    rows = [{"label": label, "run": f"{label}-{s}", "method": label.split()[0], "seed": s, "last_test_acc": v,
             "status": "finished"} for label, accs in values.items() for s, v in enumerate(accs)]
    return pd.DataFrame(rows)


def classes_frame(per_class):
    """``{label: array (seeds, C)}`` -> a classes frame."""
    rows = []
    for label, m in per_class.items():
        for s, accs in enumerate(m):
            for c, a in enumerate(accs):
                rows.append({"label": label, "run": f"{label}-{s}", "seed": s, "class_index": c,
                             "class_name": f"class{c}", "acc": float(a)})
    return pd.DataFrame(rows)


def test_paired_difference_by_hand():
    runs = runs_frame({"vanilla": [50.0, 52.0], "kd": [55.0, 56.0]})
    d = stats.paired_difference(runs, "kd", "vanilla")
    # paired diffs 5 and 4; pooled single-run variance: (0.5^2 + 0.5^2 + 1 + 1) / (1 + 1) = 1.25
    sigma = math.sqrt(((50 - 51) ** 2 + (52 - 51) ** 2 + (55 - 55.5) ** 2 + (56 - 55.5) ** 2) / 2)
    assert d.n == 2 and d.diff == pytest.approx(4.5) and d.how == "pooled"
    assert d.sigma == pytest.approx(sigma) and d.se == pytest.approx(sigma * math.sqrt(2 / 2))
    # three pairs: the paired differences' own spread
    runs3 = runs_frame({"vanilla": [50.0, 52.0, 51.0], "kd": [55.0, 56.0, 57.0]})
    d3 = stats.paired_difference(runs3, "kd", "vanilla")
    diffs = np.array([5.0, 4.0, 6.0])
    assert d3.how == "paired" and d3.se == pytest.approx(diffs.std(ddof=1) / math.sqrt(3))


def test_verdicts_gain_loss_and_noise():
    base = np.array([50.0, 51.0, 49.5])
    # paired differences with a known answer: +5 with a little spread, -5, and mean ~0 with a spread of ~0.7
    runs = runs_frame({"vanilla": list(base), "gain": list(base + [5.2, 4.7, 5.1]),
                       "loss": list(base - [5.2, 4.7, 5.1]), "noise": list(base + [0.8, -0.5, -0.2])})
    table = stats.compare(runs, "vanilla").set_index("label")
    assert table.loc["gain", "sign"] == 1 and table.loc["loss", "sign"] == -1 and table.loc["noise", "sign"] == 0
    assert "gain is above vanilla by +" in table.loc["gain", "verdict"]
    assert "distinguishable from seed noise in this setting" in table.loc["gain", "verdict"]
    assert "loss is below vanilla by -" in table.loc["loss", "verdict"]
    assert "not distinguishable from seed noise in this setting" in table.loc["noise", "verdict"]
    assert "above" not in table.loc["noise", "verdict"] and "below" not in table.loc["noise", "verdict"]
    # the sentences are plain text: no Markdown for a glued {glue:text}
    assert not any(ch in v for v in table["verdict"] for ch in "*`_")


def test_one_seed_is_not_a_finding():
    d = stats.paired_difference(runs_frame({"vanilla": [50.0], "kd": [60.0]}), "kd", "vanilla")
    assert d.how == "none" and not d.distinguishable
    assert "not a finding" in stats.verdict_difference(d)


def test_collapsed_runs_are_flagged_and_left_out():
    runs = runs_frame({"vanilla": [50.0, 51.0], "clkd": [1.2, 49.0]})
    flagged = stats.collapsed_runs(runs, num_classes=C)
    assert list(flagged["run"]) == ["clkd-0"]
    sentence = stats.verdict_collapsed(flagged)
    assert "clkd seed 0" in sentence and "Left out" in sentence
    assert stats.verdict_collapsed(stats.collapsed_runs(runs.iloc[[0, 1, 3]], C)) == ""
    empty = pd.DataFrame(columns=["run"])
    tables = RunTables(runs, runs.copy(), runs.copy(), empty)
    kept = stats.drop_runs(tables, flagged)
    assert "clkd-0" not in set(kept.runs["run"]) and len(kept.runs) == 3 and len(kept.epochs) == 3


def per_class_setting(effect, seeds=2, noise=8.0, seed=0):
    rng = np.random.default_rng(seed)
    truth = rng.uniform(30, 80, C)
    vanilla = truth + rng.normal(0, noise, (seeds, C))
    method = truth + effect + rng.normal(0, noise, (seeds, C))
    return classes_frame({"vanilla": vanilla, "kd": method})


def test_class_claims_gain_and_noise():
    shift = np.zeros(C)
    shift[:30] = 40.0  # 30 classes gain far beyond the noise
    clear = stats.class_claims(per_class_setting(shift), "kd", "vanilla")
    assert clear.beyond_noise and clear.up >= 25 and clear.down <= 3
    assert clear.sigma_class == pytest.approx(8.0, rel=0.25)
    assert "classes gain" in stats.verdict_classes(clear)
    noise = stats.class_claims(per_class_setting(np.zeros(C), seed=1), "kd", "vanilla")
    assert not noise.beyond_noise and noise.up + noise.down <= 12
    sentence = stats.verdict_classes(noise)
    assert "not distinguishable from seed noise" in sentence and "no class can be said" in sentence


def test_shared_baseline_correlation_is_removed():
    """Two methods that change nothing: against one shared baseline their per-class deltas correlate
    (about 0.5, the baseline's noise); against different baseline seeds they do not."""
    rng = np.random.default_rng(3)
    truth = rng.uniform(30, 80, C)
    frame = classes_frame({name: truth + rng.normal(0, 8, (2, C)) for name in ("vanilla", "kd", "dkd")})
    res = stats.delta_correlation(frame, "kd", "dkd", "vanilla")
    assert res["drawn"] and res["naive"] > 0.3
    assert abs(res["r"]) < res["threshold"]
    assert "no association is distinguishable from noise" in stats.verdict_correlation(res, "the two gains")
    one_seed = frame[frame["seed"] == 0]
    res1 = stats.delta_correlation(one_seed, "kd", "dkd", "vanilla")
    assert not res1["drawn"] and "not drawn" in stats.verdict_correlation(res1, "the two gains")
    # a real shared structure survives: both methods gain on the same 40 classes
    shift = np.zeros(C)
    shift[:40] = 30
    frame2 = classes_frame({"vanilla": truth + rng.normal(0, 8, (2, C)), "kd": truth + shift + rng.normal(0, 8, (2, C)),
                            "dkd": truth + shift + rng.normal(0, 8, (2, C))})
    res2 = stats.delta_correlation(frame2, "kd", "dkd", "vanilla")
    assert res2["r"] > res2["threshold"] and "positive" in stats.verdict_correlation(res2, "the two gains")
