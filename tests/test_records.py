"""Run records: tidy tables over run directories, checked against the runs' own metrics files."""
from __future__ import annotations

import pandas as pd
import pytest

from kdlib import engine
from kdlib.config import make_config
from kdlib.errors import KDLibError
from kdlib.records import ID_COLUMNS, find_runs, load_runs, read_metrics

from conftest import TINY


@pytest.fixture(scope="module")
def runs_root(tiny_teachers_dir, tmp_path_factory):
    """Two finished KD runs (seeds 0 and 1, 2 epochs), one paused vanilla run (1 of 3 epochs)."""
    root = tmp_path_factory.mktemp("runs")
    base = {**TINY, "teachers_dir": str(tiny_teachers_dir)}
    for seed in (0, 1):
        engine.train(make_config("smoke", **{**base, "method": "kd", "seed": seed, "out": str(root / f"kd-s{seed}")}),
                     progress=False, verbose=False)
    engine.train(make_config("smoke", **{**base, "method": "vanilla", "epochs": 3, "out": str(root / "vanilla")}),
                 progress=False, verbose=False, stop_after_epoch=1)
    return root


def test_read_metrics(runs_root):
    m = read_metrics(runs_root / "kd-s0")
    assert m == read_metrics(runs_root / "kd-s0" / "metrics.json")
    assert m["final"]["epochs"] == 2
    with pytest.raises(KDLibError, match="not a run directory"):
        read_metrics(runs_root)


def test_find_runs_accepts_dirs_globs_and_parents(runs_root):
    assert len(find_runs(runs_root)) == 3
    assert len(find_runs(str(runs_root / "kd-*"))) == 2
    assert len(find_runs([runs_root / "kd-s0", runs_root / "kd-s0" / "metrics.json"])) == 1  # deduplicated


def test_runs_table(runs_root):
    tables = load_runs(runs_root)
    runs = tables.runs.set_index("run")
    assert len(runs) == 3 and list(tables.runs.columns[:len(ID_COLUMNS)]) == ID_COLUMNS
    kd0 = runs.loc[str(runs_root / "kd-s0")]
    metrics = read_metrics(runs_root / "kd-s0")
    assert (kd0["method"], kd0["teacher"], kd0["student"], kd0["seed"], kd0["profile"]) == ("kd", "resnet8", "resnet8", 0, "smoke")
    assert kd0["status"] == "finished" and kd0["epochs"] == 2 and kd0["epochs_done"] == 2
    assert kd0["best_test_acc"] == metrics["final"]["best_test_acc"]
    assert kd0["last_test_acc"] == metrics["history"][-1]["test_acc"]
    assert kd0["teacher_test_acc"] == metrics["config"]["teacher"]["test_acc"]
    assert kd0["hp_temperature"] == 4.0 and kd0["hp_kd_weight"] == 0.9
    assert kd0["wall_seconds"] == pytest.approx(sum(r["epoch_seconds"] for r in metrics["history"]))
    assert kd0["dataset"] == metrics["config"]["dataset"]["description"]
    van = runs.loc[str(runs_root / "vanilla")]
    assert van["status"] == "paused" and van["epochs"] == 3 and van["epochs_done"] == 1
    assert pd.isna(van["teacher"])  # no teacher
    assert van["best_test_acc"] == read_metrics(runs_root / "vanilla")["history"][0]["test_acc"]


def test_epochs_table(runs_root):
    epochs = load_runs(runs_root).epochs
    assert len(epochs) == 2 + 2 + 1
    kd1 = epochs[epochs["run"] == str(runs_root / "kd-s1")].sort_values("epoch")
    history = read_metrics(runs_root / "kd-s1")["history"]
    assert list(kd1["epoch"]) == [1, 2]
    for column in ("lr", "train_loss", "loss_ce", "loss_kd", "train_acc", "test_acc", "test_acc5", "test_loss",
                   "epoch_seconds", "images_per_second"):
        assert list(kd1[column]) == [row[column] for row in history], column
    assert "per_class_acc" not in epochs.columns
    vanilla = epochs[epochs["method"] == "vanilla"]
    assert vanilla["loss_kd"].isna().all()  # a term the method does not have


def test_classes_tables(runs_root):
    tables = load_runs(runs_root)
    classes = tables.classes
    assert len(classes) == 2 * 100  # finished runs only: the final per-class accuracy
    metrics = read_metrics(runs_root / "kd-s0")
    dataset = metrics["config"]["dataset"]
    kd0 = classes[classes["run"] == str(runs_root / "kd-s0")].sort_values("class_index")
    assert list(kd0["acc"]) == metrics["final"]["per_class_acc"]
    assert list(kd0["class_name"]) == dataset["class_names"]
    assert list(kd0["superclass"]) == [dataset["superclass_names"][s] for s in dataset["class_to_superclass"]]
    assert list(kd0["teacher_acc"]) == metrics["config"]["teacher"]["per_class_acc"]
    # mean per-class accuracy of a balanced test set is the test accuracy
    assert kd0["acc"].mean() == pytest.approx(metrics["final"]["test_acc"])
    ec = tables.epoch_classes
    assert len(ec) == (2 + 2 + 1) * 100
    last = ec[(ec["run"] == str(runs_root / "kd-s0")) & (ec["epoch"] == 2)].sort_values("class_index")
    assert list(last["acc"]) == metrics["history"][-1]["per_class_acc"]


def test_empty_selection_gives_empty_tables(tmp_path):
    tables = load_runs(tmp_path)
    assert tables.runs.empty and tables.epochs.empty and list(tables.runs.columns) == ID_COLUMNS
