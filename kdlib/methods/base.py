"""The contract between the training engine and every distillation method.

A method is a :class:`torch.nn.Module` that turns one batch of logits into named, already weighted loss
terms; the engine sums the terms, back-propagates and logs each one. Everything method-specific lives in
the method's own file: the engine has no ``if method == ...`` anywhere.

* ``forward(student_logits, teacher_logits, targets, ctx)`` returns ``{"loss_ce": ..., "loss_kd": ...}``.
  ``ctx`` is a :class:`StepContext`: the epoch (counted from 1, as in mdistiller, so DKD's warm-up
  ``min(epoch / 20, 1)`` reads the same), the step, the training progress, the dataset indices of the
  samples (CWKD and DLKD keep per-class or per-sample state) and the logits of extra views (MLKD).
* The step may be captured once as a CUDA graph and replayed: ``forward`` must not read a tensor on the
  host, branch on a tensor's value or make shapes that depend on data, and must read anything that varies
  during a run from ``ctx.progress`` or from tensors updated in place. A method that cannot declares
  ``graph_safe = False`` and its runs step eagerly. ``kdlib.engine.capture.check_capture_safety`` runs
  one step under a check that names the first offending operation and line.
* Trainable parts (AEKT's serial C x C layer) are ordinary sub-modules: the engine adds
  ``method.parameters()`` to the optimizer and ``method.state_dict()`` to every checkpoint.
  State that is not a tensor goes through ``get_extra_state``/``set_extra_state``.
* ``setup(ctx)`` runs once before training with a :class:`SetupContext` (teacher, student, training
  images, a batched predict function): DLKD prunes its teacher and scores every training sample here.
* ``end_epoch(epoch)`` returns JSON-serialisable facts for that epoch's history row (CWKD's hard-class
  set); ``artifacts()`` returns arrays the engine saves next to the run's metrics (DLKD's difficulties).
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Dict, Optional, Tuple, Union

import torch
from torch import Tensor, nn

from kdlib.errors import KDLibError


def progress_at(epoch: int, step: int, steps_per_epoch: int) -> float:
    """Training progress in epochs including this step: ``(epoch - 1) + (step + 1) / steps_per_epoch``
    (epochs counted from 1, steps from 0); the last step of epoch ``e`` gives exactly ``e``."""
    return (epoch - 1) + (step + 1) / max(steps_per_epoch, 1)


@dataclass
class StepContext:
    """Where the engine is when it asks a method for its loss."""

    epoch: int  # 1-based
    step: int  # 0-based within the epoch
    steps_per_epoch: int
    epochs: int
    indices: Optional[Tensor] = None  # dataset indices of the batch's samples (int64, on the device)
    #: training progress in epochs including this step (:func:`progress_at`): a float eagerly, a 0-dim
    #: float32 device tensor updated in place before every replay in CUDA-graph mode. Anything that varies
    #: during a run is computed from it (or from buffers), never from ``epoch``/``step``, which a captured
    #: graph freezes.
    progress: Union[float, Tensor, None] = None
    #: the logits of the extra views the method declared (``Method.extra_views``):
    #: view name -> (student logits, teacher logits)
    extra_logits: Dict[str, Tuple[Tensor, Optional[Tensor]]] = field(default_factory=dict)

    def __post_init__(self):
        if self.progress is None:  # the progress of this step
            self.progress = progress_at(self.epoch, self.step, self.steps_per_epoch)

    @property
    def global_step(self) -> int:
        return (self.epoch - 1) * self.steps_per_epoch + self.step


@dataclass
class SetupContext:
    """What a method may look at once, before the first epoch."""

    num_classes: int
    student: nn.Module
    teacher: Optional[nn.Module]
    train_images: Tensor  # uint8 (N, 3, 32, 32), un-augmented, on the training device
    train_labels: Tensor  # int64 (N,)
    # predict(model, uint8 images) -> logits (N, C) computed in fp32 whatever the run's amp (a score that
    # steers training must not be ranked by bf16 rounding): eval mode, no grad, normalised, batched.
    predict: Callable[[nn.Module, Tensor], Tensor]
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    epochs: int = 1


class Method(nn.Module):
    """Base class of every distillation method. Subclasses set ``name`` and implement ``forward``."""

    name: ClassVar[str] = ""
    uses_teacher: ClassVar[bool] = True
    #: the hyperparameters and their defaults, in the order the book's tables show them
    defaults: ClassVar[Dict[str, Any]] = {}
    #: extra augmented views: name -> ``fn(images_u8 (B,3,32,32) uint8 un-augmented, generator) ->
    #: uint8 (B,3,32,32)``. The engine runs the student and the live teacher on each and passes
    #: ``ctx.extra_logits[name] = (student_logits, teacher_logits)``. The function runs inside the step,
    #: so it must be capturable too (tensor operations on the whole batch, no host reads).
    extra_views: ClassVar[Dict[str, Callable]] = {}
    #: False when ``forward`` cannot be captured in a CUDA graph (it reads a tensor on the host, or its
    #: shapes depend on data); the engine then runs this method's steps eagerly and says so in the log
    graph_safe: ClassVar[bool] = True
    #: per teacher/student pair values of a hyperparameter, as data: ``{"beta": {(teacher, student): 2.0}}``
    #: (DKD's tuned beta); a pair not in the table keeps ``defaults``, and a value the user sets wins
    per_pair: ClassVar[Dict[str, Dict[Tuple[str, str], Any]]] = {}

    def __init__(self, **hyperparameters: Any) -> None:
        super().__init__()
        unknown = set(hyperparameters) - set(self.defaults)
        if unknown:
            raise KDLibError(
                f"method {self.name!r} has no hyperparameter {', '.join(sorted(map(repr, unknown)))}; "
                f"valid: {', '.join(self.defaults) or '(none)'}"
            )
        self.hparams: Dict[str, Any] = {**self.defaults, **hyperparameters}

    # -- hooks the engine calls ---------------------------------------------------------------
    @classmethod
    def recipe(cls, teacher: Optional[str], student: str) -> Dict[str, Any]:
        """Recipe fields (``RunConfig`` names, e.g. ``lr``) where the method's authors ran another recipe
        than the shared one; applied by ``RunConfig.resolved`` to fields the user left unset (None)."""
        return {}

    def check_num_classes(self, num_classes: int) -> None:
        """Raise :class:`KDLibError` if the hyperparameters cannot work with ``num_classes`` classes
        (e.g. ReKD's K >= C). Called by config validation, before anything is trained."""

    def setup(self, ctx: SetupContext) -> Dict[str, Any]:
        """Called once before training; returns facts to record in the run's config (may be empty)."""
        return {}

    def forward(self, student_logits: Tensor, teacher_logits: Optional[Tensor], targets: Tensor,
                ctx: StepContext) -> Dict[str, Tensor]:
        raise NotImplementedError

    def start_epoch(self, epoch: int) -> None:
        """Called before an epoch's first step, outside any graph. State that changes here must be
        updated in place (``fill_``, ``copy_``), never rebound, so that a captured graph sees it."""

    def end_epoch(self, epoch: int) -> Dict[str, Any]:
        """Called after each training epoch; the result goes into that epoch's history row."""
        return {}

    def artifacts(self) -> Dict[str, Any]:
        """Arrays worth keeping with the run (saved by the engine as ``method_artifacts.npz``)."""
        return {}

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.hparams.items())


