"""The engine's seams for methods (S1 progress, S2 epoch hooks, S3 extra views) and the graph option's
CPU plumbing; the captured step itself is tested on a GPU (tests/test_gpu.py)."""
from __future__ import annotations

import math

import pytest
import torch

from kdlib import engine
from kdlib.config import apply_overrides, make_config
from kdlib.data import normalize
from kdlib.errors import KDLibError
from kdlib.methods import _REGISTRY, Method
from kdlib.methods.base import StepContext, warmup_factor

from conftest import TINY


def _flip_view(images_u8, generator):
    assert isinstance(generator, torch.Generator)
    return images_u8.flip(3)  # a view the normal augmentation cannot produce without its own flip draw


class _Recorder(Method):
    """Records what the engine hands it: progress per step, epoch hooks, the extra view's logits."""

    name = "recorder"
    extra_views = {"mirror": _flip_view}

    def __init__(self, **hp):
        super().__init__(**hp)
        self.w = torch.nn.Parameter(torch.ones(()))
        self.calls, self.progress, self.view_errors = [], [], []

    def setup(self, ctx):
        self.teacher, self.images = ctx.teacher, ctx.train_images
        return {}

    def start_epoch(self, epoch):
        self.calls.append(("start", epoch))

    def forward(self, student_logits, teacher_logits, targets, batch):
        self.calls.append(("step", batch.epoch, batch.step))
        self.progress.append((batch.epoch, batch.step, batch.progress))
        s_view, t_view = batch.views["mirror"]
        assert set(batch.views) == {"mirror"}
        assert s_view.shape == student_logits.shape and s_view.dtype == torch.float32 and s_view.requires_grad
        assert t_view is not None and not t_view.requires_grad
        with torch.no_grad():  # the live teacher on exactly the declared view of the batch's raw images
            expected = self.teacher(normalize(self.images.index_select(0, batch.indices).flip(3), True)).float()
        self.view_errors.append(float((t_view - expected).abs().max()))
        ce = torch.nn.functional.cross_entropy
        return {"loss_ce": ce(student_logits * self.w, targets), "loss_view": 0.5 * ce(s_view, targets)}

    def end_epoch(self, epoch):
        self.calls.append(("end", epoch))
        return {}


@pytest.fixture
def recorder(monkeypatch):
    made = []

    class Made(_Recorder):
        def __init__(self, **hp):
            super().__init__(**hp)
            made.append(self)

    monkeypatch.setitem(_REGISTRY, "recorder", Made)
    return made


def test_progress_epoch_hooks_and_an_extra_view(recorder, tiny_config):
    metrics = engine.train(tiny_config(method="recorder", teacher_cache="lazy"), progress=False, verbose=False)
    m = recorder[-1]
    steps = math.ceil(400 / 64)  # TINY: 100 classes x 4 images
    # S2: start_epoch before the epoch's first step, end_epoch after its last
    expected = []
    for e in (1, 2):
        expected += [("start", e)] + [("step", e, s) for s in range(steps)] + [("end", e)]
    assert m.calls == expected
    # S1: progress = (epoch - 1) + (step + 1) / steps; the last step of epoch e gives exactly e
    assert [p for _, _, p in m.progress] == [(e - 1) + (s + 1) / steps for e, s, _ in m.progress]
    assert m.progress[steps - 1][2] == 1.0 and m.progress[-1][2] == 2.0
    # S3: the teacher's logits of the extra view are the live teacher's on that view (not the cache's)
    assert max(m.view_errors) < 1e-5
    assert "loss_view" in metrics["history"][0] and metrics["history"][0]["loss_view"] > 0


