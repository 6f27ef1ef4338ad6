"""kdlib.experiments (the chapters' entry to training) and kdlib.plots (the book's figures).

Deterministic run directories, reuse of finished runs, labels and the class tables are checked on tiny
runs (resnet8 -> resnet8, 4 training / 2 test images per class, one epoch) and on hand-made tables whose
values are known.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from matplotlib.figure import Figure

from kdlib import config as kconfig
from kdlib import experiments as ex
from kdlib import plots
from kdlib.errors import KDLibError
from kdlib.records import RunTables

TINY = dict(teacher="resnet8", student="resnet8", epochs=1, teacher_epochs=1, train_per_class=4,
            test_per_class=2, device="cpu")


def tiny_setting(**changes):
    values = {**TINY, **changes}
    return ex.Setting.from_parameters("smoke", seeds=values.pop("seeds", [0]), **values)


# -- settings and run directories ------------------------------------------------------------------
def test_setting_resolves_the_profile():
    s = ex.Setting.from_parameters("smoke")
    preset = kconfig.PROFILES["smoke"]
    assert (s.dataset, s.teacher, s.student) == (preset["dataset"], preset["teacher"], preset["student"])
    assert (s.epochs, s.teacher_epochs) == (preset["epochs"], preset["teacher_epochs"])
    assert s.seeds == (0,)
    t = tiny_setting(seeds=[3, 1])
    assert t.seeds == (3, 1) and t.epochs == 1 and t.train_per_class == 4
    assert dict(t.extra) == {"device": "cpu"}


def test_setting_refuses_unknown_names():
    with pytest.raises(KDLibError):
        ex.Setting.from_parameters("nonsense")
    with pytest.raises(KDLibError):
        ex.Setting.from_parameters("smoke", student="resnet9000")
    with pytest.raises(KDLibError):
        ex.Setting.from_parameters("smoke", not_a_field=1)
    with pytest.raises(KDLibError):
        tiny_setting().config("kd", 0, no_such_hyperparameter=1)


def test_run_dirs_are_deterministic_and_name_what_decides_the_numbers():
    s = tiny_setting()
    home = kconfig.kdlib_home()
    a = ex.run_dir(s, "kd", 0)
    assert a == ex.run_dir(tiny_setting(), "kd", 0)
    assert a.parent == home / "runs" / "smoke"
    assert a.name.startswith("kd-resnet8-resnet8-s0-")
    others = {ex.run_dir(s, "kd", 1), ex.run_dir(s, "kd", 0, temperature=2.0), ex.run_dir(s, "dkd", 0),
              ex.run_dir(tiny_setting(epochs=2), "kd", 0), ex.run_dir(tiny_setting(train_per_class=5), "kd", 0)}
    assert a not in others and len(others) == 5
    # a hyperparameter set to its default is the same run
    assert ex.run_dir(s, "kd", 0, temperature=4.0) == a
    # execution fields do not change the run
    assert ex.run_dir(tiny_setting(eval_batch_size=17), "kd", 0) == a
    # vanilla has no teacher: every chapter shares its runs, whatever the teacher
    assert ex.run_dir(s, "vanilla", 0) == ex.run_dir(tiny_setting(teacher="resnet14"), "vanilla", 0)
    assert ex.run_dir(s, "vanilla", 0).name.startswith("vanilla-resnet8-s0-")


def test_warmup_is_scaled_with_the_run_length():
    assert ex.scaled_warmup(240) == 20 and isinstance(ex.scaled_warmup(240), int)  # the paper's recipe, same identity
    assert ex.scaled_warmup(6) == 0.5  # a 6-epoch student: half an epoch, ramped per step
    assert ex.scaled_warmup(15) == 1.25
    assert ex.scaled_warmup(24) == 2 and isinstance(ex.scaled_warmup(24), int)
    assert ex.scaled_warmup(20) == pytest.approx(5 / 3, abs=1e-6)
    s = tiny_setting(epochs=30)
    assert s.config("dkd", 0).method_params["warmup"] == 2.5
    assert s.config("dkd", 0, warmup=7).method_params["warmup"] == 7
    assert "warmup" not in s.config("kd", 0).method_params


@pytest.mark.parametrize("method", ["dkd", "rekd", "aekt"])
def test_every_run_scales_the_warmup_not_only_the_books(method):
    """The command line and the sweeps build configs without the book's Setting: same scaled warm-up."""
    course = kconfig.make_config("course", method=method).resolved()
    assert course.epochs == 20 and course.method_params["warmup"] == pytest.approx(20 * 20 / 240, abs=1e-6)
    paper = kconfig.make_config("paper", method=method).resolved()
    assert paper.method_params["warmup"] == 20 and isinstance(paper.method_params["warmup"], int)
    chosen = kconfig.make_config("course", method=method, method_params={"warmup": 7}).resolved()
    assert chosen.method_params["warmup"] == 7  # what the user sets wins
    # the book's explicit value and the recipe's own are the same run (same identity, same directory)
    smoke = kconfig.make_config("smoke", method=method)
    assert smoke.identity_hash() == smoke.replace(
        method_params={"warmup": ex.scaled_warmup(smoke.epochs)}).identity_hash()


