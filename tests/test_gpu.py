"""The captured training step on CUDA (skipped without a GPU; benchmarks/gpu_check.sh runs this file).

* a graphed run and an eager run of the same config agree epoch by epoch. Not bitwise: cuDNN's
  autotuned kernels and atomic adds differ between the two processes' choices, and the graph replays
  fused SGD where the eager run uses the foreach path. Stated tolerance: train loss within 3 % relative
  after 2 epochs of the tiny run, and the learning rates recorded identical;
* SIGKILL of a graphed run, then the same command, ends like an uninterrupted graphed run (same tolerance:
  GPU runs are not bit-reproducible across processes, see kdlib.engine);
* every registered method trains one epoch graphed, finite (parametrized over kdlib.methods.names(),
  so a new method is included automatically) and the run records that the graph was used;
* a value that changes between epochs is not frozen in the graph: the learning rate (milestone after
  epoch 1, lr 0.05 -> 0.0) and DKD's warm-up factor (w = 2 epochs: 0.5 then 1.0) are read back from the
  graphed run's records and checked against what the step actually applied.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

from kdlib import engine, methods  # noqa: E402
from kdlib.config import make_config  # noqa: E402

#: 100 classes x 8 images = 800 = 12 x 64 + 32: full batches replay the graph, the last one runs eagerly
GPU_TINY = dict(dataset="synthetic", train_per_class=8, test_per_class=2, teacher="resnet8", student="resnet8",
                teacher_epochs=2, epochs=2, device="cuda")
RTOL = 0.03


@pytest.fixture(scope="module")
def teachers_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("gpu-teachers")


def _cfg(teachers_dir, out, **overrides):
    return make_config("smoke", **{**GPU_TINY, "method": "kd", "teachers_dir": str(teachers_dir), "out": str(out),
                                   **overrides})


def _close(a, b, rtol=RTOL):
    return abs(a - b) <= rtol * max(abs(a), abs(b), 1e-8)


def test_graphed_and_eager_runs_agree_epoch_by_epoch(teachers_dir, tmp_path):
    graphed = engine.train(_cfg(teachers_dir, tmp_path / "g", graph=True, amp="none"), progress=False, verbose=False)
    eager = engine.train(_cfg(teachers_dir, tmp_path / "e", graph=False, amp="none"), progress=False, verbose=False)
    assert graphed["segments"][-1]["graph"] is True and eager["segments"][-1]["graph"] is False
    for g, e in zip(graphed["history"], eager["history"], strict=True):
        assert g["lr"] == e["lr"]
        assert _close(g["train_loss"], e["train_loss"]), (g["epoch"], g["train_loss"], e["train_loss"])
        assert abs(g["train_acc"] - e["train_acc"]) <= 5.0  # percentage points, 800 images


def test_sigkill_then_resume_of_a_graphed_run_equals_the_uninterrupted_one(teachers_dir, tmp_path):
    cfg = _cfg(teachers_dir, tmp_path / "killed", graph=True, epochs=3, milestones=[2])
    straight = engine.train(cfg.replace(out=str(tmp_path / "straight")), progress=False, verbose=False)
    env = {**os.environ, "PYTHONPATH": str(Path(engine.__file__).resolve().parents[2])}
    code = ("import json, sys; from kdlib import engine; from kdlib.config import RunConfig; "
            "engine.train(RunConfig.from_dict(json.loads(sys.argv[1])), progress=False, verbose=False)")
    proc = subprocess.Popen([sys.executable, "-c", code, json.dumps(cfg.to_dict())], env=env)
    metrics = Path(cfg.out) / engine.METRICS
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:  # kill once epoch 1 is recorded
        if metrics.is_file() and len(json.loads(metrics.read_text() or "{}").get("history", [])) >= 1:
            break
        time.sleep(0.05)
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    resumed = engine.train(cfg, progress=False, verbose=False)
    assert [r["epoch"] for r in resumed["history"]] == [1, 2, 3]
    for r, s in zip(resumed["history"], straight["history"], strict=True):
        assert r["lr"] == s["lr"]
        assert _close(r["train_loss"], s["train_loss"]), (r["epoch"], r["train_loss"], s["train_loss"])


@pytest.mark.parametrize("method", methods.names())
def test_every_method_trains_one_epoch_graphed(method, teachers_dir, tmp_path):
    cls = methods.get(method)
    metrics = engine.train(_cfg(teachers_dir, tmp_path / method, method=method, epochs=1, graph=True),
                           progress=False, verbose=False)
    row = metrics["history"][0]
    assert row["train_loss"] == row["train_loss"] and abs(row["train_loss"]) < float("inf")
    # a method that cannot be captured says so (graph_safe = False) and the run records eager steps
    assert metrics["segments"][-1]["graph"] is bool(getattr(cls, "graph_safe", True))


def test_values_changing_between_epochs_are_not_frozen_in_the_graph(teachers_dir, tmp_path):
    # learning rate: milestone 1 with decay 1e-30 -> epoch 2 trains with lr 5e-32: the weights must not move.
    # Epoch 1's weights from the run's own checkpoint (GPU runs are not bit-reproducible across runs)
    cfg = _cfg(teachers_dir, tmp_path / "lr", graph=True, epochs=2, milestones=[1], lr_decay=1e-30)
    engine.train(cfg, progress=False, verbose=False, stop_after_epoch=1)
    w1 = engine.read_checkpoint(tmp_path / "lr" / engine.CHECKPOINT)["student"]
    full = engine.train(cfg, progress=False, verbose=False)  # resumes: a new capture, then replays
    assert full["segments"][-1]["graph"] is True and full["history"][1]["lr"] == pytest.approx(5e-32)
    w2 = torch.load(tmp_path / "lr" / engine.STUDENT, weights_only=True)["model"]
    moved = max(float((w1[k].float() - w2[k].float().cpu()).abs().max()) for k in w1
                if "running" not in k and "num_batches" not in k)
    assert moved < 1e-6  # a learning rate frozen at capture (0.05) would have moved them

    # DKD's warm-up: with warmup=2 the distillation terms are scaled 0.5 in epoch 1, 1.0 in epoch 2.
    # Same model and data in both epochs (lr ~ 0), so the ratio of the recorded terms is the factor ratio.
    dkd = _cfg(teachers_dir, tmp_path / "dkd", method="dkd", graph=True, epochs=2, lr=1e-12,
               method_params={"warmup": 2})
    rows = engine.train(dkd, progress=False, verbose=False)["history"]
    ratio = rows[1]["loss_nckd"] / rows[0]["loss_nckd"]
    assert ratio == pytest.approx(2.0, rel=0.1), ratio  # 1.0 / 0.5; a frozen factor would give 1.0
