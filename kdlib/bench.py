"""``python -m kdlib bench``: a distillation step of this project against the usual CIFAR pipeline.

One run measures, for one teacher -> student pair at batch 64, the images per second of a KD training
step (KD loss, SGD step):

* **reference**: the pipeline of the community code bases (CRD/RepDistiller, mdistiller), written here:
  a torchvision-style CIFAR ``Dataset`` over HWC uint8 numpy images, PIL ``RandomCrop(32, padding=4)``,
  ``RandomHorizontalFlip``, ``ToTensor``, ``Normalize`` (``torchvision.transforms``), a shuffling
  ``DataLoader`` with worker processes, float32, NCHW, the live teacher under ``no_grad``, and a
  ``loss.item()`` per step for the meters;
* **kdlib**: the engine's own step (:class:`kdlib.engine.TrainingStep`, the function every run uses,
  with its per-epoch sums), the dataset resident on the device as uint8, channels-last, teacher logits
  from a warm :class:`kdlib.logit_cache.TeacherLogitCache`; float32 unless ``--amp bf16``;
* **kdlib, live teacher**: the same without the cache (where the speed-up comes from);
* **kdlib, cold cache**: the first pass over batches no entry of which is cached (lazy fill's cost);
* **kdlib, CUDA graph** (CUDA only): the engine's captured step (:class:`kdlib.engine.GraphedStep`, what
  ``graph=auto`` runs on CUDA) over the warm cache (the live teacher inside the graph if incomplete).

``--paper-run`` instead trains the engine itself (:func:`kdlib.engine.train`, teacher and KD student,
per-epoch evaluation included) for a few epochs on CIFAR-sized synthetic data (50k / 10k images, the
paper profile's networks, batch and recipe) and projects a 240-epoch run from the measured epochs.

Warm-up steps are excluded; each figure is the median of ``--repeats`` timed passes of ``--steps``
steps, the variants interleaved so that a change of load hits all of them. "Warm" means every view the
timed steps use is in the cache: on a CPU the timed batches are replayed (same permutation and views)
after a first, cold pass filled them; on a GPU (``--cache-warmup fill``) the cache is filled up front
for the images the fast path uses, so the lookup takes its synchronisation-free path.

The one-time cost of a full fill is measured separately: :meth:`TeacherLogitCache.fill` over
``--fill-images`` images (all 162 views each), extrapolated to the profile's training set (an estimate,
labelled as such), with the number of runs of the profile's length after which it has paid for itself.
Lazy filling (the default ``teacher_cache=auto``) has no up-front cost.

Finally, each registered method's loss cost: forward + backward of its loss on (64, 100) logits,
relative to plain cross-entropy. Methods with a ``setup`` hook get a tiny one (a resnet8 teacher and 64
images); the setup itself is not timed.

Data are synthetic (CIFAR-100 shaped, :func:`kdlib.data.make_synthetic`), the networks randomly
initialised: speed does not depend on the values. Timings are medians, never used by tests.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import os
import platform
import statistics
import tempfile
import time
from datetime import datetime, timezone
from typing import Any, Callable, Dict, List, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdlib.errors import KDLibError

#: the pairs: --quick (the course profile's) and the default (the paper profile's)
QUICK_PAIR, DEFAULT_PAIR = ("resnet56", "resnet20"), ("resnet32x4", "resnet8x4")
GOALS = {"cpu": 2.0, "cuda": 10.0}
REQUIRED_KEYS = ("reference_img_s", "kdlib_img_s", "speedup", "cache_fill_seconds", "device", "pair",
                 "batch_size", "kdlib_live_teacher_img_s")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true",
                        help=f"the small pair {QUICK_PAIR[0]}->{QUICK_PAIR[1]} (course profile) and fewer steps")
    parser.add_argument("--json", action="store_true", help="print one JSON line instead of the table")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: auto)")
    parser.add_argument("--pair", help=f"TEACHER:STUDENT (default {DEFAULT_PAIR[0]}:{DEFAULT_PAIR[1]}, "
                                       f"--quick {QUICK_PAIR[0]}:{QUICK_PAIR[1]})")
    parser.add_argument("--steps", type=_positive, help="timed steps per repeat (default 20 on CPU, 200 on CUDA)")
    parser.add_argument("--repeats", type=_positive, help="timed repeats; the median is reported (3 on CPU, 5 on CUDA)")
    parser.add_argument("--warmup", type=_positive,
                        help="untimed warm-up steps per variant (3 on CPU; 30 on CUDA: cuDNN autotuning, compilation)")
    parser.add_argument("--batch-size", dest="batch_size", type=_positive, default=64, help="batch size (64)")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers of the reference (2)")
    parser.add_argument("--amp", default="none", choices=("none", "bf16"),
                        help="kdlib fast path under bf16 autocast (default none: float32)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the student (CUDA only)")
    parser.add_argument("--no-channels-last", dest="channels_last", action="store_false",
                        help="kdlib fast path in NCHW instead of channels-last")
    parser.add_argument("--cache-dtype", dest="cache_dtype", default="auto", choices=("auto", "float32", "float16", "bfloat16"),
                        help="storage of the teacher-logit cache (auto: float32, bfloat16 under --amp bf16)")
    parser.add_argument("--cache-warmup", dest="cache_warmup", choices=("replay", "fill"),
                        help="how the cache is made warm: replay the timed batches (CPU default) or fill "
                             "every view of the fast path's images up front (CUDA default)")
    parser.add_argument("--fill-images", dest="fill_images", type=_positive,
                        help="images whose 162 views time the full fill (default: 8 on CPU, 512 on CUDA)")
    parser.add_argument("--profile", help="profile whose training-set size and epochs the fill estimate and the "
                                          "break-even use (default: course with --quick, else paper)")
    parser.add_argument("--threads", type=_positive, help="torch threads (default: torch's default)")
    parser.add_argument("--no-methods", dest="methods", action="store_false",
                        help="skip the per-method loss overhead")
    parser.add_argument("--seed", type=int, default=0, help="seed of data, weights and batches (0)")
    parser.add_argument("--paper-run", dest="paper_run", action="store_true",
                        help="train the engine (teacher + KD student, evaluation included) for a few epochs on "
                             "CIFAR-sized synthetic data and project a 240-epoch paper run")
    parser.add_argument("--teacher-cache", dest="teacher_cache", default="auto", choices=("auto", "off", "lazy", "full"),
                        help="--paper-run: the student run's teacher_cache (auto: a full fill up front on CUDA; "
                             "off: the live teacher inside the graph, no fill)")


def paper_run(args: argparse.Namespace) -> Dict[str, Any]:
    """Train the engine for a few epochs at paper size on synthetic data; project 240-epoch runs.

    Teacher (vanilla, ``teacher_epochs`` measured epochs) and KD student (``epochs``) through
    :func:`kdlib.engine.train` with the paper profile's recipe, ``graph=auto`` (on for CUDA), per-epoch
    evaluation included. The first epoch of each (capture, cuDNN autotuning, allocator) is reported
    apart; the projection is ``first + 239 x median(later epochs)`` plus the teacher-logit cache fill the
    student run made (a one-time cost per teacher and data, reported separately too). ``--quick``: a tiny
    version (resnet8 -> resnet8, 10 images per class) that checks the plumbing, not the speed.
    """
    import json as _json
    from pathlib import Path

    from kdlib import engine, teachers
    from kdlib.config import make_config

    device = engine.resolve_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    epochs, teacher_epochs = (2, 2) if args.quick else (3, 2)
    size = (dict(train_per_class=10, test_per_class=2, teacher="resnet8", student="resnet8") if args.quick
            else dict(train_per_class=500, test_per_class=100))  # CIFAR-100's 50k / 10k
    pair = (size.get("teacher", "resnet32x4"), size.get("student", "resnet8x4"))
    with tempfile.TemporaryDirectory(prefix="kdlib-paper-run-") as root:
        cfg = make_config("paper", method="kd", dataset="synthetic", epochs=epochs, teacher_epochs=teacher_epochs,
                          device=str(device), teachers_dir=str(Path(root) / "teachers"),
                          out=str(Path(root) / "student"), seed=args.seed,
                          teacher_cache=getattr(args, "teacher_cache", "auto"), **size)
        t0 = time.perf_counter()
        student = engine.train(cfg, progress=False, verbose=not args.json)
        wall = time.perf_counter() - t0
        teacher_dir = teachers.teacher_path(cfg).with_suffix("")
        teacher = _json.loads((teacher_dir / engine.METRICS).read_text())

    def project(history, total: int = 240) -> Dict[str, Any]:
        secs = [row["epoch_seconds"] for row in history]
        later = secs[1:] or secs
        steady = statistics.median(later)
        return {"measured_epoch_seconds": secs, "steady_epoch_seconds": steady,
                "projected_seconds": secs[0] + (total - 1) * steady,
                "steady_img_s": statistics.median([r["images_per_second"] for r in history[1:] or history])}

    cache = student["config"].get("teacher_cache") or {}
    fill = (cache.get("fill") or {}).get("seconds")
    result = {
        "mode": "paper-run", "device": device.type,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name(),
        "pair": f"{pair[0]}:{pair[1]}", "dataset": student["config"]["dataset"]["description"],
        "graph": student["segments"][-1].get("graph"), "amp": student["segments"][-1].get("amp"),
        "teacher_cache": {k: cache.get(k) for k in ("requested", "mode", "dtype", "reason", "graph") if k in cache},
        "cache_fill_seconds": fill, "teacher": project(teacher["history"]), "student": project(student["history"]),
        "wall_seconds_measured": wall, "torch": torch.__version__,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "host": platform.node(),
        "note": "projection of 240 epochs from the measured epochs (first epoch + 239 x median of the others); "
                + ("--quick: tiny data, checks the plumbing, not a paper-size projection" if args.quick else
                   "synthetic data of CIFAR-100's size") + "; evaluation every epoch included",
    }
    result["student_projected_minutes"] = result["student"]["projected_seconds"] / 60
    result["teacher_projected_minutes"] = result["teacher"]["projected_seconds"] / 60
    return result


def _paper_table(r: Dict[str, Any]) -> str:
    lines = [f"kdlib bench --paper-run: {r['pair'].replace(':', ' -> ')} on {r['device']} ({r['device_name']}), "
             f"graph {r['graph']}, amp {r['amp']}, torch {r['torch']}, {r['date']}", f"data: {r['dataset']}"]
    for role in ("teacher", "student"):
        p = r[role]
        lines.append(f"{role:8s} epochs {', '.join(f'{x:.1f}' for x in p['measured_epoch_seconds'])} s; steady "
                     f"{p['steady_img_s']:.0f} img/s; 240 epochs projected: {p['projected_seconds'] / 60:.1f} min")
    if r.get("cache_fill_seconds") is not None:
        lines.append(f"teacher-logit cache fill (once per teacher and data): {r['cache_fill_seconds']:.0f} s")
    lines.append(r["note"])
    return "\n".join(lines)


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


# -- timing -----------------------------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(device: torch.device, fn: Callable[[], Any]) -> float:
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0


# -- (a) the reference pipeline, written the way the anchor code bases do it -------------------------
class ReferenceCIFAR(torch.utils.data.Dataset):
    """``torchvision.datasets.CIFAR100``'s ``__getitem__``: HWC uint8 numpy -> PIL image -> transform."""

    def __init__(self, images_hwc: np.ndarray, labels: np.ndarray, transform):
        self.data, self.targets, self.transform = images_hwc, [int(v) for v in labels], transform

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int):
        from PIL import Image

        img, target = self.data[index], self.targets[index]
        img = Image.fromarray(img)
        if self.transform is not None:
            img = self.transform(img)
        return img, target


