"""``python -m kdlib train``, run as a user would: errors are one ``error:`` line and exit code 2."""
from __future__ import annotations

import json
import signal
import time

import numpy as np
import pytest
import torch

from kdlib import engine
from kdlib.config import make_config

TINY_SET = ["--set", "train_per_class=2", "--set", "test_per_class=2", "--set", "teacher_epochs=1"]


ERRORS = [
    (["--method", "bogus"], "unknown method 'bogus'; valid methods:"),
    (["--method", "kd", "--student", "resnet7"], "unknown student architecture 'resnet7'; valid architectures:"),
    (["--method", "kd", "--set", "lr"], "--set expects key=value, got 'lr'"),
    (["--method", "kd", "--epochs", "-1"], "epochs must be >= 1, got -1"),
    (["--method", "kd", "--teacher", "vgg99"], "unknown teacher architecture 'vgg99'"),
    (["--method", "kd", "--dataset", "imagenet"], "unknown dataset 'imagenet'"),
    (["--method", "kd", "--profile", "huge"], "unknown profile 'huge'"),
    (["--method", "kd", "--set", "tempreature=3"], "unknown --set key 'tempreature'; valid keys:"),
    (["--method", "kd", "--set", "temperature=0"], "temperature must be > 0"),
    (["--method", "kd", "--device", "tpu9"], "device must be"),
    (["--method", "kd", "--teacher-checkpoint", "/no/such.pth"], "does not exist"),
]


@pytest.mark.parametrize("args, message", ERRORS[:4])
def test_user_errors_exit_2_with_one_line(cli, tmp_path, args, message):
    result = cli("train", *args, "--out", str(tmp_path / "run"), "--no-progress")
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.stderr
    assert not (tmp_path / "run").exists()  # nothing started


@pytest.mark.parametrize("args, message", ERRORS)
def test_user_errors_in_process(tmp_path, capsys, args, message):
    from kdlib.cli import main

    assert main(["train", *args, "--out", str(tmp_path / "run"), "--no-progress"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], lines
    assert not (tmp_path / "run").exists()


def test_unwritable_out(cli, tmp_path):
    (tmp_path / "file").write_text("x")
    result = cli("train", "--method", "vanilla", "--out", str(tmp_path / "file" / "run"), "--no-progress")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: cannot write to the run directory"), result.stderr


def test_train_kd_end_to_end_then_already_finished(cli, tmp_path):
    out = tmp_path / "run"
    args = ["train", "--method", "kd", "--teacher", "resnet20", "--student", "resnet8", "--dataset", "synthetic",
            "--epochs", "1", "--out", str(out), "--teachers-dir", str(tmp_path / "teachers"), "--no-progress", *TINY_SET]
    result = cli(*args)
    assert result.returncode == 0, result.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["status"] == "finished" and len(metrics["history"]) == 1
    assert metrics["config"]["run"]["teacher"] == "resnet20" and metrics["config"]["teacher"]["source"] == "trained"
    assert list((tmp_path / "teachers").glob("resnet20-synthetic-2pc*.pt"))
    assert "epoch 1/1" in result.stdout
    again = cli(*args)
    assert again.returncode == 0 and "already finished" in again.stdout
    assert json.loads((out / "metrics.json").read_text()) == metrics


@pytest.mark.slow
@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_stops_cleanly_and_resumes_identically(cli, tmp_path, sig, code):
    out = tmp_path / "run"
    epochs = 6
    args = ["train", "--method", "vanilla", "--student", "resnet8", "--epochs", str(epochs), "--out", str(out),
            "--device", "cpu", "--no-progress", "--set", "train_per_class=4", "--set", "test_per_class=2"]
    proc = cli.start(*args)
    deadline = time.monotonic() + 240
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                if json.loads((out / "metrics.json").read_text())["history"]:
                    break
            except (OSError, ValueError, KeyError):
                pass
            time.sleep(0.05)
        proc.send_signal(sig)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == code, stderr
    assert "interrupted" in stderr
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["status"] == "interrupted" and 1 <= len(metrics["history"]) < epochs
    assert engine.read_checkpoint(out / "checkpoint.pt")["epoch"] == len(metrics["history"])
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]
    if sig != signal.SIGTERM:
        return
    resumed = cli(*args)
    assert resumed.returncode == 0, resumed.stderr
    finished = json.loads((out / "metrics.json").read_text())
    assert finished["status"] == "finished" and len(finished["history"]) == epochs
    # the same run uninterrupted, in this process (1 thread, as the subprocess)
    cfg = make_config("smoke", method="vanilla", student="resnet8", epochs=epochs, device="cpu",
                      train_per_class=4, test_per_class=2, out=str(tmp_path / "straight"))
    straight = engine.train(cfg, progress=False, verbose=False)
    timing = {"epoch_seconds", "train_seconds", "images_per_second"}
    strip = lambda m: [{k: v for k, v in r.items() if k not in timing} for r in m["history"]]  # noqa: E731
    assert strip(finished) == strip(straight)
    a = torch.load(out / "student.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "straight" / "student.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("method", __import__("kdlib.methods", fromlist=["names"]).names())
def test_every_method_trains_one_synthetic_epoch(method, tiny_teachers_dir, tmp_path, capsys):
    """Issue 4's end-to-end check: `python -m kdlib train --method M ... --epochs 1` for every method."""
    from kdlib.cli import main

    out = tmp_path / method
    args = ["train", "--method", method, "--teacher", "resnet8", "--student", "resnet8", "--dataset", "synthetic",
            "--epochs", "1", "--out", str(out), "--teachers-dir", str(tiny_teachers_dir), "--no-progress",
            "--set", "train_per_class=4", "--set", "test_per_class=2", "--set", "teacher_epochs=2"]
    assert main(args) == 0, capsys.readouterr().err
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["status"] == "finished" and metrics["config"]["run"]["method"] == method
    row = metrics["history"][0]
    terms = {k: v for k, v in row.items() if k.startswith("loss_")}
    assert terms and all(np.isfinite(v) for v in terms.values()), row
    assert np.isfinite(row["train_loss"]) and 0.0 <= metrics["final"]["test_acc"] <= 100.0
