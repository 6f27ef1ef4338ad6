"""One training step, from the uint8 dataset on the device to the epoch's sums; the steps of an epoch.

Follow an epoch through :meth:`EpochLoop.run_epoch`, then one batch through :meth:`TrainingStep.__call__`:

1. **shuffle**: a permutation of the training set drawn from a CPU generator seeded by (seed, epoch),
   moved to the device once per epoch; each step takes the next ``batch_size`` indices of it;
2. **batch**: the rows of the uint8 training images and labels (``index_select``: a gather on the device,
   no host copy); a crop offset and a flip per image drawn from the epoch's augmentation generator
   (:func:`kdlib.data.random_crop_flip`), then float32 ``(x/255 - mean)/std`` with the statistics made once
   on the device; each *extra view* a method declares (``Method.extra_views``, e.g. MLKD's strong
   augmentation) is cut from the same raw images with the epoch's view generator;
3. **forward**: the student (bf16 autocast if ``amp``), logits cast to float32;
4. **teacher logits**: from the run's source (:mod:`kdlib.teacher_logits`: the live teacher, or the exact
   cache keyed by the crop and flip); on extra views always the live teacher (the cache covers only the
   normal view); then the student on each extra view;
5. **loss**: the method turns the logits into named loss terms (it reads the schedule from
   ``ctx.progress``), the engine sums them;
6. **backward** and 7. **optimizer**: ``zero_grad``, ``backward``, ``optimizer.step()``;
8. **epoch sums**: loss, terms, correct predictions and the first non-finite step accumulate on the device,
   read once per epoch.

The same function runs eagerly (CPU, ``graph=false``, the first step of a run, the last partial batch)
and is captured once into a CUDA graph and replayed (:class:`kdlib.engine.capture.GraphedStep`, a thin
wrapper around it), so the graphed step cannot drift from the eager one. A capture that fails does not
stop the run: the loop logs why, records it and steps eagerly on from the same state.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn

from kdlib.engine.capture import GraphedStep
from kdlib.engine.device import autocast
from kdlib.engine.rng import STREAM_AUGMENT, STREAM_SHUFFLE, STREAM_VIEWS, epoch_generator
from kdlib.errors import KDLibError
from kdlib.methods.base import StepContext, progress_at
from kdlib.teacher_logits import LiveTeacher, ViewKeys

__all__ = ["EpochSums", "TrainingStep", "EpochLoop", "make_optimizer", "check_extra_views"]


class EpochSums:
    """Loss, loss terms, correct predictions and the first non-finite step, summed on the device.

    Nothing here synchronises with the host; :meth:`read` does, once per epoch. In graph mode one object
    lives for the whole run (the graph adds into its tensors) and :meth:`reset` zeroes it in place.
    """

    def __init__(self, device):
        self.device = torch.device(device)
        self.count = 0
        self.loss = torch.zeros((), device=self.device)
        self.terms: Dict[str, Tensor] = {}
        self.correct = torch.zeros((), dtype=torch.int64, device=self.device)
        self.first_bad = torch.full((), -1, dtype=torch.int64, device=self.device)

    @torch.no_grad()
    def add(self, loss: Tensor, terms: Dict[str, Tensor], logits: Tensor, targets: Tensor, step) -> None:
        """Add one batch; ``step`` is an int, or a 0-dim int64 device tensor inside a graph."""
        n = int(targets.shape[0])
        self.count += n
        loss = loss.detach().float()
        self.loss += loss * n
        for name, value in terms.items():
            if name not in self.terms:  # (setdefault would allocate a tensor every step)
                self.terms[name] = torch.zeros((), device=self.device)
            self.terms[name].add_(value.detach().float() * n)
        self.correct += (logits.detach().argmax(dim=1) == targets).sum()
        at = step if isinstance(step, Tensor) else torch.full_like(self.first_bad, step)
        # in place: inside a graph the tensor the graph writes must stay the one read() reads
        self.first_bad.copy_(torch.where((self.first_bad < 0) & ~torch.isfinite(loss), at, self.first_bad))

    @torch.no_grad()
    def reset(self) -> None:
        self.count = 0
        self.loss.zero_()
        for value in self.terms.values():
            value.zero_()
        self.correct.zero_()
        self.first_bad.fill_(-1)

    def read(self) -> Dict[str, Any]:
        """``train_loss``, each term (sample means), ``train_acc`` (%) and ``bad_step`` (-1: all finite)."""
        n = max(self.count, 1)
        out: Dict[str, Any] = {"train_loss": float(self.loss) / n}
        out.update({name: float(value) / n for name, value in self.terms.items()})
        out["train_acc"] = 100.0 * int(self.correct) / n
        out["bad_step"] = int(self.first_bad)
        return out


def make_optimizer(params, *, lr: float, momentum: float, weight_decay: float, graph: bool,
                   device) -> torch.optim.Optimizer:
    """SGD (no Nesterov) over ``params``. For a captured step: fused SGD with the learning rate as a
    float32 device tensor, which the fused kernel reads at run time, so the rate can change between
    epochs without a new capture (the foreach/for-loop paths would read a tensor rate on the host)."""
    if graph:
        rate = torch.tensor(float(lr), dtype=torch.float32, device=device)
        return torch.optim.SGD(params, lr=rate, momentum=momentum, weight_decay=weight_decay, nesterov=False,
                               fused=True)
    return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=False)


def check_extra_views(method: nn.Module, teacher: Optional[nn.Module], images: Optional[Tensor]) -> None:
    """Refuse, before training, a method whose extra views this run cannot make: a view is cut from the raw
    uint8 training images, and a method that uses a teacher needs the live teacher network on it (teacher
    logits alone, e.g. a cache, cannot give a second view)."""
    names = list(getattr(method, "extra_views", {}) or {})
    if not names:
        return
    label = getattr(method, "name", type(method).__name__)
    if not isinstance(images, Tensor) or images.dtype != torch.uint8 or images.dim() != 4:
        raise KDLibError(f"method {label!r} needs a second view ({', '.join(names)}) made from the raw "
                         f"uint8 training images, which this dataset does not provide")
    if getattr(method, "uses_teacher", True) and teacher is None:
        raise KDLibError(f"method {label!r} needs the live teacher network for its {', '.join(names)} view "
                         f"(teacher logits alone cannot give a second view)")


class TrainingStep:
    """Everything one step of a run needs, built once: data on the device, networks, method, optimizer.

    ``step(indices, generator, ctx, sums, view_generator, step_number)`` runs one batch (the module
    docstring follows it); ``step_number`` is a device tensor when captured (else ``ctx.step`` is used).
    """

    def __init__(self, *, images_u8: Tensor, labels: Tensor, forward: nn.Module, method: nn.Module,
                 optimizer: torch.optim.Optimizer, teacher_logits: Optional[Callable], teacher: Optional[nn.Module],
                 device: torch.device, amp: str, channels_last: bool, teacher_amp: Optional[str] = None):
        from kdlib.data import CIFAR100_MEAN, CIFAR100_STD

        self.images_u8, self.labels = images_u8, labels
        self.forward, self.method, self.optimizer = forward, method, optimizer
        self.teacher_logits, self.device, self.amp, self.channels_last = teacher_logits, device, amp, channels_last
        self.extra_views: Dict[str, Callable] = dict(getattr(method, "extra_views", {}) or {})
        # extra views always see the live teacher (the exact cache holds only the normal view's logits)
        # ``teacher_amp``: the teacher's precision when it differs from the student's (float32 on a CPU)
        self.view_teacher = (LiveTeacher(teacher, device, amp if teacher_amp is None else teacher_amp)
                             if teacher is not None and self.extra_views else None)
        self.mean = torch.tensor(CIFAR100_MEAN, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(CIFAR100_STD, device=device).view(1, 3, 1, 1)
        self.cache_autocast = True

    def normalize(self, views_u8: Tensor) -> Tensor:
        """:func:`kdlib.data.normalize` with the statistics already on the device (same operations, same bits)."""
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        return views_u8.contiguous(memory_format=fmt).float().div_(255).sub_(self.mean).div_(self.std)

    def state_tensors(self) -> List[Tensor]:
        """Every tensor a step changes (weights, statistics, method state, optimizer state): what a capture
        restores in place after its warm-up steps."""
        modules = [self.method, self.forward]
        tensors = [t for m in modules for t in list(m.parameters()) + list(m.buffers())]
        return tensors + [v for state in self.optimizer.state.values() for v in state.values() if isinstance(v, Tensor)]

    def __call__(self, indices: Tensor, generator: torch.Generator, ctx: StepContext,
                 sums: Optional[EpochSums] = None, view_generator: Optional[torch.Generator] = None,
                 step_number: Optional[Tensor] = None) -> Tensor:
        from kdlib.data import random_crop_flip

        # 2. batch: the rows, a crop and flip each, normalised; the extra views cut from the same rows
        raw = self.images_u8.index_select(0, indices)
        views_u8, offsets, flips = random_crop_flip(raw, generator)
        x, y = self.normalize(views_u8), self.labels.index_select(0, indices)
        view_generator = generator if view_generator is None else view_generator
        extra = {name: self._extra_view(name, make_view, raw, view_generator)
                 for name, make_view in self.extra_views.items()}
        # 3. forward: the student, float32 logits
        with autocast(self.device, self.amp, self.cache_autocast):
            s_logits = self.forward(x)
        s_logits = s_logits.float()
        # 4. teacher logits from the run's source; the live teacher and the student on each extra view
        keys = ViewKeys(indices, offsets, flips)
        t_logits = self.teacher_logits(x, keys) if self.teacher_logits is not None else None
        if extra:
            ctx.extra_logits = {name: self._extra_logits(xv) for name, xv in extra.items()}
        # 5. loss: the method's named terms, summed
        terms = self.method(s_logits, t_logits, y, ctx)
        if not terms:
            raise KDLibError(f"method {getattr(self.method, 'name', type(self.method).__name__)!r} returned no "
                             f"loss terms")
        loss = sum(terms.values())
        # 6. backward, 7. optimizer
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        # 8. epoch sums, on the device
        if sums is not None:
            sums.add(loss, terms, s_logits, y, ctx.step if step_number is None else step_number)
        return loss

    def _extra_view(self, name: str, make_view: Callable, raw: Tensor, generator: torch.Generator) -> Tensor:
        view = make_view(raw, generator)
        if view.dtype != torch.uint8 or view.shape != raw.shape:
            raise KDLibError(f"extra view {name!r} must return uint8 {tuple(raw.shape)}, got "
                             f"{view.dtype} {tuple(view.shape)}")
        return self.normalize(view)

    def _extra_logits(self, x: Tensor) -> Tuple[Tensor, Optional[Tensor]]:
        with autocast(self.device, self.amp, self.cache_autocast):
            student = self.forward(x)
        return student.float(), self.view_teacher(x, None) if self.view_teacher is not None else None


class EpochLoop:
    """The steps of a run's epochs: shuffle, then each batch eagerly or by replaying the captured step.

    With ``graph``: one generator per random stream for the whole run, re-seeded by (seed, epoch) in place
    (the graph holds on to the generator objects it was captured with), one :class:`EpochSums` reset per
    epoch, and a context whose progress is a device tensor. The first full batch after the first step is
    captured (the momentum buffers a fused-SGD capture needs exist then); if the capture fails, the loop
    logs why (``fallback``) and steps eagerly on. ``captures``, ``replays`` and ``eager_steps`` count what
    happened. :meth:`release` frees the graph at the end of the run.
    """

    def __init__(self, step: TrainingStep, *, seed: int, batch_size: int, epochs: int, graph: bool,
                 log: Callable[[str], None] = lambda message: None):
        self.step, self.seed, self.batch_size, self.epochs, self.log = step, seed, batch_size, epochs, log
        self.device = step.device
        self.num_images = int(step.images_u8.shape[0])
        self.steps_per_epoch = max(1, math.ceil(self.num_images / batch_size))
        self.graph = graph
        self.graphed: Optional[GraphedStep] = None
        self.captures = self.replays = self.eager_steps = 0
        self.fallback: Optional[str] = None
        views = bool(step.extra_views)
        self.persistent = graph
        if graph:
            self.augment = torch.Generator(device=self.device)
            self.view_generator = torch.Generator(device=self.device) if views else None
            self.sums = EpochSums(self.device)
            self.ctx = StepContext(epoch=0, step=0, steps_per_epoch=self.steps_per_epoch, epochs=epochs,
                                   progress=torch.zeros((), dtype=torch.float32, device=self.device))
        self._has_views = views

    def start_epoch(self, epoch: int) -> Tuple[Tensor, EpochSums]:
        """1. shuffle: the epoch's permutation (on the device) and its generators and sums."""
        perm = torch.randperm(self.num_images, generator=epoch_generator(self.seed, epoch, STREAM_SHUFFLE))
        perm = perm.to(self.device)
        if self.persistent:
            seed_of = lambda stream: epoch_generator(self.seed, epoch, stream).initial_seed()  # noqa: E731
            self.augment.manual_seed(seed_of(STREAM_AUGMENT))
            if self.view_generator is not None:
                self.view_generator.manual_seed(seed_of(STREAM_VIEWS))
            self.sums.reset()
            return perm, self.sums
        self.augment = epoch_generator(self.seed, epoch, STREAM_AUGMENT, device=self.device)
        self.view_generator = (epoch_generator(self.seed, epoch, STREAM_VIEWS, device=self.device)
                               if self._has_views else None)
        return perm, EpochSums(self.device)

    def run_epoch(self, epoch: int, *, steps: Optional[int] = None, stop: Optional[Dict[str, Any]] = None,
                  on_step: Optional[Callable[[], None]] = None) -> EpochSums:
        """The steps of ``epoch`` (all, or the first ``steps``); stops early when ``stop["signum"]`` is set."""
        perm, sums = self.start_epoch(epoch)
        bs = self.batch_size
        for s in range(self.steps_per_epoch if steps is None else min(steps, self.steps_per_epoch)):
            self.run_step(epoch, s, perm[s * bs:(s + 1) * bs], sums)
            if on_step is not None:
                on_step()
            if stop is not None and stop.get("signum") is not None:
                break
        return sums

    def run_step(self, epoch: int, step: int, indices: Tensor, sums: EpochSums) -> None:
        progress = progress_at(epoch, step, self.steps_per_epoch)
        full = int(indices.shape[0]) == self.batch_size
        if self.graph and full and (self.graphed is not None or self.step.optimizer.state):
            if self.graphed is None:
                self._capture(epoch, step, indices, progress)
            if self.graphed is not None:
                self.graphed.replay(indices, step, progress)
                self.replays += 1
                return
        # eager: CPU, graph=false, the run's very first step (it creates the momentum buffers a fused
        # SGD capture needs), the last partial batch of an epoch (never padded: BatchNorm would see it),
        # and every step after a capture that failed
        ctx = StepContext(epoch=epoch, step=step, steps_per_epoch=self.steps_per_epoch, epochs=self.epochs,
                          indices=indices, progress=progress)
        self.step(indices, self.augment, ctx, sums, self.view_generator)
        self.eager_steps += 1

    def _capture(self, epoch: int, step: int, indices: Tensor, progress: float) -> None:
        """Capture the step now (resumed, warmed up); on failure keep the state and step eagerly on."""
        self.ctx.epoch, self.ctx.step = epoch, step
        self.ctx.progress.fill_(progress)
        try:
            self.graphed = GraphedStep(self.step, state=self.step.state_tensors(), sums=self.sums,
                                       batch_size=self.batch_size, device=self.device,
                                       generators=(self.augment, self.view_generator), ctx=self.ctx,
                                       first_indices=indices)
            self.captures += 1
        except Exception as exc:  # noqa: BLE001 - any capture failure: the run goes on eagerly
            self.graph, self.fallback = False, f"{type(exc).__name__}: {exc}"
            self.log(f"graph capture failed, eager steps from here (same state): {self.fallback}")

    def counts(self) -> Dict[str, Any]:
        """What happened, for the run's records: captures, replays, eager steps, the fallback reason."""
        return {"graph_captures": self.captures, "graph_replays": self.replays, "eager_steps": self.eager_steps,
                "graph_fallback": self.fallback}

    def release(self) -> None:
        """Free the captured graph (the end of the run: at most one run's graphs are alive)."""
        if self.graphed is not None:
            self.graphed.release()
            self.graphed = None