def test_label_names_dataset_profile_pair_and_seeds():
    s = tiny_setting(seeds=[0, 1])
    text = ex.label(s)
    assert ex.dataset(s).description in text
    assert "synthetic" in text and "smoke" in text
    assert "resnet8→resnet8" in text and "1 epoch " in text and "seeds 0, 1" in text
    assert text.endswith(ex.precision(s)) and ex.precision(s).startswith("students ")  # how they computed
    runs = pd.DataFrame({"method": ["vanilla", "kd"], "teacher": [None, "resnet20"],
                         "student": ["resnet8", "resnet8"], "seed": [0, 0], "profile": ["paper", "paper"],
                         "dataset": ["CIFAR-100 (50000 train / 10000 test)"] * 2, "epochs": [240, 240]})
    text = ex.label(runs)
    assert "CIFAR-100" in text and "paper" in text and "resnet20→resnet8" in text and "seed 0" in text
    assert "240 epochs" in text


# -- hand-made tables ------------------------------------------------------------------------------
def hand_made_tables(C=100, seeds=(0, 1)):
    """Three labels; class c of label L, seed s has accuracy base[c] + shift[L] + s (known deltas)."""
    rng = np.random.default_rng(0)
    base = rng.uniform(10, 80, C)
    shift = {"vanilla": 0.0, "KD": 2.0, "DKD": -1.0}
    flip = np.where(np.arange(C) % 3 == 0, -1.0, 1.0)  # KD: +2 on two thirds of the classes, -2 on a third
    runs, epochs, classes = [], [], []
    for label, sh in shift.items():
        for s in seeds:
            run = f"/runs/{label}-{s}"
            ident = dict(label=label, run=run, method=label.lower(), teacher=None if label == "vanilla" else "resnet20",
                         student="resnet8", seed=s, profile="smoke", dataset="synthetic (seed 0)")
            accs = base + (sh * flip if label == "KD" else sh) + s
            runs.append({**ident, "epochs": 3, "best_test_acc": accs.mean() + 1, "best_epoch": 2,
                         "last_test_acc": accs.mean(), "teacher_test_acc": 90.0})
            for e in (1, 2, 3):
                epochs.append({**ident, "epoch": e, "test_acc": accs.mean() - 3 + e, "lr": 0.05,
                               "epoch_seconds": 2.0 + (label != "vanilla"), "images_per_second": 500.0})
            for c in range(C):
                classes.append({**ident, "class_index": c, "class_name": f"c{c}", "superclass": f"s{c // 5}",
                                "superclass_index": c // 5, "acc": accs[c],
                                "teacher_acc": None if label == "vanilla" else 95.0 - c % 7})
    epoch_classes = pd.DataFrame(columns=["label", "run", "epoch", "class_index", "acc"])
    return RunTables(pd.DataFrame(runs), pd.DataFrame(epochs), pd.DataFrame(classes), epoch_classes), base, flip


def test_summaries_and_class_deltas_on_known_tables():
    tables, base, flip = hand_made_tables()
    summary = ex.summarize(tables)
    assert list(summary.index) == ["vanilla", "KD", "DKD"]
    assert (summary["n"] == 2).all()
    assert summary.loc["DKD", "last_mean"] == pytest.approx(base.mean() - 1 + 0.5)
    assert summary.loc["vanilla", "last_std"] == pytest.approx(np.std([0, 1], ddof=1))
    assert summary.loc["KD", "seconds_per_epoch"] == pytest.approx(3.0)

    delta = ex.class_delta(tables, "KD", "vanilla")
    assert len(delta) == 100 and list(delta["class_index"]) == list(range(100))
    np.testing.assert_allclose(delta["delta"], 2.0 * flip)
    np.testing.assert_allclose(delta["teacher_acc"], [95.0 - c % 7 for c in range(100)])
    counts = ex.helped_hurt(delta)
    assert counts == {"helped": int((flip > 0).sum()), "hurt": int((flip < 0).sum()), "unchanged": 0}
    assert ex.helped_hurt(ex.class_delta(tables, "vanilla", "vanilla"))["unchanged"] == 100
    with pytest.raises(KDLibError):
        ex.class_delta(tables, "nope", "vanilla")

    acc = ex.class_accuracy(tables)
    assert set(acc["label"]) == {"vanilla", "KD", "DKD"} and (acc["seeds"] == 2).all()
    assert ex.pm(71.234, 0.4) == "71.23 ± 0.40"
    assert ex.pm(71.234, float("nan")) == "71.23"


