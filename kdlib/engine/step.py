"""One training step, from the uint8 dataset on the device to the optimizer step; and its CUDA-graph capture.

Follow one batch through :meth:`TrainingStep.__call__`:

1. ``indices`` (int64 on the device, a slice of the epoch's permutation) select rows of the uint8
   training images and labels (``index_select``: a gather on the device, no host copy);
2. :func:`kdlib.data.random_crop_flip` draws a crop offset and a flip per image from the epoch's
   augmentation generator and cuts the views (uint8), then :meth:`TrainingStep.normalize` turns them into
   float32 ``(x/255 - mean)/std`` (mean/std are device tensors made once: creating them from Python
   lists every step would be a host-to-device copy, forbidden inside a graph);
3. each *extra view* a method declares (``Method.extra_views``, e.g. MLKD's strong augmentation) is cut
   from the same raw images with the epoch's view generator;
4. the student's forward (bf16 autocast if ``amp``), logits cast to float32;
5. the teacher's logits from the run's source (:mod:`kdlib.teacher_logits`: the live teacher, or the exact
   cache); on extra views always the live teacher (the cache covers only the normal view);
6. the method turns the logits into named loss terms (it reads the schedule from ``ctx.progress``), the
   engine sums them;
7. ``zero_grad``, backward, ``optimizer.step()``;
8. the epoch's sums (loss, terms, correct predictions, first non-finite step) accumulate on the device.

The same function runs eagerly (CPU, or ``graph=false``) and is captured once per shape into a CUDA graph
(:class:`GraphedStep`), so the graphed step cannot drift from the eager one.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional

import torch
from torch import Tensor, nn

from kdlib.engine.device import autocast
from kdlib.errors import KDLibError
from kdlib.teacher_logits import LiveTeacher, Views, is_capturable

__all__ = ["make_batch", "EpochSums", "train_step", "TrainingStep", "GraphedStep", "graph_blockers",
           "live_graphs"]


# -- the pieces --------------------------------------------------------------------------------------
def make_batch(images_u8: Tensor, labels: Tensor, indices: Tensor, generator: torch.Generator,
               channels_last: bool = False):
    """The augmented, normalised batch of ``indices``: ``(x float32, y int64, Views)``.

    Random crop + flip drawn from ``generator`` (on the images' device), then the CIFAR-100 normalisation.
    """
    from kdlib.data import normalize, random_crop_flip

    views_u8, offsets, flips = random_crop_flip(images_u8.index_select(0, indices), generator)
    x = normalize(views_u8, channels_last)  # the layout changes on uint8: same values, a quarter of the bytes
    return x, labels.index_select(0, indices), Views(indices, offsets, flips)


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


def train_step(forward: nn.Module, method: nn.Module, optimizer: torch.optim.Optimizer, x: Tensor, y: Tensor,
               views: Optional[Views], teacher_logits: Optional[Callable[[Tensor, Views], Tensor]], ctx, *,
               device: torch.device, amp: str = "none", sums: Optional[EpochSums] = None,
               extra: Optional[Dict[str, Tensor]] = None, view_teacher: Optional[Callable] = None,
               step=None, cache_autocast: bool = True) -> Tensor:
    """One SGD step on a prepared batch: student forward (autocast if ``amp``), float32 logits to the
    method, the sum of its terms, backward, optimizer step, epoch sums.

    ``extra`` maps extra-view names to their normalised batches; the student and ``view_teacher`` (the
    live teacher) run on each and the method receives ``ctx.views[name] = (student, teacher logits)``.
    """
    with autocast(device, amp, cache_autocast):
        s_logits = forward(x)
    s_logits = s_logits.float()
    t_logits = teacher_logits(x, views) if teacher_logits is not None else None
    if extra:
        ctx.views = {}
        for name, xv in extra.items():
            with autocast(device, amp, cache_autocast):
                sv = forward(xv)
            ctx.views[name] = (sv.float(), view_teacher(xv, None) if view_teacher is not None else None)
    terms = method(s_logits, t_logits, y, ctx)
    if not terms:
        raise KDLibError(f"method {getattr(method, 'name', type(method).__name__)!r} returned no loss terms")
    loss = sum(terms.values())
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    if sums is not None:
        sums.add(loss, terms, s_logits, y, ctx.step if step is None else step)
    return loss


# -- the step of a run ---------------------------------------------------------------------------------
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

    ``step(indices, generator, ctx, sums)`` runs one batch (see the module docstring for its path).
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

    def batch(self, indices: Tensor, generator: torch.Generator, view_generator: Optional[torch.Generator] = None):
        """``(x, y, views, extra)`` of ``indices``: the augmented, normalised batch and its extra views."""
        from kdlib.data import random_crop_flip

        raw = self.images_u8.index_select(0, indices)
        views_u8, offsets, flips = random_crop_flip(raw, generator)
        x = self.normalize(views_u8)
        extra = {}
        for name, make_view in self.extra_views.items():
            view = make_view(raw, view_generator if view_generator is not None else generator)
            if view.dtype != torch.uint8 or view.shape != raw.shape:
                raise KDLibError(f"extra view {name!r} must return uint8 {tuple(raw.shape)}, got "
                                 f"{view.dtype} {tuple(view.shape)}")
            extra[name] = self.normalize(view)
        return x, self.labels.index_select(0, indices), Views(indices, offsets, flips), extra

    def __call__(self, indices: Tensor, generator: torch.Generator, ctx, sums: Optional[EpochSums] = None,
                 view_generator: Optional[torch.Generator] = None, step=None) -> Tensor:
        x, y, views, extra = self.batch(indices, generator, view_generator)
        return train_step(self.forward, self.method, self.optimizer, x, y, views, self.teacher_logits, ctx,
                          device=self.device, amp=self.amp, sums=sums, extra=extra,
                          view_teacher=self.view_teacher, step=step, cache_autocast=self.cache_autocast)


# -- the captured step ------------------------------------------------------------------------------------
#: every graph captured in this process, kept until exit: destroying a graph can free a cuBLAS workspace
#: another live graph still uses (PyTorch issue #193402, shared/gpu-notes.md section 3)
_LIVE_GRAPHS: List[Any] = []


def live_graphs() -> int:
    return len(_LIVE_GRAPHS)


def graph_blockers(method: nn.Module, teacher_logits, compile: bool) -> List[str]:
    """Why the step of this run cannot be captured (empty: it can)."""
    reasons = []
    if not getattr(method, "graph_safe", True):
        reasons.append(f"method {getattr(method, 'name', '?')!r} declares graph_safe = False")
    if teacher_logits is not None and not is_capturable(teacher_logits):
        reasons.append("the teacher-logit source cannot run inside a graph")
    if compile:
        reasons.append("compile=true (torch.compile's own CUDA graphs do not nest in a captured step)")
    return reasons


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> List[Tensor]:
    return [v for state in optimizer.state.values() for v in state.values() if isinstance(v, Tensor)]


class GraphedStep:
    """One :class:`TrainingStep` of a fixed batch size captured as one CUDA graph, and replayed.

    Static inputs: the batch's dataset indices (``indices``, copied in before each replay), the training
    progress (``progress``, a float32 0-dim tensor, S1 of the seams) and the step number (for the
    non-finite check). The learning rate is the fused SGD's float32 device tensor, filled between epochs.
    The augmentation generators are registered with the graph, so each replay draws new crops and flips.

    Capture protocol (PyTorch's CUDA-graph notes): a few warm-up steps on a side stream (cuDNN picks its
    algorithms, lazy state is allocated), then every parameter, buffer, optimizer state tensor and
    generator state is restored *in place* (addresses must not change), then capture on that stream.
    The caller has already resumed (``load_state_dict`` makes new tensors) and made one real step, so the
    momentum buffers exist (fused SGD bakes "first step" into the capture).
    """

    def __init__(self, step: TrainingStep, sums: EpochSums, batch_size: int, generator: torch.Generator,
                 view_generator: Optional[torch.Generator], ctx, warmup: int = 3,
                 first_indices: Optional[Tensor] = None):
        device = step.device
        self.step, self.sums, self.batch_size = step, sums, batch_size
        self.indices = torch.zeros(batch_size, dtype=torch.int64, device=device)
        self.step_number = torch.zeros((), dtype=torch.int64, device=device)
        self.ctx = ctx
        self.ctx.indices = self.indices
        if first_indices is not None:  # warm up on a real batch (BatchNorm of one repeated image is odd)
            self.indices.copy_(first_indices)
        modules = [step.method, step.forward]
        tensors = [t for m in modules for t in list(m.parameters()) + list(m.buffers())]
        tensors += _optimizer_tensors(step.optimizer)
        saved = [t.detach().clone() for t in tensors]
        generators = [g for g in (generator, view_generator) if g is not None]
        gen_states = [g.get_state() for g in generators]
        sums_count, sums_saved = sums.count, {k: t.clone() for k, t in self._sum_tensors().items()}
        self.generator, self.view_generator = generator, view_generator
        # off CUDA (tests only): everything but the capture itself, replay = the same step run eagerly on
        # the static inputs, so the protocol (warm-up, in-place restore, static inputs) is tested on CPU
        self.simulated = torch.device(device).type != "cuda"
        step.cache_autocast = False
        if self.simulated:
            for _ in range(warmup):
                step(self.indices, generator, self.ctx, sums, view_generator, step=self.step_number)
        else:
            stream = torch.cuda.Stream(device)
            stream.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(stream):
                for _ in range(warmup):
                    step(self.indices, generator, self.ctx, sums, view_generator, step=self.step_number)
            torch.cuda.current_stream(device).wait_stream(stream)
            torch.cuda.synchronize(device)
        # the warm-up was not training: put every weight, statistic and state back, in place
        with torch.no_grad():
            for t, v in zip(tensors, saved):
                t.copy_(v)
            for name, t in self._sum_tensors().items():  # terms first made by the warm-up start at 0
                t.copy_(sums_saved[name]) if name in sums_saved else t.zero_()
        sums.count = sums_count
        for g, s in zip(generators, gen_states):
            g.set_state(s)
        self.graph = None
        if not self.simulated:
            self.graph = torch.cuda.CUDAGraph()
            for g in generators:  # each replay then draws new numbers from them (offsets advance)
                self.graph.register_generator_state(g)
            with torch.cuda.graph(self.graph, stream=stream):
                self.loss = step(self.indices, generator, self.ctx, sums, view_generator, step=self.step_number)
            _LIVE_GRAPHS.append(self.graph)
            sums.count = sums_count  # the capture ran no arithmetic; replays count (see replay)
        step.cache_autocast = True  # eager steps (the last partial batch) may use the autocast cache

    def _sum_tensors(self) -> Dict[str, Tensor]:
        return {"@loss": self.sums.loss, "@correct": self.sums.correct, "@first_bad": self.sums.first_bad,
                **self.sums.terms}

    def replay(self, indices: Tensor, step_number: int, progress: float) -> None:
        """One step on ``indices``: copy the static inputs in (device copies, no sync), replay."""
        self.indices.copy_(indices)
        self.step_number.fill_(step_number)
        if isinstance(self.ctx.progress, Tensor):
            self.ctx.progress.fill_(progress)
        if self.simulated:
            self.step(self.indices, self.generator, self.ctx, self.sums, self.view_generator, step=self.step_number)
            return
        self.graph.replay()
        self.sums.count += self.batch_size
        counter = getattr(self.step.teacher_logits, "count_lookups", None)
        if counter is not None:
            counter(self.batch_size)