# -- validation helpers shared by the methods ---------------------------------------------------
def _check_number(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise KDLibError(f"{name} must be a number, got {value!r}")


def check_positive(name: str, value: float) -> float:
    _check_number(name, value)
    if not value > 0:
        raise KDLibError(f"{name} must be > 0, got {value!r}")
    return float(value)


def check_nonnegative(name: str, value: float) -> float:
    _check_number(name, value)
    if not value >= 0:
        raise KDLibError(f"{name} must be >= 0, got {value!r}")
    return float(value)


def check_int(name: str, value: Any, minimum: int = 1) -> int:
    """An integer >= ``minimum``; integral floats (5.0 from a config file) are accepted."""
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and float(value).is_integer()
    if not ok or value < minimum:
        raise KDLibError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def check_bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise KDLibError(f"{name} must be true or false, got {value!r}")
    return value


def check_choice(name: str, value: Any, choices) -> Any:
    if value not in choices:
        raise KDLibError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")
    return value


def warmup_progress(ctx: Any) -> Any:
    """Training progress in epochs including the current step (:func:`progress_at`).

    ``ctx.progress`` when the engine provides it (a float, or a 0-dim tensor in CUDA-graph mode);
    computed from the :class:`StepContext` otherwise; a bare epoch number stands for the end of that epoch.
    """
    progress = getattr(ctx, "progress", None)
    if progress is not None:
        return progress
    if isinstance(ctx, StepContext):
        return progress_at(ctx.epoch, ctx.step, ctx.steps_per_epoch)
    return ctx  # an epoch number


def warmup_by_epoch(warmup_epochs: float) -> bool:
    """Whether the warm-up ramps by whole epochs (the papers' rule) rather than by step.

    By epoch exactly when the warm-up spans a whole number of epochs, at least 2: then ``min(e / W, 1)``
    by epoch still ramps (epoch 1 trains at ``1/W`` of the weight) and the papers' profile (W = 20 of 240
    epochs) reads exactly as mdistiller's ``min(epoch / 20, 1)``. A shorter or fractional warm-up (the
    scaled recipe of short runs: a third of an epoch in the 4-epoch smoke profile) ramps per step instead, because
    by epoch the weight would already be 1 in the first epoch and the warm-up would do nothing.
    """
    w = float(warmup_epochs)
    return w >= 2 and w.is_integer()


def warmup_factor(ctx: Any, warmup_epochs: float) -> Any:
    """The distillation weight's linear warm-up, ``min(progress / W, 1)`` (0 disables it).

    ``ctx``: a :class:`StepContext` (or anything with ``progress``), or an epoch number counted from 1.
    By epoch (``progress`` rounded up to whole epochs, the papers' ``min(e / 20, 1)``) when
    :func:`warmup_by_epoch` says so, else per step. A tensor progress (CUDA graphs) gives a tensor: the
    choice between the two rules depends on ``W`` only, never on the data.
    """
    if warmup_epochs <= 0:
        return 1.0
    progress = warmup_progress(ctx)
    if isinstance(progress, Tensor):
        p = torch.ceil(progress) if warmup_by_epoch(warmup_epochs) else progress
        return torch.clamp(p / float(warmup_epochs), max=1.0)
    p = math.ceil(progress - 1e-9) if warmup_by_epoch(warmup_epochs) else float(progress)
    return min(p / float(warmup_epochs), 1.0)


def resize_buffers_for_load(module: nn.Module, state_dict, prefix: str, names) -> None:
    """Give the buffers ``names`` the shapes they have in ``state_dict`` before it is loaded.

    For state sized on first use (CWKD's per-class counts, DLKD's per-sample difficulties): a method
    built fresh for a resume has empty buffers, and ``load_state_dict`` refuses a shape mismatch. Call it
    from ``_load_from_state_dict`` before delegating to ``super()``.
    """
    for name in names:
        value = state_dict.get(prefix + name)
        current = getattr(module, name)
        if isinstance(value, Tensor) and value.shape != current.shape:
            setattr(module, name, torch.empty(value.shape, dtype=current.dtype, device=current.device))
