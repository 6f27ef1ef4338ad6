"""The captured step as far as a CPU can prove it (kdlib.engine.capture).

* The capture-safety check runs one training step of every registered method, with every teacher-logit
  source (the live teacher, the complete exact cache; MLKD with its strong view), as the engine builds it
  for a captured run (fused SGD, the learning rate and the progress as device tensors): none trips it.
* It catches what a CUDA graph cannot hold, naming the operation and the line: ``.item()`` in a method,
  and every hazard the strong augmentation used to have (``nonzero`` with a branch on its size, a factor
  read with ``float(t[i])``, a tensor made from a Python tuple, a masked write).
* A method that trips it falls back to eager steps from the same state, recorded; a method that declares
  ``graph_safe = False`` runs eagerly on (simulated) CUDA and the log says so.
* The simulated capture freezes what a real graph freezes: a learning rate read as a Python float at
  capture, warm-up steps that are not undone and a method reading the epoch number in Python each make
  the graphed run differ from the eager one, while the engine's graphed run equals it.
* Several runs in one process keep at most one run's graphs alive, and none after they end.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math

import pytest
import torch
import torchvision.transforms.v2.functional as TF

import stepkit
from kdlib import augment, engine, logit_cache, methods
from kdlib.data import make_synthetic
from kdlib.engine import capture
from kdlib.engine import device as engine_device
from kdlib.engine import run as engine_run
from kdlib.engine.capture import CaptureHazard, check_capture_safety
from kdlib.methods import _REGISTRY, Method
from kdlib.methods.base import StepContext

BATCH = 16


# -- one step as a captured run builds it ------------------------------------------------------------------
@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """32 synthetic training images (100 classes), a random resnet8 teacher and its complete exact cache."""
    data = make_synthetic(train_per_class=1, test_per_class=1, seed=0)
    data = dataclasses.replace(data, train_images=data.train_images[:2 * BATCH].contiguous(),
                               train_labels=data.train_labels[:2 * BATCH].contiguous())
    teacher = stepkit.random_teacher()
    cache = logit_cache.TeacherLogitCache(teacher, data.train_images, num_classes=100, teacher_name="resnet8",
                                          dataset_description=data.description, channels_last=True,
                                          root=tmp_path_factory.mktemp("cache"))
    cache.fill()
    assert cache.capturable
    yield data, teacher, cache
    cache.close()


def graph_mode_step(name, source, world, **hparams):
    data, teacher, cache = world
    return stepkit.graph_mode_step(name, data, teacher, teacher_logits=cache if source == "cache" else "live",
                                   **hparams)


def graph_inputs(step):
    return stepkit.capture_inputs(step, BATCH)


def _sources(name):
    return ["live", "cache"] if methods.get(name).uses_teacher else ["none"]


@pytest.mark.parametrize("name,source", [(n, s) for n in methods.names() for s in _sources(n)])
def test_one_step_of_every_method_passes_the_capture_safety_check(name, source, world):
    step = graph_mode_step(name, source, world)
    indices, gen, ctx, sums, view_gen = graph_inputs(step)
    step(indices, gen, StepContext(epoch=1, step=0, steps_per_epoch=2, epochs=2, indices=indices), sums, view_gen)
    before = [p.detach().clone() for p in step.forward.parameters()]
    check_capture_safety(step, indices, gen, ctx, sums, view_gen, step_number=torch.tensor(1))
    assert any(not torch.equal(a, b) for a, b in zip(before, step.forward.parameters()))  # it trained
    if name == "mlkd":  # both views went through the step
        assert set(ctx.extra_logits) == {"strong"}


def test_the_lazy_cache_is_not_capturable_and_the_check_agrees(world, tmp_path):
    data, teacher, _ = world
    lazy = logit_cache.TeacherLogitCache(teacher, data.train_images, num_classes=100, teacher_name="resnet8-lazy",
                                         dataset_description=data.description, channels_last=True, root=tmp_path)
    step = graph_mode_step("kd", "live", world)
    step.teacher_logits = lazy
    indices, gen, ctx, sums, view_gen = graph_inputs(step)
    assert not lazy.capturable and capture.graph_blockers(step.method, lazy, False)
    with pytest.raises(CaptureHazard, match="depends on the data"):
        check_capture_safety(step, indices, gen, ctx, sums, view_gen, step_number=torch.tensor(1))
    lazy.close()


# -- what the check catches ----------------------------------------------------------------------------------
class ItemReader(Method):
    """A loss that reads a tensor on the host: what a captured step cannot do."""

    name = "item_reader"

    def forward(self, student_logits, teacher_logits, targets, ctx):
        loss = torch.nn.functional.cross_entropy(student_logits, targets)
        scale = 1.0 if loss.item() < 100 else 0.5  # the host read
        return {"loss_ce": scale * loss}


@pytest.fixture
def item_reader(monkeypatch):
    monkeypatch.setitem(_REGISTRY, "item_reader", ItemReader)
    return ItemReader


def test_the_check_fails_on_item_and_names_the_operation_and_the_line(item_reader, world):
    step = graph_mode_step("item_reader", "live", world)
    indices, gen, ctx, sums, view_gen = graph_inputs(step)
    with pytest.raises(CaptureHazard) as err:
        check_capture_safety(step, indices, gen, ctx, sums, view_gen, step_number=torch.tensor(1))
    message = str(err.value)
    assert "_local_scalar_dense" in message and "read on the host" in message
    assert "test_capture.py" in message and "loss.item()" in message  # the offending line, quoted


def _old_select_and_apply(images, choice):  # per-op subsets, as the strong view was cut before
    out = images.clone()
    sel = (choice == 3).nonzero().squeeze(1)
    if sel.numel():
        out[sel] = 255 - images[sel]
    return out


def _old_per_image_factor(images, factor):
    return torch.stack([TF.adjust_brightness(images[i], float(factor[i])) for i in range(images.shape[0])])


def _old_cutout_fill(images):
    return torch.tensor(augment.CUTOUT_FILL, dtype=images.dtype, device=images.device).view(1, 3, 1, 1) + 0 * images


def _masked_write(images):
    out = images.clone()
    out[out > 128] = 0
    return out


@pytest.mark.parametrize("fn,op", [
    (lambda x: _old_select_and_apply(x, torch.arange(x.shape[0]) % 14), "nonzero"),
    (lambda x: _old_per_image_factor(x, torch.linspace(0.1, 0.9, x.shape[0])), "_local_scalar_dense"),
    (_old_cutout_fill, "lift_fresh"),
    (_masked_write, "__setitem__"),
    (lambda x: x[x > 128], "index"),
    (lambda x: TF.autocontrast(x), "index_put"),
    (lambda x: torch.unique(x), "unique"),
    (lambda x: x.float().mean().tolist(), "tolist"),
])
def test_the_check_catches_the_hazards_the_strong_view_had(fn, op):
    images = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    fn(images)  # runs eagerly
    with pytest.raises(CaptureHazard) as err:
        check_capture_safety(fn, images)
    assert op in str(err.value) and "test_capture.py" in str(err.value)


def test_the_strong_view_now_passes_the_check():
    images = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    augment.strong_augment(images, torch.Generator().manual_seed(1))  # per-device constants made eagerly
    out = check_capture_safety(augment.strong_augment, images, torch.Generator().manual_seed(1))
    assert torch.equal(out, augment.strong_augment(images, torch.Generator().manual_seed(1)))


# -- what the engine does with it ------------------------------------------------------------------------------
def test_a_failed_capture_falls_back_to_eager_steps_from_the_same_state(item_reader, world):
    """Step 1 tries the capture, which trips the check in its first warm-up step: the loop restores the
    state and runs that step eagerly. Its weights then equal those of a loop that never tried (the same
    seeds: the same students, crops and flips)."""
    tried, eager = (engine.EpochLoop(graph_mode_step("item_reader", "live", world), seed=0, batch_size=BATCH,
                                     epochs=1, graph=graph) for graph in (True, False))
    indices = torch.arange(BATCH)
    for loop in (tried, eager):
        sums = loop.start_epoch(1)[1]
        for s in range(2):
            loop.run_step(1, s, indices, sums)
    assert tried.graph is False and tried.graphed is None and "CaptureHazard" in tried.fallback
    assert tried.counts() == {"graph_captures": 0, "graph_replays": 0, "eager_steps": 2,
                              "graph_fallback": tried.fallback}
    for a, b in zip(tried.step.forward.parameters(), eager.step.forward.parameters()):
        assert torch.equal(a, b)


@pytest.fixture
def simulated_cuda(monkeypatch):
    """The graph decision as on CUDA, on this CPU: the captured step is simulated (capture.GraphedStep)."""
    monkeypatch.setattr(engine_device, "resolve_graph", lambda graph, device: graph in ("auto", True, "true"))


class EagerOnly(Method):
    name = "eager_only"
    graph_safe = False

    def forward(self, student_logits, teacher_logits, targets, ctx):
        return {"loss_ce": torch.nn.functional.cross_entropy(student_logits, targets)}


def test_a_method_that_declares_graph_safe_false_runs_eagerly_and_says_so(monkeypatch, simulated_cuda, tiny_config,
                                                                           capsys):
    monkeypatch.setitem(_REGISTRY, "eager_only", EagerOnly)
    metrics = engine.train(tiny_config(method="eager_only", epochs=1, teacher_cache="off"), progress=False)
    segment = metrics["segments"][-1]
    assert segment["graph"] is False and segment["graph_captures"] == 0 and segment["graph_replays"] == 0
    assert segment["eager_steps"] == math.ceil(400 / 64)
    assert "declares graph_safe = False" in " ".join(segment["execution_notes"])
    assert "graph mode off, eager steps: method 'eager_only' declares graph_safe = False" in capsys.readouterr().out


def test_a_capture_that_fails_does_not_stop_the_run_and_is_recorded(item_reader, simulated_cuda, tiny_config):
    metrics = engine.train(tiny_config(method="item_reader", epochs=2, teacher_cache="off"), progress=False,
                           verbose=False)
    segment = metrics["segments"][-1]
    assert metrics["status"] == "finished" and len(metrics["history"]) == 2
    assert segment["graph"] is True and segment["graph_captures"] == 0 and segment["graph_replays"] == 0
    assert segment["eager_steps"] == 2 * math.ceil(400 / 64) and "loss.item()" in segment["graph_fallback"]


# -- the simulated capture freezes what a graph freezes -------------------------------------------------------
def _train(tiny_config, tmp_path, name, **overrides):
    cfg = dict(method="kd", epochs=2, milestones=[1], teacher_cache="off", out=str(tmp_path / name))
    return engine.train(tiny_config(**{**cfg, **overrides}), progress=False, verbose=False)


def _mismatches(graphed, eager):
    bad = []
    for g, e in zip(graphed["history"], eager["history"], strict=True):
        for key in ("train_loss", "train_acc", "test_loss"):
            if g[key] != pytest.approx(e[key], rel=1e-4, abs=1e-6):
                bad.append((g["epoch"], key, g[key], e[key]))
    return bad


@pytest.fixture
def eager_kd(tiny_config, tmp_path):
    return _train(tiny_config, tmp_path, "eager")


@pytest.mark.parametrize("method", ["kd", "aekt", "cwkd"])
def test_the_simulated_graphed_run_equals_the_eager_run(method, tiny_config, tmp_path, monkeypatch):
    """Fused SGD with the learning rate as a tensor (the milestone after epoch 1 changes it), one generator
    re-seeded per epoch, static indices and progress, sums on the device reset in place, warm-up steps
    undone in place, the last partial batch eager: the graphed run trains like the eager one (rtol 1e-4:
    the float32 learning-rate tensor against the eager float64 rate)."""
    eager = _train(tiny_config, tmp_path, "eager", method=method)
    monkeypatch.setattr(engine_device, "resolve_graph", lambda graph, device: True)
    graphed = _train(tiny_config, tmp_path, "graphed", method=method)
    segment, steps = graphed["segments"][-1], math.ceil(400 / 64)
    assert segment["graph"] is True and eager["segments"][-1]["graph"] is False
    # the facts: one capture (epoch 1, step 1), replays of every other full batch, eager first and last steps
    assert (segment["graph_captures"], segment["graph_replays"], segment["eager_steps"]) == (1, 2 * (steps - 1) - 1, 3)
    assert [g["lr"] for g in graphed["history"]] == [e["lr"] for e in eager["history"]]
    assert _mismatches(graphed, eager) == []
    assert graphed["history"][0]["method"].keys() == eager["history"][0]["method"].keys()


def test_a_learning_rate_read_as_a_python_float_at_capture_is_caught(eager_kd, tiny_config, tmp_path, monkeypatch):
    def float_rate(params, *, lr, momentum, weight_decay, graph, device):
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay, fused=graph)

    monkeypatch.setattr(engine_device, "resolve_graph", lambda graph, device: True)
    monkeypatch.setattr(engine_run, "make_optimizer", float_rate)
    frozen = _train(tiny_config, tmp_path, "frozen-lr")
    assert frozen["segments"][-1]["graph_replays"] > 0
    assert [e for e, *_ in _mismatches(frozen, eager_kd)] and all(e == 2 for e, *_ in _mismatches(frozen, eager_kd))


def test_warm_up_steps_that_are_not_undone_are_caught(eager_kd, tiny_config, tmp_path, monkeypatch):
    monkeypatch.setattr(engine_device, "resolve_graph", lambda graph, device: True)
    monkeypatch.setattr(capture, "_restored", lambda *args: contextlib.nullcontext())
    assert _mismatches(_train(tiny_config, tmp_path, "not-undone"), eager_kd)


class EpochInPython(Method):
    """A loss scaled by the epoch number read in Python: frozen at its capture-time value in a graph."""

    name = "epoch_in_python"

    def forward(self, student_logits, teacher_logits, targets, ctx):
        return {"loss_ce": (1.0 + ctx.epoch) * torch.nn.functional.cross_entropy(student_logits, targets)}


def test_a_method_reading_the_epoch_in_python_is_caught(tiny_config, tmp_path, monkeypatch):
    monkeypatch.setitem(_REGISTRY, "epoch_in_python", EpochInPython)
    eager = _train(tiny_config, tmp_path, "eager", method="epoch_in_python", milestones=[])
    monkeypatch.setattr(engine_device, "resolve_graph", lambda graph, device: True)
    graphed = _train(tiny_config, tmp_path, "graphed", method="epoch_in_python", milestones=[])
    assert [e for e, *_ in _mismatches(graphed, eager)] and _mismatches(graphed, eager)[0][0] == 2


# -- graphs are released ---------------------------------------------------------------------------------------
class LiveGraphCounter(Method):
    name = "live_graph_counter"
    seen: list = []

    def forward(self, student_logits, teacher_logits, targets, ctx):
        LiveGraphCounter.seen.append(capture.live_graphs())
        return {"loss_ce": torch.nn.functional.cross_entropy(student_logits, targets)}


def test_several_runs_in_one_process_keep_at_most_one_runs_graphs(tiny_config, tmp_path, monkeypatch):
    monkeypatch.setitem(_REGISTRY, "live_graph_counter", LiveGraphCounter)
    monkeypatch.setattr(engine_device, "resolve_graph", lambda graph, device: True)
    LiveGraphCounter.seen = []
    for k in range(3):
        metrics = _train(tiny_config, tmp_path, f"run{k}", method="live_graph_counter", epochs=1, seed=k)
        assert metrics["segments"][-1]["graph_captures"] == 1
        assert capture.live_graphs() == 0  # released when the run ended
    assert max(LiveGraphCounter.seen) == 1 and 1 in LiveGraphCounter.seen[-3:]
