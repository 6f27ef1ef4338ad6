"""Helpers for tests of the training step: one step built as a captured run builds it (fused SGD, the
learning rate and the training progress as device tensors), on any device, without training a teacher."""
from __future__ import annotations

import copy

import torch

from kdlib import engine, methods, models
from kdlib.methods.base import SetupContext, StepContext
from kdlib.precision import resolve_amp


def random_teacher(arch: str = "resnet8", device="cpu", seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    teacher = models.create(arch).eval().to(device=device, memory_format=torch.channels_last)
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


def graph_mode_step(name: str, data, teacher, *, teacher_logits="live", device="cpu", amp="auto", graph=True,
                    lr: float = 0.05, seed: int = 1, **hparams) -> engine.TrainingStep:
    """The step of method ``name`` on ``data`` (an ImageDataset on ``device``): ``teacher_logits`` is
    "live", or a teacher-logit source; ``graph`` picks the optimizer a captured (or an eager) run uses."""
    device = torch.device(device)
    method = methods.build(name, **hparams).to(device)
    teacher = copy.deepcopy(teacher) if method.uses_teacher else None
    torch.manual_seed(seed)
    student = models.create("resnet8").to(device=device, memory_format=torch.channels_last)
    method.setup(SetupContext(num_classes=data.num_classes, student=student, teacher=teacher,
                              train_images=data.train_images, train_labels=data.train_labels,
                              predict=lambda m, u8: engine.predict(m, u8, 64, True), device=device, epochs=2))
    optimizer = engine.make_optimizer(list(student.parameters()) + list(method.parameters()), lr=lr,
                                      momentum=0.9, weight_decay=5e-4, graph=graph, device=device)
    live = engine.LiveTeacher(teacher, device) if teacher is not None else None
    source = live if isinstance(teacher_logits, str) else teacher_logits
    return engine.TrainingStep(images_u8=data.train_images, labels=data.train_labels, forward=student,
                               method=method, optimizer=optimizer, teacher_logits=source if teacher is not None else None,
                               teacher=teacher, device=device, amp=resolve_amp(amp, device, graph),
                               channels_last=True, teacher_amp="none")


def capture_inputs(step: engine.TrainingStep, batch: int):
    """Static inputs of a capture at epoch 1, step 1, and the generators and sums it uses."""
    device = step.device
    gen = torch.Generator(device=device).manual_seed(2)
    view_gen = torch.Generator(device=device).manual_seed(3) if step.extra_views else None
    indices = torch.arange(batch, device=device)
    ctx = StepContext(epoch=1, step=1, steps_per_epoch=2, epochs=2, indices=indices,
                      progress=torch.tensor(1.0, dtype=torch.float32, device=device))
    return indices, gen, ctx, engine.EpochSums(device), view_gen
