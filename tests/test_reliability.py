"""Faults a long run meets (SIGKILL, damaged files, bad input) through the command line, as a user
would meet them. The checklist of issue #8 and the test of each item is in ``CONTRIBUTING.md``."""
from __future__ import annotations

import json
import os
import random
import signal
import time
from pathlib import Path

import pytest
import torch

from kdlib import engine, models
from kdlib.config import make_config


def assert_one_error_line(result, message):
    assert result.returncode == 2, (result.returncode, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.stderr
    assert "Traceback" not in result.stderr


def no_run_started(out: Path) -> bool:
    return not (out / engine.METRICS).exists() and not (out / engine.CHECKPOINT).exists()


# -- bad input: one line, exit 2, nothing trained ---------------------------------------------------

@pytest.mark.parametrize("args, message", [
    (["--method", "rekd", "--set", "k=100"], "k must be < the number of classes (100), got 100"),
    (["--method", "cwkd", "--set", "num_hard=100"], "num_hard must be < the number of classes (100)"),
    (["--method", "dkd", "--set", "beta=-1"], "beta must be >= 0"),
    (["--method", "kd", "--set", "kd_weight=-0.5"], "kd_weight must be >= 0"),
    (["--method", "dlkd", "--set", "pruning_ratio=1"], "pruning_ratio must be in [0, 1)"),
    (["--method", "dlkd", "--set", "pruning_ratio=-0.1"], "pruning_ratio must be >= 0"),
    (["--method", "kd", "--set", "temperature=-2"], "temperature must be > 0"),
    (["--method", "kd", "--epochs", "0"], "epochs must be >= 1"),
])
def test_out_of_range_hyperparameters_are_refused_before_training(cli, tmp_path, args, message):
    out = tmp_path / "run"
    result = cli("train", *args, "--out", str(out), "--no-progress")
    assert_one_error_line(result, message)
    assert not out.exists()
    assert not (tmp_path / "home" / "teachers").exists()  # not even the teacher was trained


def _checkpoint_files(tmp_path):
    wrong_arch = tmp_path / "resnet8.pth"
    torch.save({"model": models.create("resnet8").state_dict()}, wrong_arch)
    garbage = tmp_path / "notes.pth"
    garbage.write_bytes(b"these are my notes, not a checkpoint\n" * 10)
    return wrong_arch, garbage


def test_teacher_checkpoint_of_the_wrong_architecture_or_no_checkpoint(cli, tmp_path):
    wrong_arch, garbage = _checkpoint_files(tmp_path)
    base = ["train", "--method", "kd", "--teacher", "resnet20", "--student", "resnet8", "--no-progress",
            "--set", "train_per_class=2", "--set", "test_per_class=2"]
    out = tmp_path / "a"
    result = cli(*base, "--teacher-checkpoint", str(wrong_arch), "--out", str(out))
    assert_one_error_line(result, "resnet20")
    assert str(wrong_arch) in result.stderr and no_run_started(out)
    out = tmp_path / "b"
    result = cli(*base, "--teacher-checkpoint", str(garbage), "--out", str(out))
    assert_one_error_line(result, "not a PyTorch checkpoint")
    assert no_run_started(out)


def _fake_cifar(root: Path, broken: str) -> None:
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    for name in ("train", "test", "meta"):
        (folder / name).write_bytes(b"\x80\x04garbage" if name == broken else b"")


def test_missing_or_corrupt_cifar100_names_the_download_command(cli, tmp_path):
    base = ["train", "--method", "vanilla", "--dataset", "cifar100", "--no-progress"]
    out = tmp_path / "a"
    result = cli(*base, "--data-root", str(tmp_path / "nothing"), "--out", str(out))
    assert_one_error_line(result, "download_cifar100.py")
    assert no_run_started(out)
    _fake_cifar(tmp_path / "data", broken="train")
    out = tmp_path / "b"
    result = cli(*base, "--data-root", str(tmp_path / "data"), "--out", str(out))
    assert_one_error_line(result, "cifar-100-python")
    assert "corrupt" in result.stderr or "truncated" in result.stderr or "empty" in result.stderr
    assert no_run_started(out)


def test_an_out_holding_another_configuration_is_refused_and_left_untouched(cli, tmp_path):
    out = tmp_path / "run"
    base = ["train", "--method", "vanilla", "--student", "resnet8", "--epochs", "1", "--out", str(out),
            "--no-progress", "--set", "train_per_class=2", "--set", "test_per_class=2"]
    assert cli(*base).returncode == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    result = cli(*base, "--set", "lr=0.2")
    assert_one_error_line(result, "holds a different run")
    assert "lr" in result.stderr
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


# -- a damaged checkpoint costs one epoch, never the run --------------------------------------------

def test_a_damaged_checkpoint_keeps_the_earlier_one_and_says_how_to_resume(tiny_config):
    cfg = tiny_config(method="vanilla", epochs=3)
    out = Path(cfg.out)
    engine.train(cfg, progress=False, verbose=False, stop_after_epoch=2)
    previous = out / engine.PREVIOUS_CHECKPOINT
    assert engine.read_checkpoint(previous)["epoch"] == 1
    kept = previous.read_bytes()
    (out / engine.CHECKPOINT).write_bytes(b"half a checkpoint")
    with pytest.raises(Exception, match=r"corrupt or unreadable.*resume from epoch 1.*mv .*checkpoint\.prev\.pt"):
        engine.train(cfg, progress=False, verbose=False)
    assert previous.read_bytes() == kept  # the error touched nothing
    os.replace(previous, out / engine.CHECKPOINT)  # what the message says to do
    resumed = engine.train(cfg, progress=False, verbose=False)
    straight = engine.train(cfg.replace(out=str(out.parent / "straight")), progress=False, verbose=False)
    assert _without_timing(resumed) == _without_timing(straight)
    assert not previous.exists()  # a finished run keeps one checkpoint


def test_a_damaged_checkpoint_without_an_earlier_one_is_still_a_clear_error(tiny_config):
    cfg = tiny_config(method="vanilla", epochs=2)
    engine.train(cfg, progress=False, verbose=False, stop_after_epoch=1)
    assert not (Path(cfg.out) / engine.PREVIOUS_CHECKPOINT).exists()
    (Path(cfg.out) / engine.CHECKPOINT).write_bytes(b"")
    with pytest.raises(Exception, match="corrupt or unreadable.*delete the run directory") as info:
        engine.train(cfg, progress=False, verbose=False)
    assert "resume from epoch" not in str(info.value)


# -- SIGKILL at any moment ----------------------------------------------------------------------------

_TIMING = {"epoch_seconds", "train_seconds", "images_per_second"}


def _without_timing(metrics):
    return [{k: v for k, v in row.items() if k not in _TIMING} for row in metrics["history"]]


def _wait_for(condition, proc, limit=240.0):
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline and proc.poll() is None and not condition():
        time.sleep(0.02)


def _epochs_done(out: Path) -> int:
    try:
        return len(json.loads((out / engine.METRICS).read_text())["history"])
    except (OSError, ValueError, KeyError):
        return -1


@pytest.mark.slow
def test_sigkill_at_any_moment_then_the_same_command_gives_the_uninterrupted_result(cli, tmp_path):
    """Kill -9 while the teacher trains, while the logit cache fills, mid-epoch and right after the
    last epoch; each time the same command continues, and the end result equals a straight run."""
    out, teachers_dir = tmp_path / "run", tmp_path / "teachers"
    epochs = 4
    args = ["train", "--method", "kd", "--teacher", "resnet8", "--student", "resnet8", "--epochs", str(epochs),
            "--out", str(out), "--teachers-dir", str(teachers_dir), "--device", "cpu", "--no-progress",
            "--set", "train_per_class=4", "--set", "test_per_class=2", "--set", "teacher_epochs=2"]
    jitter = random.Random(8)
    moments = [  # what must have happened before the kill (plus a random delay)
        lambda: True,                                                   # while starting up
        lambda: any(teachers_dir.rglob(engine.METRICS)),                # the teacher is training
        lambda: (out / engine.METRICS).exists(),                        # student run opened
        lambda: _epochs_done(out) >= 1,
        lambda: _epochs_done(out) >= 2,
        lambda: _epochs_done(out) >= epochs,                            # before or after `final`
    ]
    kills = 0
    for moment in moments:
        proc = cli.start(*args)
        try:
            _wait_for(moment, proc)
            time.sleep(jitter.uniform(0.0, 0.3))
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                kills += 1
            _, stderr = proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
        assert proc.returncode in (0, -signal.SIGKILL), stderr
        for name in (engine.METRICS, engine.CHECKPOINT):  # whatever exists is whole
            if (out / name).exists():
                engine.read_checkpoint(out / name) if name == engine.CHECKPOINT else json.loads(
                    (out / name).read_text())
    assert kills >= 3
    final = cli(*args)
    assert final.returncode == 0, final.stderr
    finished = json.loads((out / engine.METRICS).read_text())
    assert finished["status"] == "finished" and len(finished["history"]) == epochs

    cfg = make_config("smoke", method="kd", teacher="resnet8", student="resnet8", epochs=epochs, device="cpu",
                      train_per_class=4, test_per_class=2, teacher_epochs=2,
                      teachers_dir=str(tmp_path / "straight-teachers"), out=str(tmp_path / "straight"))
    straight = engine.train(cfg, progress=False, verbose=False)
    assert _without_timing(finished) == _without_timing(straight)
    assert finished["final"]["per_class_acc"] == straight["final"]["per_class_acc"]
    a = torch.load(out / engine.STUDENT, weights_only=True)["model"]
    b = torch.load(tmp_path / "straight" / engine.STUDENT, weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