def reference_transform():
    """The CIFAR-100 training transform of CRD/mdistiller."""
    import torchvision.transforms as T

    from kdlib.data import CIFAR100_MEAN, CIFAR100_STD

    return T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor(),
                      T.Normalize(CIFAR100_MEAN, CIFAR100_STD)])


def _reference_kd_loss(logits_student: Tensor, logits_teacher: Tensor, temperature: float) -> Tensor:
    """mdistiller's ``kd_loss``."""
    log_pred_student = F.log_softmax(logits_student / temperature, dim=1)
    pred_teacher = F.softmax(logits_teacher / temperature, dim=1)
    loss_kd = F.kl_div(log_pred_student, pred_teacher, reduction="none").sum(1).mean()
    return loss_kd * temperature ** 2


class _Reference:
    """A DataLoader over the PIL dataset and mdistiller's KD step (fp32, NCHW, live teacher)."""

    def __init__(self, dataset, teacher: nn.Module, student: nn.Module, device: torch.device, batch_size: int,
                 workers: int, seed: int, kd_hparams: Dict[str, float], lr: float):
        images = dataset.train_images.permute(0, 2, 3, 1).contiguous().numpy()  # HWC, as in the pickles
        data = ReferenceCIFAR(images, dataset.train_labels.numpy(), reference_transform())
        self.loader = torch.utils.data.DataLoader(
            data, batch_size=batch_size, shuffle=True, num_workers=workers, pin_memory=device.type == "cuda",
            generator=torch.Generator().manual_seed(seed))
        self.iterator = iter(self.loader)
        self.teacher, self.student, self.device = teacher, student, device
        self.optimizer = torch.optim.SGD(student.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
        self.hp = kd_hparams

    def steps(self, n: int) -> None:
        for _ in range(n):
            try:
                image, target = next(self.iterator)
            except StopIteration:  # a new epoch (the dataset is sized so that timed passes never need it)
                self.iterator = iter(self.loader)
                image, target = next(self.iterator)
            image = image.to(self.device, non_blocking=True)
            target = target.to(self.device, non_blocking=True)
            logits_student = self.student(image)
            with torch.no_grad():
                logits_teacher = self.teacher(image)
            loss = (self.hp["ce_weight"] * F.cross_entropy(logits_student, target)
                    + self.hp["kd_weight"] * _reference_kd_loss(logits_student, logits_teacher, self.hp["temperature"]))
            self.optimizer.zero_grad()
            loss.backward()
            self.optimizer.step()
            loss.item()  # the meters' per-step read (a host sync on GPUs)


# -- (b) the fast path: the engine's own step --------------------------------------------------------
class _Fast:
    """The engine's own step (:class:`kdlib.engine.TrainingStep`) over a device-resident uint8 dataset,
    batches from the engine's generators; with ``graph`` the engine's captured step
    (:class:`kdlib.engine.GraphedStep`): the first step eager (it creates the momentum buffers), then
    one capture, then replays, as :func:`kdlib.engine.train` does."""

    def __init__(self, dataset, student: nn.Module, teacher_logits, device: torch.device, batch_size: int,
                 seed: int, amp: str, channels_last: bool, compile: bool, lr: float, graph: bool = False,
                 teacher: Optional[nn.Module] = None):
        from kdlib import engine, methods

        self.engine = engine
        self.images, self.labels = dataset.train_images, dataset.train_labels
        self.device, self.bs, self.seed, self.amp, self.channels_last = device, batch_size, seed, amp, channels_last
        self.student = student
        self.method = methods.build("kd").to(device)
        self.forward = engine.compile_student(student, device, compile and not graph)
        params = list(student.parameters()) + list(self.method.parameters())
        if graph:  # as the engine builds it in graph mode: fused SGD, the rate a float32 device tensor
            self.optimizer = torch.optim.SGD(params, lr=torch.tensor(lr, device=device), momentum=0.9,
                                             weight_decay=5e-4, nesterov=False, fused=True)
        else:
            self.optimizer = torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=5e-4, nesterov=False)
        self.teacher_logits = teacher_logits
        self.step = engine.TrainingStep(images_u8=self.images, labels=self.labels, forward=self.forward,
                                        method=self.method, optimizer=self.optimizer, teacher_logits=teacher_logits,
                                        teacher=teacher, device=device, amp=amp, channels_last=channels_last)
        self.N = int(self.images.shape[0])
        self.graph = graph
        self.graphed = None
        if graph:
            from kdlib.methods.base import StepContext

            self.aug = torch.Generator(device=device)
            self.sums = engine.EpochSums(device)
            self.ctx = StepContext(epoch=1, step=0, steps_per_epoch=max(1, self.N // batch_size), epochs=1,
                                   progress=torch.zeros((), device=device))

    def epoch(self, epoch: int, steps: int) -> None:
        """``steps`` steps of the engine's epoch ``epoch`` (same permutation and views for the same epoch)."""
        from kdlib.methods.base import StepContext

        engine = self.engine
        perm = torch.randperm(self.N, generator=engine.epoch_generator(self.seed, epoch, 1)).to(self.device)
        per_epoch = max(1, self.N // self.bs)  # whole batches only: one captured shape
        if self.graph:
            self.aug.manual_seed(engine.epoch_generator(self.seed, epoch, 2).initial_seed())
            self.sums.reset()
            sums, aug = self.sums, self.aug
        else:
            aug = engine.epoch_generator(self.seed, epoch, 2, device=self.device)
            sums = engine.EpochSums(self.device)
        for step in range(steps):
            s = step % per_epoch
            idx = perm[s * self.bs:(s + 1) * self.bs]
            progress = (epoch - 1) + (s + 1) / per_epoch
            if self.graph and self.optimizer.state:
                if self.graphed is None:
                    self.graphed = engine.GraphedStep(self.step, sums, self.bs, aug, None, self.ctx, first_indices=idx)
                self.graphed.replay(idx, s, progress)
                continue
            self.step(idx, aug, StepContext(epoch=epoch, step=s, steps_per_epoch=per_epoch, epochs=max(epoch, 1),
                                            indices=idx, progress=progress), sums)
        sums.read()  # the engine reads its sums once per epoch (a host synchronisation)


# -- per-method step cost ------------------------------------------------------------------------------
def method_step_seconds(specs: Dict[str, Any], teacher: nn.Module, student: str, dataset,
                        device: torch.device, batch_size: int = 64, steps: int = 10, repeats: int = 3,
                        seed: int = 0) -> Dict[str, float]:
    """Median seconds of one whole training step of the engine (:class:`kdlib.engine.TrainingStep`) for
    each ``label: (method, hyperparameters)`` (or ``label: method``, as :func:`kdlib.experiments.run_all`
    takes them), under equal conditions: the live teacher for every method
    (no teacher-logit cache), the same batches, a fresh student per method, the methods timed in turn
    (``repeats`` rounds of ``steps`` steps after one warm-up step each) in this process.

    Unlike the epoch times a run records, this does not depend on which run filled the cache or what
    trained beside it; unlike :func:`method_overheads` it includes what a method adds outside its loss
    (MLKD's second view through student and teacher, its strong augmentation).
    """
    from kdlib import engine, methods, models
    from kdlib.methods.base import StepContext
    from kdlib.teacher_logits import LiveTeacher

    from kdlib.precision import resolve_amp

    images, labels = dataset.train_images.to(device), dataset.train_labels.to(device)
    steps_per_epoch = max(1, int(images.shape[0]) // batch_size)
    # the precision a run of the book gets here: the engine's default, the teacher float32 on a CPU
    amp = resolve_amp("auto", device)
    teacher_amp = amp if device.type == "cuda" else "none"
    live = LiveTeacher(teacher.to(device).eval(), device, teacher_amp)
    runners = {}
    for label, spec in specs.items():
        name, params = (spec, {}) if isinstance(spec, str) else spec
        torch.manual_seed(seed)
        net = models.create(student, num_classes=dataset.num_classes).to(device)
        net = net.to(memory_format=torch.channels_last)
        method = methods.build(name, **dict(params)).to(device)
        optimizer = torch.optim.SGD(list(net.parameters()) + list(method.parameters()), lr=0.05, momentum=0.9,
                                    weight_decay=5e-4)
        step = engine.TrainingStep(images_u8=images, labels=labels, forward=net, method=method,
                                   optimizer=optimizer, teacher_logits=live if method.uses_teacher else None,
                                   teacher=teacher if method.uses_teacher else None, device=device, amp=amp,
                                   channels_last=True, teacher_amp=teacher_amp)
        runners[label] = step
    perm = torch.randperm(int(images.shape[0]), generator=torch.Generator().manual_seed(seed)).to(device)

    def run(step, n):
        gen = engine.epoch_generator(seed, 1, 2, device=device)
        for s in range(n):
            idx = perm[(s % steps_per_epoch) * batch_size:(s % steps_per_epoch + 1) * batch_size]
            step(idx, gen, StepContext(epoch=1, step=s % steps_per_epoch, steps_per_epoch=steps_per_epoch,
                                       epochs=1, indices=idx, progress=(s + 1) / steps_per_epoch))

    for step in runners.values():  # warm-up: first calls allocate and pick kernels
        run(step, 1)
    times: Dict[str, List[float]] = {k: [] for k in runners}
    for _ in range(repeats):
        for label, step in runners.items():
            times[label].append(_timed(device, lambda step=step: run(step, steps)) / steps)
    return {k: statistics.median(v) for k, v in times.items()}


# -- per-method loss cost ------------------------------------------------------------------------------
def method_overheads(device: torch.device, batch_size: int = 64, num_classes: int = 100, iters: int = 100,
                     repeats: int = 5, seed: int = 0) -> Dict[str, Any]:
    """Median time of loss forward + backward on (B, C) logits for every method, and its ratio to CE."""
    from kdlib import engine, methods, models
    from kdlib.methods.base import Method, SetupContext, StepContext

    g = torch.Generator().manual_seed(seed)
    z0 = torch.randn(batch_size, num_classes, generator=g).to(device)
    t = torch.randn(batch_size, num_classes, generator=g).to(device) * 3
    y = torch.randint(0, num_classes, (batch_size,), generator=g).to(device)
    idx = torch.arange(batch_size, device=device)
    ctx = StepContext(epoch=1, step=0, steps_per_epoch=1, epochs=1, indices=idx)

    torch.manual_seed(seed)
    tiny_teacher = models.create("resnet8", num_classes=num_classes).to(device).eval()
    for p in tiny_teacher.parameters():
        p.requires_grad_(False)
    images = torch.randint(0, 256, (batch_size, 3, 32, 32), generator=g, dtype=torch.uint8).to(device)
    setup_ctx = SetupContext(num_classes=num_classes, student=models.create("resnet8", num_classes=num_classes).to(device),
                             teacher=tiny_teacher, train_images=images, train_labels=y,
                             predict=lambda m, u8: engine.predict(m, u8, 256), device=device, epochs=1)

    def ce_step(z):
        F.cross_entropy(z, y).backward()

    runners: Dict[str, Callable[[Tensor], None]] = {"ce": ce_step}
    with_setup: List[str] = []
    for name in methods.names():
        m = methods.build(name).to(device)
        if type(m).setup is not Method.setup:
            m.setup(setup_ctx)
            with_setup.append(name)
        m.train()

        def step(z, m=m):
            # a method with extra views (MLKD) gets the same logits as its second view here
            c = StepContext(epoch=1, step=0, steps_per_epoch=1, epochs=1, indices=idx,
                            views={v: (z, t) for v in m.extra_views}) if m.extra_views else ctx
            terms = m(z, t if m.uses_teacher else None, y, c)
            sum(terms.values()).backward()

        runners[name] = step

    times: Dict[str, List[float]] = {k: [] for k in runners}
    z = z0.clone().requires_grad_(True)
    for fn in runners.values():  # warm-up
        for _ in range(3):
            z.grad = None
            fn(z)
    for _ in range(repeats):
        for name, fn in runners.items():
            def loop(fn=fn):
                for _ in range(iters):
                    z.grad = None
                    fn(z)
            times[name].append(_timed(device, loop) / iters)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"method_loss_us": {k: 1e6 * v for k, v in med.items()},
            "method_loss_overhead": {k: med[k] / med["ce"] for k in med if k != "ce"},
            "method_setup_tiny": with_setup,
            "method_loss_timing": f"forward+backward of the loss on ({batch_size}, {num_classes}) logits, median of "
                                  f"{repeats} x {iters} calls; methods with a setup hook got a tiny one (not timed)"}


# -- the whole benchmark ---------------------------------------------------------------------------------
def _cpu_name() -> str:
    from kdlib.engine import machine_info

    return machine_info()["cpu"]


def _profile_size(profile: str):
    from kdlib.config import PROFILES

    if profile not in PROFILES:
        raise KDLibError(f"unknown profile {profile!r}; valid: {', '.join(PROFILES)}")
    p = PROFILES[profile]
    n = 100 * p["train_per_class"] if p.get("train_per_class") else 50000
    return n, int(p["epochs"])


def measure(args: argparse.Namespace) -> Dict[str, Any]:
    from kdlib import engine, logit_cache, models
    from kdlib.data import make_synthetic

    device = engine.resolve_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.pair:
        if ":" not in args.pair:
            raise KDLibError(f"--pair expects TEACHER:STUDENT, got {args.pair!r}")
        pair = tuple(args.pair.split(":", 1))
    else:
        pair = QUICK_PAIR if args.quick else DEFAULT_PAIR
    names = models.names()
    for role, arch in zip(("teacher", "student"), pair):
        if arch not in names:
            raise KDLibError(f"unknown {role} architecture {arch!r}; valid: {', '.join(names)}")
    gpu = device.type == "cuda"
    steps = args.steps or (200 if gpu else 20)
    repeats = args.repeats or (5 if gpu else 3)
    warmup = args.warmup or (30 if gpu else 3)
    bs = args.batch_size
    profile = args.profile or ("course" if args.quick else "paper")
    profile_images, profile_epochs = _profile_size(profile)
    warm_mode = args.cache_warmup or ("fill" if device.type == "cuda" else "replay")
    fill_images = args.fill_images or (512 if device.type == "cuda" else 8)
    amp = args.amp
    if amp == "bf16" and device.type != "cuda":
        amp_note = "bf16 autocast on CPU changes numerics; measured as asked"
    else:
        amp_note = ""
    load_before = os.getloadavg() if hasattr(os, "getloadavg") else None

    # data: the reference's epoch covers every step it takes; the fast path uses the first fast_n images
    needed = (warmup + steps * repeats + 1) * bs
    per_class = max(1, math.ceil(needed / 100))
    dataset = make_synthetic(train_per_class=per_class, test_per_class=1, seed=args.seed)
    fast_n = min(steps, 64) * bs  # a whole number of batches; longer passes go round it again (new views)
    fast_data = dataclasses.replace(dataset, train_images=dataset.train_images[:fast_n].contiguous(),
                                    train_labels=dataset.train_labels[:fast_n].contiguous()).to(device)

    # networks: one teacher, one student initialisation copied into each variant
    torch.manual_seed(args.seed)
    teacher = models.create(pair[0]).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    student0 = models.create(pair[1])
    kd_hp = {"temperature": 4.0, "ce_weight": 0.1, "kd_weight": 0.9}
    lr = 0.05
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format

    with engine.fast_kernels(device):
        ref_teacher = copy.deepcopy(teacher).to(device)
        ref = _Reference(dataset, ref_teacher, copy.deepcopy(student0).to(device).train(), device, bs, args.workers,
                         args.seed, kd_hp, lr)
        fast_teacher = copy.deepcopy(teacher).to(device=device, memory_format=fmt)
        live = engine.LiveTeacher(fast_teacher, device, amp)
        fast_live = _Fast(fast_data, copy.deepcopy(student0).to(device=device, memory_format=fmt).train(), live,
                          device, bs, args.seed, amp, args.channels_last, args.compile, lr)
        with tempfile.TemporaryDirectory(prefix="kdlib-bench-cache-") as root:
            cache = logit_cache.TeacherLogitCache(
                fast_teacher, fast_data.train_images, num_classes=dataset.num_classes, live=live,
                teacher_name=pair[0], dataset_description=dataset.description, device=device, amp=amp,
                channels_last=args.channels_last, dtype=args.cache_dtype, root=root)
            fast_cache = _Fast(fast_data, copy.deepcopy(student0).to(device=device, memory_format=fmt).train(), cache,
                               device, bs, args.seed, amp, args.channels_last, args.compile, lr)

            # warm-up (untimed): kernels, allocator, worker start-up; the cache variant's warm-up uses other views
            ref.steps(warmup)
            fast_live.epoch(1000, warmup)
            fast_cache.epoch(1000, warmup)
            cache.commit()
            # the cold pass: every view of the timed batches is missing (lazy fill's first epoch)
            timed_epoch = 1
            lookups0, computed0 = cache.lookups, cache.computed
            cold = _timed(device, lambda: fast_cache.epoch(timed_epoch, steps))
            cold_misses = cache.computed - computed0
            cache.commit()
            warm_fill = None
            if warm_mode == "fill":
                warm_fill = cache.fill()
            graphed = None
            if device.type == "cuda" and not args.compile:
                # the engine's captured step (graph=auto on CUDA) over the same warm cache, in the same run
                graphed = _Fast(fast_data, copy.deepcopy(student0).to(device=device, memory_format=fmt).train(),
                                cache if cache.capturable else live, device, bs, args.seed, amp, args.channels_last,
                                False, lr, graph=True, teacher=fast_teacher)
                graphed.epoch(1000, warmup)  # first step eager, capture, replays (untimed)
            times: Dict[str, List[float]] = {"reference": [], "live": [], "cache": []}
            if graphed is not None:
                times["graphed"] = []
            computed_before_warm = cache.computed
            lookups_before_warm = cache.lookups
            for _ in range(repeats):
                times["reference"].append(_timed(device, lambda: ref.steps(steps)))
                times["live"].append(_timed(device, lambda: fast_live.epoch(timed_epoch, steps)))
                times["cache"].append(_timed(device, lambda: fast_cache.epoch(timed_epoch, steps)))
                if graphed is not None:
                    times["graphed"].append(_timed(device, lambda: graphed.epoch(timed_epoch, steps)))
            warm_misses = cache.computed - computed_before_warm
            warm_lookups = cache.lookups - lookups_before_warm
            cache_complete = cache.complete
            cache_dtype = cache.dtype
            cache.close()

            # the one-time cost of a full fill, timed on a few images and extrapolated
            fill_root = os.path.join(root, "fill")
            fill_cache = logit_cache.TeacherLogitCache(
                fast_teacher, fast_data.train_images, num_classes=dataset.num_classes, live=live,
                teacher_name=pair[0], dataset_description=dataset.description, device=device, amp=amp,
                channels_last=args.channels_last, dtype=args.cache_dtype, root=fill_root)
            k = max(1, min(fill_images, fast_n - 1))
            fill_cache.fill([0])  # warm-up of the large-batch kernels (untimed)
            fill = fill_cache.fill(range(1, 1 + k))
            fill_cache.close()
        ref.iterator = None  # stop the workers

    img = steps * bs
    ref_img_s = img / statistics.median(times["reference"])
    live_img_s = img / statistics.median(times["live"])
    cache_img_s = img / statistics.median(times["cache"])
    cold_img_s = img / cold
    views_per_s = fill["views_per_second"]
    V = logit_cache.num_views(4)
    fill_seconds = profile_images * V / views_per_s
    saving_per_image = 1.0 / live_img_s - 1.0 / cache_img_s
    breakeven_epochs = (V / views_per_s) / saving_per_image if saving_per_image > 0 else float("inf")
    speedup = cache_img_s / ref_img_s
    goal = GOALS.get(device.type)
    result: Dict[str, Any] = {
        "reference_img_s": ref_img_s,
        "kdlib_img_s": cache_img_s,
        "speedup": speedup,
        "kdlib_live_teacher_img_s": live_img_s,
        "speedup_live_teacher": live_img_s / ref_img_s,
        "kdlib_cache_cold_img_s": cold_img_s,
        "cache_fill_seconds": fill_seconds,
        "cache_fill_estimated": True,
        "cache_fill_images": profile_images,
        "cache_fill_measured_views": fill["views"],
        "cache_fill_views_per_s": views_per_s,
        "cache_breakeven_epochs": breakeven_epochs,
        "cache_breakeven_runs": breakeven_epochs / profile_epochs,
        "profile": profile,
        "profile_epochs": profile_epochs,
        "cache_dtype": cache_dtype,
        "cache_warmup": warm_mode,
        "cache_complete_during_timing": cache_complete,
        "cache_hits_during_timing": (warm_lookups - warm_misses) / max(1, warm_lookups),
        "cache_cold_misses": cold_misses,
        "device": device.type,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name(),
        "pair": f"{pair[0]}:{pair[1]}",
        "batch_size": bs,
        "steps": steps,
        "repeats": repeats,
        "warmup": warmup,
        "reference_workers": args.workers,
        "amp": amp,
        "channels_last": bool(args.channels_last),
        "compile": bool(args.compile and device.type == "cuda"),
        "dataset": f"{dataset.description}; fast path on the first {fast_n} images",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "host": platform.node(),
        "load_before": list(load_before) if load_before else None,
        "load_after": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "times_s": {k: v for k, v in times.items()},
        "goal_speedup": goal,
        "goal_met": (speedup >= goal) if goal else None,
    }
    if warm_fill is not None:
        result["cache_warm_fill"] = warm_fill
    if times.get("graphed"):
        graphed_img_s = img / statistics.median(times["graphed"])
        result.update({"kdlib_graphed_img_s": graphed_img_s, "speedup_graphed": graphed_img_s / ref_img_s,
                       "graphed_vs_eager": graphed_img_s / cache_img_s,
                       "graphed_teacher": "cache" if graphed.teacher_logits is cache else "live"})
    if amp_note:
        result["note"] = amp_note
    try:
        import torchvision

        result["torchvision"] = torchvision.__version__
    except ImportError:  # pragma: no cover - torchvision is a dependency
        pass
    if args.methods:
        result.update(method_overheads(device, bs, dataset.num_classes, seed=args.seed))
    return result


def _table(r: Dict[str, Any]) -> str:
    lines = [
        f"kdlib bench: {r['pair'].replace(':', ' -> ')}, batch {r['batch_size']}, {r['device']} ({r['device_name']}), "
        f"torch {r['torch']}, {r['threads']} threads, {r['date']}",
        f"data: {r['dataset']}; median of {r['repeats']} x {r['steps']} steps after {r['warmup']} warm-up steps; "
        f"load {r['load_before'][0]:.2f} -> {r['load_after'][0]:.2f}" if r.get("load_before") else "",
        "",
        f"{'pipeline':58s} {'img/s':>9s} {'vs reference':>13s}",
        f"{'reference (PIL transforms, DataLoader x' + str(r['reference_workers']) + ', fp32, NCHW, live teacher)':58s} "
        f"{r['reference_img_s']:9.1f} {1.0:12.2f}x",
        f"{'kdlib engine step, live teacher':58s} {r['kdlib_live_teacher_img_s']:9.1f} {r['speedup_live_teacher']:12.2f}x",
        f"{'kdlib engine step, cold cache (lazy fill, first pass)':58s} {r['kdlib_cache_cold_img_s']:9.1f} "
        f"{r['kdlib_cache_cold_img_s'] / r['reference_img_s']:12.2f}x",
        f"{'kdlib engine step, warm teacher-logit cache':58s} {r['kdlib_img_s']:9.1f} {r['speedup']:12.2f}x",
        (f"{'kdlib engine step, CUDA graph (' + r['graphed_teacher'] + ' teacher)':58s} "
         f"{r['kdlib_graphed_img_s']:9.1f} {r['speedup_graphed']:12.2f}x" if "kdlib_graphed_img_s" in r else None),
        "",
        f"kdlib: amp {r['amp']}, channels_last {r['channels_last']}, compile {r['compile']}, cache {r['cache_dtype']} "
        f"({r['cache_warmup']}, {100 * r['cache_hits_during_timing']:.0f}% hits while timed)",
        f"full cache fill: {r['cache_fill_views_per_s']:.0f} views/s (measured on {r['cache_fill_measured_views']} views); "
        f"estimated {r['cache_fill_seconds']:.0f} s for the {r['profile']} profile's {r['cache_fill_images']} images "
        f"x 162 views; pays off after {r['cache_breakeven_epochs']:.0f} epochs = "
        f"{r['cache_breakeven_runs']:.2f} runs of {r['profile_epochs']} epochs (lazy filling: no up-front cost)",
    ]
    if r.get("goal_speedup"):
        lines.append(f"goal: speed-up >= {r['goal_speedup']:g} on {r['device']}: "
                     f"{'met' if r['goal_met'] else 'NOT met'} ({r['speedup']:.2f}x)")
    if "method_loss_overhead" in r:
        lines += ["", f"loss forward+backward on ({r['batch_size']}, 100) logits, relative to cross-entropy "
                      f"({r['method_loss_us']['ce']:.1f} us); tiny setup: {', '.join(r['method_setup_tiny']) or '-'}"]
        for name, ratio in r["method_loss_overhead"].items():
            lines.append(f"  {name:10s} {r['method_loss_us'][name]:9.1f} us {ratio:7.2f}x")
    return "\n".join(line for line in lines if line is not None)


def run(args: argparse.Namespace) -> int:
    result = paper_run(args) if args.paper_run else measure(args)
    if args.json:
        print(json.dumps(result, sort_keys=True, default=str), flush=True)
    else:
        print((_paper_table if args.paper_run else _table)(result), flush=True)
    return 0
