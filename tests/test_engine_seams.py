"""The engine's seams for methods (progress, epoch hooks, extra views), the graph option's CPU plumbing and
the execution/precision decision; the simulated capture is tested in tests/test_capture.py, the real one on
a GPU (tests/test_gpu.py)."""
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

    def forward(self, student_logits, teacher_logits, targets, ctx):
        self.calls.append(("step", ctx.epoch, ctx.step))
        self.progress.append((ctx.epoch, ctx.step, ctx.progress))
        s_view, t_view = ctx.extra_logits["mirror"]
        assert set(ctx.extra_logits) == {"mirror"}
        assert s_view.shape == student_logits.shape and s_view.dtype == torch.float32 and s_view.requires_grad
        assert t_view is not None and not t_view.requires_grad
        with torch.no_grad():  # the live teacher on exactly the declared view of the batch's raw images
            expected = self.teacher(normalize(self.images.index_select(0, ctx.indices).flip(3), True)).float()
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
    # start_epoch before the epoch's first step, end_epoch after its last
    expected = []
    for e in (1, 2):
        expected += [("start", e)] + [("step", e, s) for s in range(steps)] + [("end", e)]
    assert m.calls == expected
    # progress = (epoch - 1) + (step + 1) / steps; the last step of epoch e gives exactly e
    assert [p for _, _, p in m.progress] == [(e - 1) + (s + 1) / steps for e, s, _ in m.progress]
    assert m.progress[steps - 1][2] == 1.0 and m.progress[-1][2] == 2.0
    # the teacher's logits of the extra view are the live teacher's on that view (not the cache's)
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


def test_precision_is_chosen_after_the_graph_decision_and_kept_on_a_resume():
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    decide = engine.decide_execution
    assert (decide("auto", "auto", cuda).graph, decide("auto", "auto", cuda).amp) == (True, "bf16")
    # a graph the method refuses: eager CUDA steps, and then fp32, not the graph's bf16
    refused = decide("auto", "auto", cuda, method="m", graph_safe=False)
    assert (refused.graph, refused.amp) == (False, "none") and "graph_safe = False" in refused.notes[0]
    assert decide("auto", "auto", cuda, compile=True).amp == "none"
    assert decide(False, "auto", cuda).amp == "none" and decide(False, "bf16", cuda).amp == "bf16"
    # a resume that changes the execution keeps the precision the run started with, unless asked
    started = [{"device": "cuda:0", "amp": "bf16", "graph": True}]
    kept = decide(False, "auto", cuda, previous_segments=started)
    assert (kept.graph, kept.amp) == (False, "bf16") and "started with" in kept.notes[0]
    assert decide(False, "none", cuda, previous_segments=started).amp == "none"
    assert decide("auto", "auto", cuda, previous_segments=[{"device": "cuda", "amp": "none"}]).amp == "none"
    # on a CPU nothing changes: amp=auto is bf16 where the CPU has native bf16, the graph is off
    plain = decide("auto", "auto", cpu)
    assert (plain.graph, plain.amp, plain.notes) == (False, engine.resolve_amp("auto", cpu), [])
    assert decide("auto", "auto", cpu, previous_segments=[{"device": "cuda", "amp": "bf16"}]).amp == plain.amp