@pytest.mark.parametrize("warmup", [0, 0.5, 1, 3, 20])
def test_warmup_factor_gives_the_same_value_for_float_and_tensor_progress(warmup):
    """By epoch (the papers' min(e / W, 1)) for a whole W >= 2, per step otherwise (short scaled runs);
    the tensor progress of CUDA-graph mode gives the same value as the eager float."""
    for epoch in (1, 2, 3, 5, 25):
        for step in (0, 3, 6):
            ctx = StepContext(epoch=epoch, step=step, steps_per_epoch=7, epochs=30)
            progress = (epoch - 1) + (step + 1) / 7
            if warmup == 0:
                want = 1.0
            elif warmup in (3, 20):
                want = min(epoch / warmup, 1.0)
            else:
                want = min(progress / warmup, 1.0)
            assert warmup_factor(ctx, warmup) == pytest.approx(want, rel=1e-12)
            ctx.progress = torch.tensor(ctx.progress, dtype=torch.float32)
            got = warmup_factor(ctx, warmup)
            assert float(got) == pytest.approx(want, rel=1e-6)


def test_graph_option_resolves_and_is_not_part_of_the_run_identity(tiny_config, tmp_path):
    assert engine.resolve_graph("auto", torch.device("cpu")) is False
    assert engine.resolve_graph(False, torch.device("cpu")) is False
    with pytest.raises(KDLibError, match="graph=true needs a CUDA device"):
        engine.resolve_graph(True, torch.device("cpu"))
    cfg = make_config("smoke", **TINY)
    off = apply_overrides(cfg, ["graph=false"])
    assert off.graph is False and off.identity() == cfg.identity() and "graph" not in cfg.identity()
    with pytest.raises(KDLibError, match="graph must be"):
        apply_overrides(cfg, ["graph=sometimes"])
    out = tmp_path / "graphed-on-cpu"
    with pytest.raises(KDLibError, match="graph=true needs a CUDA device"):
        engine.train(tiny_config(graph=True, out=str(out)), progress=False, verbose=False)
    assert not out.exists()  # refused before anything is written


def test_amp_auto_is_bf16_only_for_a_graphed_cuda_step():
    assert engine.resolve_amp("auto", torch.device("cuda"), graph=True) == "bf16"
    assert engine.resolve_amp("auto", torch.device("cuda"), graph=False) == "none"
    from kdlib.precision import cpu_has_native_bf16

    assert engine.resolve_amp("auto", torch.device("cpu"), graph=False) == ("bf16" if cpu_has_native_bf16() else "none")
    assert engine.resolve_amp("none", torch.device("cpu")) == "none"
    assert engine.resolve_amp("bf16", torch.device("cpu")) == "bf16"


@pytest.mark.parametrize("method", ["aekt", "cwkd"])
def test_graph_protocol_simulated_on_cpu_matches_eager(method, tiny_config, tmp_path, monkeypatch):
    """The graph-mode loop on CPU, capture left out (kdlib.engine.step.GraphedStep's simulation): fused SGD
    with the learning rate as a tensor, one generator re-seeded per epoch, static indices and progress,
    sums kept on the device and reset in place, warm-up steps undone in place, the last partial batch
    eager. It must train like the eager loop: if the warm-up were not undone, or the learning rate (the
    milestone after epoch 1) or the sums not carried, the histories would differ by far more than the
    float32-vs-float64 rounding of the learning rate (fused SGD's tensor) allows (rtol 1e-4)."""
    from kdlib.engine import run as engine_run

    cfg = dict(method=method, epochs=2, milestones=[1], teacher_cache="off")  # graph mode would fill it: slow on CPU
    eager = engine.train(tiny_config(**cfg, out=str(tmp_path / "eager")), progress=False, verbose=False)
    monkeypatch.setattr(engine_run, "resolve_graph", lambda graph, device: True)
    graphed = engine.train(tiny_config(**cfg, out=str(tmp_path / "graphed")), progress=False, verbose=False)
    assert graphed["segments"][-1]["graph"] is True and eager["segments"][-1]["graph"] is False
    for g, e in zip(graphed["history"], eager["history"]):
        assert g["lr"] == e["lr"]
        for key in ("train_loss", "train_acc", "test_loss"):
            assert g[key] == pytest.approx(e[key], rel=1e-4, abs=1e-6), (method, g["epoch"], key)
        assert g["method"].keys() == e["method"].keys()