def test_tail_accuracy_and_within_between_on_known_values():
    tables, base, flip = hand_made_tables()
    tails = ex.tail_accuracy(tables, k=3)
    assert list(tails.index) == ["vanilla", "KD", "DKD"]
    v = np.sort(base)
    assert tails.loc["vanilla", "worst_mean"] == pytest.approx(v[0] + 0.5)  # seeds add 0 and 1
    assert tails.loc["vanilla", "bottom_k_mean"] == pytest.approx(v[:3].mean() + 0.5)
    assert tails.loc["DKD", "worst_std"] == pytest.approx(np.std([0, 1], ddof=1))

    groups = np.repeat(np.arange(3), 2)                      # classes 0,1 | 2,3 | 4,5
    m = np.full((6, 6), 1.0) + 9.0 * np.eye(6)               # the diagonal must not count
    m[groups[:, None] == groups[None, :]] += 2.0
    wb = ex.within_between(m, torch.as_tensor(groups))
    assert wb["within"] == pytest.approx(3.0) and wb["between"] == pytest.approx(1.0)
    assert (wb["n_within"], wb["n_between"]) == (6, 24)
    with pytest.raises(KDLibError):
        ex.within_between(np.ones((3, 3)), [0, 1])


def test_method_history_reads_list_facts(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    metrics = {"config": {"run": {"method": "cwkd", "teacher": "resnet20", "student": "resnet8", "seed": 3,
                                  "profile": "smoke", "epochs": 2}, "dataset": {"description": "d"}},
               "history": [{"epoch": 1, "test_acc": 1.0, "method": {"hard": []}},
                           {"epoch": 2, "test_acc": 2.0, "method": {"hard": [4, 9], "size": 2}}],
               "final": None}
    (run / "metrics.json").write_text(json.dumps(metrics))
    tables = ex.load(run)
    h = ex.method_history(tables, "hard")
    assert list(h["epoch"]) == [2, 2] and list(h["value"]) == [4, 9] and set(h["seed"]) == {3}
    assert list(h["label"]) == ["cwkd", "cwkd"]
    assert list(h["position"]) == [0, 1]
    assert list(ex.method_history(tables, "size")["value"]) == [2]
    assert ex.method_history(tables, "absent").empty
    with pytest.raises(KDLibError):  # not finished
        ex.method_artifacts(run)


def test_plot_functions_return_unregistered_figures():
    import matplotlib.pyplot as plt

    plt.close("all")
    tables, _, _ = hand_made_tables()
    acc = ex.class_accuracy(tables)
    deltas = pd.concat([ex.class_delta(tables, name, "vanilla") for name in ("KD", "DKD")])
    z = torch.randn(3, 100)
    data = ex.dataset(tiny_setting())
    figures = [
        plots.class_accuracy_curves(acc[acc.label == "KD"], title="t"),
        plots.class_accuracy_curves(acc[acc.label == "vanilla"], title="no teacher column"),
        plots.class_delta(ex.class_delta(tables, "KD", "vanilla"), title="t"),
        plots.class_heatmap(deltas, title="t"),
        plots.training_curves(tables.epochs, title="t"),
        plots.best_vs_last(tables.runs),
        plots.cost(ex.summarize(tables)),
        plots.gradient_check({"a": (z, z + 1e-9), "b": (z, z)}),
        plots.soft_targets(z, [1, 4], torch.tensor([0, 1, 2]), [f"c{i}" for i in range(100)]),
        plots.histogram(torch.rand(50), "x"),
        plots.histogram(pd.DataFrame({"x": np.arange(10.0), "g": ["a", "b"] * 5}), "x", hue="g"),
        plots.lr_schedule(tiny_setting(epochs=240).config("kd", 0), tables.epochs),
        plots.sample_grid(data, superclasses=[0, 1], title="t"),
        plots.binned(pd.DataFrame({"bin": [1, 2, 1, 2], "y": [1.0, 2, 3, 4], "h": ["a", "a", "b", "b"]}),
                     "bin", ["y"], hue="h"),
        plots.weights_vs_confidence(torch.rand(20), {"per image": torch.rand(20), "constant": 2.0}, logy=True),
        plots.class_matrices({"a": torch.randn(100, 100), "b": np.eye(100)}, data.class_to_superclass),
        plots.class_sets(pd.DataFrame({"epoch": [1, 1, 2], "value": [3, 7, 7]}), data.class_to_superclass,
                         class_names=data.class_names, highlight=[9]),
    ]
    for fig in figures:
        assert isinstance(fig, Figure)
        fig.canvas.draw()  # renders without error
    assert plt.get_fignums() == []  # nothing registered with pyplot: no double display in notebooks
    assert figures[0]._suptitle.get_text() == "t"


# -- real tiny runs --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    home = tmp_path_factory.mktemp("experiments_home")
    mp = pytest.MonkeyPatch()
    mp.setenv("KDLIB_HOME", str(home))
    s = tiny_setting()
    tables = ex.run_all(s, {"vanilla": "vanilla", "KD": ("kd", {}), "KD T=2": ("kd", {"temperature": 2.0})})
    yield s, tables, home
    mp.undo()


@pytest.mark.slow
def test_run_all_trains_into_the_named_directories(trained):
    s, tables, home = trained
    assert set(tables.runs["label"]) == {"vanilla", "KD", "KD T=2"}
    for frame in (tables.runs, tables.epochs, tables.classes, tables.epoch_classes):
        assert "label" in frame.columns and frame["label"].notna().all()
    expected = {str(ex.run_dir(s, "vanilla", 0)), str(ex.run_dir(s, "kd", 0)),
                str(ex.run_dir(s, "kd", 0, temperature=2.0))}
    assert set(tables.runs["run"]) == expected
    for run in expected:
        assert Path(run).is_relative_to(home / "runs" / "smoke")
        assert json.loads((Path(run) / "metrics.json").read_text())["status"] == "finished"
    assert len(tables.classes) == 3 * 100
    # the teacher was trained once, in the engine's cache, and its records are readable
    teacher = ex.teacher_records(s)
    assert teacher is not None and list(teacher.runs["label"]) == ["teacher"]
    assert Path(teacher.runs["run"][0]).is_relative_to(home / "teachers")


@pytest.mark.slow
def test_finished_runs_are_reused_not_retrained(trained, capsys):
    s, tables, _ = trained
    path = ex.run_dir(s, "kd", 0)
    before = (path / "metrics.json").stat().st_mtime_ns, (path / "checkpoint.pt").stat().st_mtime_ns
    assert ex.run(s, "kd", 0) == path
    assert capsys.readouterr() == ("", "")  # a reused run says nothing in a chapter's output
    after = (path / "metrics.json").stat().st_mtime_ns, (path / "checkpoint.pt").stat().st_mtime_ns
    assert before == after
    again = ex.run_all(s, {"KD": "kd", "same run, other label": ("kd", {"temperature": 4.0})})
    assert list(again.runs["label"]) == ["KD", "same run, other label"]
    assert again.runs["run"].nunique() == 1


@pytest.mark.slow
def test_load_labels_runs_by_method_and_differing_hyperparameters(trained):
    s, tables, home = trained
    loaded = ex.load(home / "runs")
    assert set(loaded.runs["label"]) == {"vanilla", "kd (temperature=2.0)", "kd (temperature=4.0)"}
    by_method = ex.load(home / "runs", label="method")
    assert set(by_method.runs["label"]) == {"vanilla", "kd"}
    only_kd = ex.select(loaded, lambda r: r.method == "kd")
    assert set(only_kd.classes["method"]) == {"kd"} and len(only_kd.runs) == 2
    with pytest.raises(KDLibError):
        ex.load(home / "no-such-folder")


@pytest.mark.slow
def test_models_for_the_analyses(trained):
    s, tables, _ = trained
    data = ex.dataset(s)
    teacher = ex.teacher_model(s)
    student = ex.student_model(ex.run_dir(s, "kd", 0))
    assert not any(p.requires_grad for p in teacher.parameters())
    zt, zs = ex.logits(teacher, data.test_images[:10]), ex.logits(student, data.test_images[:10])
    assert zt.shape == zs.shape == (10, 100) and zt.dtype == torch.float32
    # the saved student is the run's: its accuracy on the test set is the recorded last-epoch accuracy
    full = ex.logits(student, data.test_images)
    acc = 100.0 * (full.argmax(1) == data.test_labels).float().mean().item()
    recorded = tables.runs.set_index("label").loc["KD", "last_test_acc"]
    assert acc == pytest.approx(recorded)
    preds = ex.image_predictions(ex.select(tables, lambda r: r.label == "KD"), data.test_images,
                                 data.test_labels)
    assert len(preds) == len(data.test_labels) and set(preds["label"]) == {"KD"}
    assert 100.0 * preds["correct"].mean() == pytest.approx(recorded)
    assert ex.method_artifacts(ex.run_dir(s, "kd", 0)) == {}
