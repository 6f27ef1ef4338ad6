"""The captured training step on CUDA (skipped without a GPU; benchmarks/gpu_check.sh runs this file).

Every test here must be able to fail, so each one either names what a broken capture would change or runs
the broken variant itself and asserts that the comparison sees it:

* eager and graphed steps compared step by step, fp32, deterministic cuDNN, the same batches: the capture
  at a learning rate of 0.05, a decay to 0.005 after it. The broken variants (a learning rate read as a
  Python float at capture; warm-up steps not undone) must differ, the engine's capture must not;
* SIGKILL of a graphed run while epoch 2 trains (the run is held there until it is killed), then the same
  command: the killed run recorded fewer epochs than planned and was unfinished, the resumed one captured
  again and ends like an uninterrupted run (GPU runs agree statistically, not bit for bit, across processes);
* every registered method passes the capture-safety check on CUDA (where copies between devices show) and
  trains one epoch graphed; "graph used" is read from the captures and replays the run recorded;
* DKD's warm-up factor (w = 2 epochs: 0.5 then 1.0) is read at every replay: the ratio of the recorded
  terms between the two epochs is 2 (a factor frozen at capture gives 1).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

#: ``KDLIB_GPU_TESTS_DEVICE=cpu`` runs this file's logic on a CPU with the simulated capture, to check the
#: tests themselves before a GPU is lent (slow: minutes; not part of the CPU suite)
DEVICE = os.environ.get("KDLIB_GPU_TESTS_DEVICE", "cuda")
pytestmark = pytest.mark.skipif(DEVICE == "cuda" and not torch.cuda.is_available(), reason="needs a CUDA GPU")

import stepkit  # noqa: E402
from kdlib import engine, methods  # noqa: E402
from kdlib.config import make_config  # noqa: E402
from kdlib.data import make_synthetic  # noqa: E402
from kdlib.engine import capture  # noqa: E402
from kdlib.engine import device as engine_device  # noqa: E402
from kdlib.engine.loop import set_learning_rate  # noqa: E402
from kdlib.methods.base import StepContext  # noqa: E402

#: 100 classes x 8 images = 800 = 12 x 64 + 32: full batches replay the graph, the last one runs eagerly
FULL_BATCHES = 12
GPU_TINY = dict(dataset="synthetic", train_per_class=8, test_per_class=2, teacher="resnet8", student="resnet8",
                teacher_epochs=2, epochs=2, device=DEVICE, **({} if DEVICE == "cuda" else {"teacher_cache": "off"}))
#: what the child process of the SIGKILL test runs first on a CPU (the graph decision as on CUDA)
SIMULATE = ("from kdlib.engine import device as d; d.resolve_graph = lambda graph, device: graph in "
            "('auto', True, 'true')\n") if DEVICE != "cuda" else ""


@pytest.fixture(autouse=True)
def _simulated_capture_off_cuda(monkeypatch):
    if DEVICE != "cuda":
        monkeypatch.setattr(engine_device, "resolve_graph", lambda graph, device: graph in ("auto", True, "true"))
RTOL = 0.03
BATCH = 64


@pytest.fixture(scope="module")
def teachers_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("gpu-teachers")


def _cfg(teachers_dir, out, **overrides):
    return make_config("smoke", **{**GPU_TINY, "method": "kd", "teachers_dir": str(teachers_dir), "out": str(out),
                                   **overrides})


def _close(a, b, rtol=RTOL):
    return abs(a - b) <= rtol * max(abs(a), abs(b), 1e-8)


@pytest.fixture(scope="module")
def gpu_data():
    data = make_synthetic(train_per_class=4, test_per_class=1, seed=0)
    return dataclasses.replace(data, train_images=data.train_images[:4 * BATCH].contiguous(),
                               train_labels=data.train_labels[:4 * BATCH].contiguous()).to(DEVICE)


@contextlib.contextmanager
def _deterministic_cudnn():
    flags = torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    try:
        yield
    finally:
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = flags


def _step_losses(loop: engine.EpochLoop, steps: int, decay_after: int):
    """Per-step losses of ``steps`` steps over the same fixed batches (epoch 1), the learning rate decayed
    tenfold after step ``decay_after`` (the capture happens at step 1)."""
    perm, sums = loop.start_epoch(1)
    losses, before = [], 0.0
    for s in range(steps):
        if s == decay_after:
            set_learning_rate(loop.step.optimizer, 0.005)
        loop.run_step(1, s % 4, perm[(s % 4) * BATCH:(s % 4 + 1) * BATCH], sums)
        total = float(sums.loss)
        losses.append((total - before) / BATCH)
        before = total
    return losses


@pytest.mark.parametrize("variant", ["engine", "float_learning_rate", "warm_up_not_undone"])
def test_graphed_and_eager_steps_agree_step_by_step(variant, gpu_data, monkeypatch):
    teacher = stepkit.random_teacher(device=DEVICE)
    if variant == "float_learning_rate":  # the broken variant: fused SGD with the rate as a Python float
        def float_rate(params, *, lr, momentum, weight_decay, graph, device):
            return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay, fused=True)

        monkeypatch.setattr(engine, "make_optimizer", float_rate)
    if variant == "warm_up_not_undone":
        monkeypatch.setattr(capture, "_restored", lambda *args: contextlib.nullcontext())
    with _deterministic_cudnn():
        runs = []
        for graph in (True, False):
            step = stepkit.graph_mode_step("kd", gpu_data, teacher, device=DEVICE, amp="none", graph=True)
            loop = engine.EpochLoop(step, seed=0, batch_size=BATCH, epochs=1, graph=graph)
            runs.append((loop, _step_losses(loop, steps=12, decay_after=6)))
    (graphed, g_losses), (eager, e_losses) = runs
    assert graphed.counts()["graph_captures"] == 1 and graphed.counts()["graph_replays"] == 11
    weights = [(a - b).abs().max().item() / max(b.abs().max().item(), 1e-12)
               for a, b in zip(graphed.step.forward.parameters(), eager.step.forward.parameters())]
    agree = all(_close(g, e, 1e-4) for g, e in zip(g_losses, e_losses)) and max(weights) < 1e-3
    graphed.release()
    assert agree is (variant == "engine"), (variant, g_losses, e_losses, max(weights))


def test_sigkill_then_resume_of_a_graphed_run_ends_like_the_uninterrupted_one(teachers_dir, tmp_path):
    cfg = _cfg(teachers_dir, tmp_path / "killed", graph=True, epochs=3, milestones=[2])
    straight = engine.train(cfg.replace(out=str(tmp_path / "straight")), progress=False, verbose=False)
    env = {**os.environ, "PYTHONPATH": str(Path(engine.__file__).resolve().parents[2])}
    # the child holds after recording epoch 1 (it sleeps in epoch 2's first step), so the kill always
    # lands inside the run, whatever the speed of the GPU
    code = (SIMULATE + "import json, sys, time; from kdlib import engine; from kdlib.engine import loop; "
            "from kdlib.config import RunConfig; record = loop._record_epoch\n"
            "def hold(run, lp, epoch, row):\n    record(run, lp, epoch, row)\n    time.sleep(600)\n"
            "loop._record_epoch = hold\n"
            "engine.train(RunConfig.from_dict(json.loads(sys.argv[1])), progress=False, verbose=False)")
    proc = subprocess.Popen([sys.executable, "-c", code, json.dumps(cfg.to_dict())], env=env)
    metrics_path = Path(cfg.out) / engine.METRICS
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if metrics_path.is_file() and len(json.loads(metrics_path.read_text() or "{}").get("history", [])) >= 1:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed = json.loads(metrics_path.read_text())
    assert proc.returncode == -signal.SIGKILL
    assert killed["status"] == "running" and 1 <= len(killed["history"]) < cfg.epochs  # unfinished, then killed
    assert killed["segments"][-1]["graph_captures"] == 1 and killed["segments"][-1]["graph_replays"] > 0
    resumed = engine.train(cfg, progress=False, verbose=False)
    assert [r["epoch"] for r in resumed["history"]] == [1, 2, 3] and len(resumed["segments"]) == 2
    assert resumed["segments"][-1]["start_epoch"] == len(killed["history"]) + 1
    assert resumed["segments"][-1]["graph_captures"] == 1  # resumed, then captured again
    for r, s in zip(resumed["history"], straight["history"], strict=True):
        assert r["lr"] == s["lr"]
        assert _close(r["train_loss"], s["train_loss"]), (r["epoch"], r["train_loss"], s["train_loss"])


@pytest.mark.parametrize("method", methods.names())
def test_every_method_passes_the_capture_safety_check_on_cuda(method, gpu_data):
    teacher = stepkit.random_teacher(device=DEVICE)
    step = stepkit.graph_mode_step(method, gpu_data, teacher, device=DEVICE)
    indices, gen, ctx, sums, view_gen = stepkit.capture_inputs(step, BATCH)
    step(indices, gen, StepContext(epoch=1, step=0, steps_per_epoch=2, epochs=2, indices=indices), sums, view_gen)
    engine.check_capture_safety(step, indices, gen, ctx, sums, view_gen,
                                step_number=torch.ones((), dtype=torch.int64, device=DEVICE))


@pytest.mark.parametrize("method", methods.names())
def test_every_method_trains_one_epoch_graphed(method, teachers_dir, tmp_path):
    cls = methods.get(method)
    metrics = engine.train(_cfg(teachers_dir, tmp_path / method, method=method, epochs=1, graph=True),
                           progress=False, verbose=False)
    row, segment = metrics["history"][0], metrics["segments"][-1]
    assert row["train_loss"] == row["train_loss"] and abs(row["train_loss"]) < float("inf")
    assert segment["graph_fallback"] is None, segment["graph_fallback"]
    if getattr(cls, "graph_safe", True):  # the facts: one capture, the other full batches replayed
        # the first full batch runs eagerly (it makes the momentum buffers), the next is captured
        assert segment["graph_captures"] == 1 and segment["graph_replays"] == FULL_BATCHES - 1
        assert segment["amp"] == engine.resolve_amp("auto", DEVICE, graph=True)
    else:
        assert segment["graph_captures"] == 0 and segment["graph_replays"] == 0


def test_dkd_warm_up_factor_is_not_frozen_in_the_graph(teachers_dir, tmp_path):
    """With warmup=2 the distillation terms are scaled 0.5 in epoch 1, 1.0 in epoch 2; same model and data
    in both epochs (lr ~ 0), so the ratio of the recorded terms is the ratio of the factors."""
    dkd = _cfg(teachers_dir, tmp_path / "dkd", method="dkd", graph=True, epochs=2, lr=1e-12, amp="none",
               method_params={"warmup": 2})
    metrics = engine.train(dkd, progress=False, verbose=False)
    rows = metrics["history"]
    segment = metrics["segments"][-1]
    assert segment["graph_captures"] == 1 and segment["graph_replays"] == 2 * FULL_BATCHES - 1
    ratio = rows[1]["loss_nckd"] / rows[0]["loss_nckd"]
    assert ratio == pytest.approx(2.0, rel=0.1), ratio  # 1.0 / 0.5; a frozen factor would give 1.0
