"""The training engine, its config and the teacher cache: on tiny synthetic runs of a few seconds."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from kdlib import engine, models, teachers
from kdlib.config import RunConfig, apply_overrides, make_config, parse_value, scaled_milestones
from kdlib.errors import KDLibError
from kdlib.methods import _REGISTRY, Method

from conftest import TINY

TIMING = {"epoch_seconds", "train_seconds", "images_per_second"}


def _history_without_timing(metrics):
    return [{k: v for k, v in row.items() if k not in TIMING} for row in metrics["history"]]


def _weights(run_dir):
    return torch.load(Path(run_dir) / engine.CHECKPOINT, weights_only=True)


def _assert_same_state(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.fixture(scope="module")
def reference(tiny_teachers_dir, tmp_path_factory):
    """An uninterrupted 4-epoch KD run with milestones [2, 3] (lr 0.05 -> 0.005 -> 0.0005)."""
    out = tmp_path_factory.mktemp("reference") / "run"
    cfg = make_config("smoke", **{**TINY, "epochs": 4, "milestones": [2, 3], "method": "kd",
                                  "teachers_dir": str(tiny_teachers_dir), "out": str(out)})
    return cfg, engine.train(cfg, progress=False, verbose=False)


# -- config ---------------------------------------------------------------------------------------
def test_profiles_and_protocol_defaults():
    paper = make_config("paper").resolved()
    assert (paper.dataset, paper.teacher, paper.student, paper.epochs) == ("cifar100", "resnet32x4", "resnet8x4", 240)
    assert paper.milestones == [150, 180, 210] and paper.lr == 0.05 and paper.batch_size == 64
    assert (paper.momentum, paper.weight_decay, paper.lr_decay) == (0.9, 5e-4, 0.1)
    assert make_config("paper", student="ShuffleV2").resolved().lr == 0.01
    assert make_config("paper", student="MobileNetV2").resolved().lr == 0.01
    smoke = make_config("smoke").resolved()
    # 6 epochs: 3.75, 4.5, 5.25 round half up to 4, 5, 5; the collision moves to 6, the last epoch, where it
    # would act on no epoch at all, so a 6-epoch student keeps two distinct decays
    assert scaled_milestones(6) == [4, 5]
    # the 4-epoch smoke student: 2.5, 3, 3.5 round half up to 3, 3, 4; the two 3s are one decay and 4, the
    # last epoch, would act on no epoch, so one decay remains
    assert smoke.epochs == 4 and smoke.milestones == scaled_milestones(4) == [3]
    assert smoke.teacher_milestones == scaled_milestones(20) == [13, 15, 18]  # 12.5 and 17.5 rounded half up
    course = make_config("course").resolved()
    assert course.milestones == [13, 15, 18]
    assert course.dataset == "cifar100" and course.train_per_class == 100
    # vanilla: no teacher, and the teacher recipe is not part of the run
    vanilla = make_config("smoke", method="vanilla").resolved()
    assert vanilla.teacher is None and vanilla.teacher_epochs is None


def test_config_roundtrip_and_identity():
    cfg = make_config("smoke", method="kd", seed=3, method_params={"temperature": 2.0})
    again = RunConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg
    assert again.identity() == cfg.identity()
    # execution fields do not change the run's identity; recipe fields do
    assert cfg.replace(device="cuda", eval_batch_size=7, out="x").identity() == cfg.identity()
    assert cfg.replace(seed=4).identity() != cfg.identity()
    # an explicit default equals the implicit one
    assert cfg.replace(lr=0.05).identity() == cfg.identity()
    with pytest.raises(KDLibError, match="unknown config field 'bogus'"):
        RunConfig.from_dict({**cfg.to_dict(), "bogus": 1})


def test_pair_defaults_apply_unless_user_sets_them():
    cfg = make_config("smoke", method="dkd", teacher="resnet56", student="resnet20")
    assert cfg.resolved().method_params["beta"] == 2.0  # DKD's per-pair beta
    assert make_config("smoke", method="dkd", teacher="resnet32x4", student="resnet8x4").resolved().method_params["beta"] == 8.0
    assert apply_overrides(cfg, ["beta=5"]).resolved().method_params["beta"] == 5
    assert make_config("smoke", method="kd").resolved().method_params == {"temperature": 4.0, "ce_weight": 0.1,
                                                                          "kd_weight": 0.9, "standardize": False}


@pytest.mark.parametrize("overrides, message", [
    (dict(method="bogus"), "unknown method 'bogus'; valid methods: .*kd"),
    (dict(student="resnet7"), "unknown student architecture 'resnet7'; valid architectures: resnet8"),
    (dict(teacher="nope"), "unknown teacher architecture 'nope'"),
    (dict(dataset="mnist"), "unknown dataset 'mnist'; valid datasets: cifar100, synthetic"),
    (dict(epochs=-1), "epochs must be >= 1"),
    (dict(epochs=2.5), "epochs must be an integer"),
    (dict(lr=0), "lr must be > 0"),
    (dict(milestones=[5, 2]), "increasing"),
    (dict(amp="fp8"), "amp must be one of"),
    (dict(method_params={"temperature": -1}), "temperature must be > 0"),
    (dict(method_params={"beta": 1}), "has no hyperparameter 'beta'"),
    (dict(teacher_checkpoint="/no/such/file.pth"), "does not exist"),
])
def test_config_errors(overrides, message):
    with pytest.raises(KDLibError, match=message):
        make_config("smoke", **overrides)


def test_unknown_profile():
    with pytest.raises(KDLibError, match="unknown profile 'fast'; valid profiles: course, paper, smoke"):
        make_config("fast")


def test_set_overrides():
    cfg = apply_overrides(make_config("smoke"), ["lr=0.1", "weight_decay=5e-4", "milestones=[3, 4]",
                                                "temperature=2", "channels_last=false", "data_root=null"])
    assert cfg.lr == 0.1 and cfg.weight_decay == 5e-4 and cfg.milestones == [3, 4]
    assert cfg.method_params == {"temperature": 2} and cfg.channels_last is False and cfg.data_root is None
    assert parse_value("resnet8") == "resnet8" and parse_value("true") is True and parse_value("1e-3") == 0.001
    with pytest.raises(KDLibError, match="expects key=value"):
        apply_overrides(make_config("smoke"), ["lr"])
    with pytest.raises(KDLibError, match="unknown --set key 'betta'; valid keys: .*epochs.*temperature"):
        apply_overrides(make_config("smoke"), ["betta=1"])
    with pytest.raises(KDLibError, match="epochs must be an integer"):
        apply_overrides(make_config("smoke"), ["epochs=ten"])


def test_lr_at_matches_mdistiller():
    # epochs from 1; the decay applies from the epoch after each milestone
    lrs = [engine.lr_at(e, 0.05, [150, 180, 210], 0.1) for e in (1, 150, 151, 180, 181, 210, 211, 240)]
    assert lrs == pytest.approx([0.05, 0.05, 0.005, 0.005, 0.0005, 0.0005, 0.00005, 0.00005])


# -- the engine -----------------------------------------------------------------------------------
def test_vanilla_learns_on_synthetic(tmp_path):
    cfg = make_config("smoke", method="vanilla", student="resnet8", train_per_class=10, test_per_class=5,
                      epochs=4, lr=0.1, milestones=[3], device="cpu", out=str(tmp_path / "run"))
    metrics = engine.train(cfg, progress=False, verbose=False)
    assert metrics["config"]["teacher"] is None
    assert metrics["history"][-1]["train_loss"] < metrics["history"][0]["train_loss"]
    assert metrics["final"]["best_test_acc"] > 8.0  # chance is 1 %


def test_metrics_schema_and_consistency(reference):
    cfg, metrics = reference
    out = Path(cfg.out)
    on_disk = json.loads((out / engine.METRICS).read_text())
    assert on_disk == json.loads(json.dumps(metrics))
    assert metrics["status"] == "finished"
    config = metrics["config"]
    assert config["run"]["method"] == "kd" and config["run"]["milestones"] == [2, 3]
    assert config["method"]["hparams"] == {"temperature": 4.0, "ce_weight": 0.1, "kd_weight": 0.9,
                                           "standardize": False}
    assert {"torch", "kdlib", "python"} <= set(config["versions"])
    assert "git_commit" in config
    segment = metrics["segments"][-1]  # what the last bits depend on: threads, precision, CPU and its ISA
    assert segment["threads"] == torch.get_num_threads() and segment["amp"] in ("none", "bf16")
    assert segment["machine"] == engine.machine_info()
    assert config["dataset"]["num_classes"] == 100 and len(config["dataset"]["class_names"]) == 100
    assert config["dataset"]["description"].startswith("synthetic")
    teacher = config["teacher"]
    assert teacher["arch"] == "resnet8" and 0 <= teacher["test_acc"] <= 100 and Path(teacher["checkpoint"]).is_file()
    assert len(teacher["per_class_acc"]) == 100

    history = metrics["history"]
    assert [row["epoch"] for row in history] == [1, 2, 3, 4]
    assert [row["lr"] for row in history] == pytest.approx([0.05, 0.05, 0.005, 0.0005])
    for row in history:
        assert {"train_loss", "loss_ce", "loss_kd", "train_acc", "test_acc", "test_acc5", "test_loss",
                "per_class_acc", "epoch_seconds", "images_per_second", "method"} <= set(row)
        assert row["train_loss"] == pytest.approx(row["loss_ce"] + row["loss_kd"], rel=1e-5)
        assert len(row["per_class_acc"]) == 100
        assert row["test_acc"] <= row["test_acc5"] and row["images_per_second"] > 0
        assert row["test_acc"] == pytest.approx(np.mean(row["per_class_acc"]))  # balanced test set

    final = metrics["final"]
    accs = [row["test_acc"] for row in history]
    assert final["test_acc"] == history[-1]["test_acc"] and final["best_test_acc"] == max(accs)
    assert final["best_epoch"] == 1 + accs.index(max(accs))
    confusion = np.load(out / final["confusion"])
    assert confusion.shape == (100, 100) and confusion.dtype == np.int64
    assert (confusion.sum(axis=1) == TINY["test_per_class"]).all()
    assert np.allclose(100 * np.diag(confusion) / confusion.sum(axis=1), final["per_class_acc"])
    assert 100 * np.trace(confusion) / confusion.sum() == pytest.approx(final["test_acc"])
    student = torch.load(out / engine.STUDENT, weights_only=True)
    _assert_same_state(student["model"], _weights(out)["student"])
    assert not list(out.glob(".*.tmp"))


def test_checkpoint_contents(reference):
    cfg, _ = reference
    ckpt = engine.read_checkpoint(Path(cfg.out) / engine.CHECKPOINT)
    assert ckpt["epoch"] == 4 and len(ckpt["history"]) == 4
    assert {"python", "numpy", "torch"} <= set(ckpt["rng"])
    assert ckpt["optimizer"]["param_groups"][0]["lr"] == pytest.approx(0.0005)
    assert ckpt["optimizer"]["param_groups"][0]["nesterov"] is False


def test_same_seed_is_deterministic_other_seed_differs(reference, tiny_config, tmp_path):
    cfg, metrics = reference
    again = engine.train(cfg.replace(out=str(tmp_path / "again")), progress=False, verbose=False)
    assert _history_without_timing(again) == _history_without_timing(metrics)
    _assert_same_state(_weights(tmp_path / "again")["student"], _weights(cfg.out)["student"])
    other = engine.train(cfg.replace(out=str(tmp_path / "other"), seed=1, epochs=1, milestones=[2, 3]),
                         progress=False, verbose=False)
    assert other["history"][0]["train_loss"] != metrics["history"][0]["train_loss"]


def test_resume_is_bit_identical(reference, tmp_path):
    cfg, metrics = reference
    cfg = cfg.replace(out=str(tmp_path / "resumed"))
    paused = engine.train(cfg, progress=False, verbose=False, stop_after_epoch=2)
    assert paused["status"] == "paused" and len(paused["history"]) == 2 and paused["final"] is None
    assert engine.read_checkpoint(tmp_path / "resumed" / engine.CHECKPOINT)["epoch"] == 2
    resumed = engine.train(cfg, progress=False, verbose=False)
    assert resumed["status"] == "finished"
    assert _history_without_timing(resumed) == _history_without_timing(metrics)
    assert {k: v for k, v in resumed["final"].items() if k != "wall_seconds"} == \
           {k: v for k, v in metrics["final"].items() if k != "wall_seconds"}
    a, b = _weights(tmp_path / "resumed"), _weights(reference[0].out)
    _assert_same_state(a["student"], b["student"])
    for pa, pb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert torch.equal(pa["momentum_buffer"], pb["momentum_buffer"])
    assert len(resumed["segments"]) == 2 and resumed["segments"][1]["start_epoch"] == 3


def test_finished_run_is_not_rerun(reference, capsys):
    cfg, metrics = reference
    out = Path(cfg.out)
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    again = engine.train(cfg.replace(eval_batch_size=7), progress=False)  # execution fields may differ
    assert "already finished" in capsys.readouterr().out
    assert again == json.loads((out / engine.METRICS).read_text())
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before


@pytest.mark.parametrize("change", [dict(seed=1), dict(epochs=5), dict(method_params={"temperature": 2.0})])
def test_different_config_in_same_out_is_refused(reference, change):
    cfg, _ = reference
    key = next(iter(change)) if "method_params" not in change else "method_params"
    with pytest.raises(KDLibError, match=f"holds a different run.*{key}"):
        engine.train(cfg.replace(**change), progress=False, verbose=False)


def test_different_config_refused_for_unfinished_run(tiny_config):
    cfg = tiny_config()
    engine.train(cfg, progress=False, verbose=False, stop_after_epoch=1)
    with pytest.raises(KDLibError, match="different run.*lr"):
        engine.train(cfg.replace(lr=0.2), progress=False, verbose=False)


def test_corrupt_checkpoint_is_a_clear_error(tiny_config):
    cfg = tiny_config()
    engine.train(cfg, progress=False, verbose=False, stop_after_epoch=1)
    (Path(cfg.out) / engine.CHECKPOINT).write_bytes(b"not a checkpoint")
    with pytest.raises(KDLibError, match="corrupt or unreadable.*delete the run directory"):
        engine.train(cfg, progress=False, verbose=False)


def test_metrics_write_is_atomic(tiny_config, monkeypatch):
    import kdlib.io

    cfg = tiny_config()
    engine.train(cfg, progress=False, verbose=False, stop_after_epoch=1)
    path = Path(cfg.out) / engine.METRICS
    before = path.read_text()
    real_dump = json.dump

    def failing_dump(obj, f, **kwargs):
        f.write(json.dumps(obj)[:100])  # half a file, then the disk "fills up"
        raise OSError("No space left on device")

    monkeypatch.setattr(kdlib.io.json, "dump", failing_dump)
    with pytest.raises(OSError, match="No space left"):
        engine.train(cfg, progress=False, verbose=False)
    monkeypatch.setattr(kdlib.io.json, "dump", real_dump)
    assert path.read_text() == before
    assert json.loads(before)["history"][0]["epoch"] == 1
    assert not [p.name for p in Path(cfg.out).iterdir() if p.name.endswith(".tmp")]


def test_teacher_stays_frozen(tiny_config, monkeypatch):
    captured = {}
    real = teachers.get_teacher

    def spy(config, dataset, device, **kwargs):
        model, info = real(config, dataset, device, **kwargs)
        captured["model"] = model
        captured["before"] = {k: v.clone() for k, v in model.state_dict().items()}
        return model, info

    monkeypatch.setattr(teachers, "get_teacher", spy)
    metrics = engine.train(tiny_config(), progress=False, verbose=False)
    model = captured["model"]
    assert not model.training
    assert not any(p.requires_grad for p in model.parameters())
    _assert_same_state(model.state_dict(), captured["before"])  # weights and BN running statistics
    assert metrics["config"]["teacher"]["source"] == "cache"


def test_teacher_cache_key_and_community_format(tiny_teachers_dir):
    cfg = make_config("smoke", method="kd", teachers_dir=str(tiny_teachers_dir), **TINY)
    path = teachers.teacher_path(cfg)
    assert path.is_file() and path.parent == Path(tiny_teachers_dir)
    assert path.name.startswith("resnet8-synthetic-4pc")
    saved = torch.load(path, weights_only=True)
    assert set(saved["model"]) == set(models.create("resnet8").state_dict())
    assert (path.with_suffix("") / engine.METRICS).is_file()  # the teacher's own training record
    # another teacher recipe is another teacher
    assert teachers.teacher_path(cfg.replace(teacher_epochs=3)) != path
    assert teachers.teacher_path(cfg.replace(seed=5)) == path  # student seeds share one teacher


def test_teacher_checkpoint_option(tiny_config, tiny_teachers_dir, tmp_path):
    cfg0 = tiny_config()
    path = teachers.teacher_path(cfg0)
    cfg = tiny_config(teacher_checkpoint=str(path), teachers_dir=str(tmp_path / "empty"))
    metrics = engine.train(cfg, progress=False, verbose=False)
    assert metrics["config"]["teacher"]["source"] == "checkpoint"
    assert Path(metrics["config"]["teacher"]["checkpoint"]).resolve() == path.resolve()
    assert not (tmp_path / "empty").exists()  # nothing was trained


class _Probe(Method):
    """A method with every hook: a trainable scale, per-epoch facts, artifacts; NaN on request."""

    name = "probe"
    defaults = {"nan_at": None}

    def __init__(self, **hp):
        super().__init__(**hp)
        self.scale = torch.nn.Parameter(torch.ones(()))
        self.seen = 0
        self.setup_calls = 0

    def setup(self, ctx):
        self.setup_calls += 1
        logits = ctx.predict(ctx.teacher, ctx.train_images[:10])
        assert logits.shape == (10, ctx.num_classes) and logits.dtype == torch.float32
        return {"setup_checked": True}

    def forward(self, student_logits, teacher_logits, targets, ctx):
        assert student_logits.dtype == torch.float32 and teacher_logits.dtype == torch.float32
        assert ctx.indices.shape == targets.shape
        self.seen += targets.shape[0]
        loss = torch.nn.functional.cross_entropy(student_logits * self.scale, targets)
        if self.hparams["nan_at"] == [ctx.epoch, ctx.step]:
            loss = loss * float("nan")
        return {"loss_ce": loss, "loss_zero": 0.0 * self.scale}

    def end_epoch(self, epoch):
        return {"seen": self.seen, "scale": float(self.scale.detach())}

    def artifacts(self):
        return {"scale": self.scale.detach().reshape(1)}


@pytest.fixture
def probe(monkeypatch):
    monkeypatch.setitem(_REGISTRY, "probe", _Probe)
    return _Probe


def test_method_hooks(probe, tiny_config):
    metrics = engine.train(tiny_config(method="probe"), progress=False, verbose=False)
    out = Path(metrics["config"]["run"]["out"])
    assert metrics["config"]["method"]["setup"] == {"setup_checked": True}
    assert [row["method"]["seen"] for row in metrics["history"]] == [400, 800]
    assert metrics["history"][-1]["loss_zero"] == 0.0
    artifacts = np.load(out / engine.ARTIFACTS)
    assert artifacts["scale"][0] == pytest.approx(metrics["history"][-1]["method"]["scale"])
    assert artifacts["scale"][0] != 1.0  # the method's parameter is trained by the optimiser
    ckpt = engine.read_checkpoint(out / engine.CHECKPOINT)
    assert torch.equal(ckpt["method"]["scale"], torch.tensor(float(artifacts["scale"][0])))
    assert metrics["final"]["method_artifacts"] == engine.ARTIFACTS


def test_nan_loss_stops_with_epoch_and_step(probe, tiny_config):
    cfg = tiny_config(method="probe", method_params={"nan_at": [2, 3]})
    with pytest.raises(KDLibError, match="non-finite loss.*epoch 2, step 3"):
        engine.train(cfg, progress=False, verbose=False)
    out = Path(cfg.out)
    assert engine.read_checkpoint(out / engine.CHECKPOINT)["epoch"] == 1  # last good epoch kept
    metrics = json.loads((out / engine.METRICS).read_text())
    assert metrics["status"] == "failed" and len(metrics["history"]) == 1


def test_unwritable_out_is_a_clear_error(tiny_config, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(KDLibError, match="cannot write to the run directory"):
        engine.train(tiny_config(out=str(blocker / "run")), progress=False, verbose=False)


def test_missing_out_is_an_error(tiny_config):
    with pytest.raises(KDLibError, match="output directory"):
        engine.train(tiny_config(out=None), progress=False, verbose=False)


def test_evaluate_counts(tiny_teachers_dir):
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 4))
    images = torch.randint(0, 256, (10, 3, 32, 32), dtype=torch.uint8)
    labels = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3, 0, 1])
    result = engine.evaluate(model, images, labels, 4, batch_size=3)
    logits = engine.predict(model, images, batch_size=4)
    pred = logits.argmax(1)
    assert result["test_acc"] == pytest.approx(100 * (pred == labels).float().mean().item())
    assert result["test_loss"] == pytest.approx(torch.nn.functional.cross_entropy(logits, labels).item(), rel=1e-5)
    assert result["test_acc5"] == 100.0  # 4 classes: top-4 always holds the label
    assert result["confusion"].sum() == 10 and (result["confusion"].sum(1) == [3, 3, 2, 2]).all()
    assert math.isclose(sum(result["per_class_acc"][c] * [3, 3, 2, 2][c] for c in range(4)) / 10,
                        result["test_acc"])


def test_scaled_schedule_decays_one_step_at_a_time():
    """Scaled milestones are distinct decays: no epoch trains more than one decay below the epoch before
    (the old rounding gave the smoke student [4, 5, 5], a 100x drop in one epoch)."""
    from kdlib.engine import lr_at

    assert scaled_milestones(240) == [150, 180, 210]
    for epochs in [1, 2, 3, 5, 6, 7, 8, 10, 15, 20, 30, 100, 240]:
        ms = scaled_milestones(epochs)
        assert ms == sorted(set(ms)) and all(1 <= m < epochs for m in ms), (epochs, ms)
        lrs = [lr_at(e, 0.05, ms, 0.1) for e in range(1, epochs + 1)]
        for before, after in zip(lrs, lrs[1:]):
            assert after == pytest.approx(before) or after == pytest.approx(before * 0.1), (epochs, lrs)
        # every milestone acts on a later epoch
        assert sum(1 for a, b in zip(lrs, lrs[1:]) if b < a) == len(ms)
        # the full-rate phase keeps the recipe's proportion (150/240) to within one epoch
        if ms:
            assert abs(ms[0] - 150 * epochs / 240) <= 1, (epochs, ms)
    smoke = make_config("smoke").resolved()
    lrs = [lr_at(e, smoke.lr, smoke.milestones, smoke.lr_decay) for e in range(1, smoke.epochs + 1)]
    assert lrs == pytest.approx([0.05, 0.05, 0.05, 0.005])  # decays after epoch 3 of 4
    lrs6 = [lr_at(e, 0.05, scaled_milestones(6), 0.1) for e in range(1, 7)]
    assert lrs6 == pytest.approx([0.05, 0.05, 0.05, 0.05, 0.005, 0.0005])
