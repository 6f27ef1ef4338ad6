"""``python -m kdlib bench``: a distillation step of this project against the usual CIFAR pipeline.

One run measures, for one teacher -> student pair at batch 64, the images per second of a KD training
step (KD loss, SGD step), the variants interleaved so that a change of load hits all of them (each figure
the median of ``--repeats`` passes of ``--steps`` steps, after untimed warm-up steps):

* **reference**: the pipeline of the community code bases (CRD/RepDistiller, mdistiller), written here:
  a torchvision-style CIFAR ``Dataset`` over HWC uint8 numpy images, PIL ``RandomCrop(32, padding=4)``,
  ``RandomHorizontalFlip``, ``ToTensor``, ``Normalize``, a shuffling ``DataLoader`` with worker processes,
  float32, NCHW, the live teacher under ``no_grad``, and a ``loss.item()`` per step for the meters;
* **kdlib**: the engine's own step and epoch loop (:class:`kdlib.engine.TrainingStep`,
  :class:`kdlib.engine.EpochLoop`, the code every run uses, optimizer included), the dataset resident on
  the device as uint8, channels-last, teacher logits from a warm :class:`kdlib.logit_cache.TeacherLogitCache`
  ("warm": on a CPU the timed batches are replayed after a cold pass filled them; on a GPU the cache is
  filled up front); float32 unless ``--amp``; also with the live teacher, and the cold first pass;
* **kdlib, CUDA graph** (CUDA only): the same loop capturing the step, as ``graph=auto`` runs on CUDA.

The one-time cost of a full fill is timed on ``--fill-images`` images (all 162 views each) and
extrapolated to the profile's training set (an estimate, labelled as such), with the number of runs after
which it pays for itself. Then each method's loss cost: forward + backward of its loss on (64, 100)
logits, relative to cross-entropy. ``--paper-run`` instead trains the engine (teacher and KD student,
evaluation included) for a few epochs on CIFAR-sized synthetic data and projects a 240-epoch run.
Data are synthetic, the networks randomly initialised: speed does not depend on the values.
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

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdlib.errors import KDLibError
from kdlib.reference_pipeline import Reference, ReferenceCIFAR, reference_transform  # noqa: F401 (public here)

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
    parser.add_argument("--amp", default="auto", choices=("auto", "none", "bf16"),
                        help="the engine's precision (auto, the default: the engine's choice, bf16 for a captured "
                             "CUDA step and on CPUs with native bf16; none: float32); the reference is float32")
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
    """Train the engine (vanilla teacher, then KD student; ``graph=auto``, ``--amp``, evaluation every epoch)
    for a few epochs at paper size on synthetic data; project 240 epochs as ``first + 239 x median(later)``
    (the first epoch holds the capture, cuDNN autotuning, allocator); the cache fill is reported apart.
    ``--quick``: resnet8 -> resnet8 on 10 images per class, a check of the plumbing, not of the speed."""
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
                          out=str(Path(root) / "student"), seed=args.seed, amp=args.amp,
                          teacher_cache=getattr(args, "teacher_cache", "auto"), **size)
        t0 = time.perf_counter()
        student = engine.train(cfg, progress=False, verbose=not args.json)
        wall = time.perf_counter() - t0
        teacher_dir = teachers.teacher_path(cfg).with_suffix("")
        teacher = json.loads((teacher_dir / engine.METRICS).read_text())

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
        "execution": {role: {k: run["segments"][-1].get(k) for k in ("graph", "amp", *_COUNTS)}
                      for role, run in (("teacher", teacher), ("student", student))},
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


_COUNTS = ("graph_captures", "graph_replays", "eager_steps", "graph_fallback")


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


# -- (b) the fast path: the engine's own step and epoch loop ------------------------------------------
def engine_loop(data, student: nn.Module, teacher_logits, *, device: torch.device, batch_size: int, seed: int,
                amp: str, channels_last: bool, compile: bool = False, lr: float = 0.05, graph: bool = False,
                teacher: Optional[nn.Module] = None, method: str = "kd", method_params=None):
    """The engine's step (:class:`kdlib.engine.TrainingStep`) and epoch loop (:class:`kdlib.engine.EpochLoop`)
    over a device-resident uint8 dataset, built with the engine's own parts (optimizer included): with
    ``graph`` the loop captures the step after its first one and replays it, as a graphed run does."""
    from kdlib import engine, methods

    loss = methods.build(method, **dict(method_params or {})).to(device)
    forward = engine.compile_student(student, device, compile and not graph)
    optimizer = engine.make_optimizer(list(student.parameters()) + list(loss.parameters()), lr=lr, momentum=0.9,
                                      weight_decay=5e-4, graph=graph, device=device)
    step = engine.TrainingStep(images_u8=data.train_images, labels=data.train_labels, forward=forward, method=loss,
                               optimizer=optimizer, teacher_logits=teacher_logits, teacher=teacher, device=device,
                               amp=amp, channels_last=channels_last,
                               teacher_amp=amp if device.type == "cuda" else "none")
    return engine.EpochLoop(step, seed=seed, batch_size=batch_size, epochs=1, graph=graph)


def timed_steps(loop, first_epoch: int, steps: int) -> None:
    """``steps`` steps of the loop from ``first_epoch`` on (the same epochs give the same batches and views),
    the epoch sums read once per epoch as a run reads them (a host synchronisation)."""
    epoch = first_epoch
    while steps > 0:
        n = min(steps, loop.steps_per_epoch)
        loop.run_epoch(epoch, steps=n).read()
        steps, epoch = steps - n, epoch + 1


# -- per-method step cost ------------------------------------------------------------------------------
def method_step_seconds(specs: Dict[str, Any], teacher: nn.Module, student: str, dataset,
                        device: torch.device, batch_size: int = 64, steps: int = 10, repeats: int = 3,
                        seed: int = 0) -> Dict[str, float]:
    """Median seconds of one whole training step of the engine (its step and epoch loop) for
    each ``label: (method, hyperparameters)`` (or ``label: method``, as :func:`kdlib.experiments.run_all`
    takes them), under equal conditions: the live teacher for every method
    (no teacher-logit cache), the same batches, a fresh student per method, the methods timed in turn
    (``repeats`` rounds of ``steps`` steps after one warm-up step each) in this process.

    Unlike the epoch times a run records, this does not depend on which run filled the cache or what
    trained beside it; unlike :func:`method_overheads` it includes what a method adds outside its loss
    (MLKD's second view through student and teacher, its strong augmentation).
    """
    from kdlib import methods, models
    from kdlib.precision import resolve_amp
    from kdlib.teacher_logits import LiveTeacher

    data = dataclasses.replace(dataset, train_images=dataset.train_images.to(device),
                               train_labels=dataset.train_labels.to(device))
    # the precision a run of the book gets here: the engine's default, the teacher float32 on a CPU
    amp = resolve_amp("auto", device)
    live = LiveTeacher(teacher.to(device).eval(), device, amp if device.type == "cuda" else "none")
    loops = {}
    for label, spec in specs.items():
        name, params = (spec, {}) if isinstance(spec, str) else spec
        torch.manual_seed(seed)
        net = models.create(student, num_classes=dataset.num_classes).to(device).to(memory_format=torch.channels_last)
        uses_teacher = methods.get(name).uses_teacher
        loops[label] = engine_loop(data, net, live if uses_teacher else None, device=device, batch_size=batch_size,
                                   seed=seed, amp=amp, channels_last=True, teacher=teacher if uses_teacher else None,
                                   method=name, method_params=params)
    for loop in loops.values():  # warm-up: first calls allocate and pick kernels
        timed_steps(loop, 1, 1)
    times: Dict[str, List[float]] = {k: [] for k in loops}
    for _ in range(repeats):
        for label, loop in loops.items():
            times[label].append(_timed(device, lambda loop=loop: timed_steps(loop, 1, steps)) / steps)
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
                            extra_logits={v: (z, t) for v in m.extra_views}) if m.extra_views else ctx
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


def _settings(args: argparse.Namespace) -> Dict[str, Any]:
    """Device, pair, step counts and the profile the fill estimate uses, from the arguments (checked)."""
    from kdlib import engine, models

    device = engine.resolve_device(args.device)
    if args.pair and ":" not in args.pair:
        raise KDLibError(f"--pair expects TEACHER:STUDENT, got {args.pair!r}")
    pair = tuple(args.pair.split(":", 1)) if args.pair else (QUICK_PAIR if args.quick else DEFAULT_PAIR)
    names = models.names()
    for role, arch in zip(("teacher", "student"), pair):
        if arch not in names:
            raise KDLibError(f"unknown {role} architecture {arch!r}; valid: {', '.join(names)}")
    gpu = device.type == "cuda"
    profile = args.profile or ("course" if args.quick else "paper")
    profile_images, profile_epochs = _profile_size(profile)
    return {"device": device, "pair": pair, "steps": args.steps or (200 if gpu else 20),
            "repeats": args.repeats or (5 if gpu else 3), "warmup": args.warmup or (30 if gpu else 3),
            "bs": args.batch_size, "profile": profile, "profile_images": profile_images,
            "profile_epochs": profile_epochs, "warm_mode": args.cache_warmup or ("fill" if gpu else "replay"),
            "fill_images": args.fill_images or (512 if gpu else 8),
            "amp": engine.resolve_amp(args.amp, device, graph=gpu and not args.compile)}


def _time_variants(args, st: Dict[str, Any], dataset, fast_data, teacher, student0, root: str) -> Dict[str, Any]:
    """The reference pipeline and the engine's loops (live teacher, cache, captured on CUDA), timed
    interleaved: ``repeats`` rounds of ``steps`` steps each, after untimed warm-up steps."""
    from kdlib import engine, logit_cache

    device, bs, steps, amp = st["device"], st["bs"], st["steps"], st["amp"]
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    ref = Reference(dataset, copy.deepcopy(teacher).to(device), copy.deepcopy(student0).to(device).train(), device,
                     bs, args.workers, args.seed, {"temperature": 4.0, "ce_weight": 0.1, "kd_weight": 0.9}, 0.05)
    fast_teacher = copy.deepcopy(teacher).to(device=device, memory_format=fmt)
    live = engine.LiveTeacher(fast_teacher, device, amp)

    def loop(source, graph=False):
        return engine_loop(fast_data, copy.deepcopy(student0).to(device=device, memory_format=fmt).train(), source,
                           device=device, batch_size=bs, seed=args.seed, amp=amp, channels_last=args.channels_last,
                           compile=args.compile, graph=graph, teacher=fast_teacher)

    cache = logit_cache.TeacherLogitCache(
        fast_teacher, fast_data.train_images, num_classes=dataset.num_classes, live=live, teacher_name=st["pair"][0],
        dataset_description=dataset.description, device=device, amp=amp, channels_last=args.channels_last,
        dtype=args.cache_dtype, root=root)
    loops = {"live": loop(live), "cache": loop(cache)}
    ref.steps(st["warmup"])  # warm-up (untimed): kernels, allocator, workers; other views than the timed ones
    for lp in loops.values():
        timed_steps(lp, 1000, st["warmup"])
    cache.commit()
    computed0 = cache.computed
    cold = _timed(device, lambda: timed_steps(loops["cache"], 1, steps))  # every timed view missing
    out: Dict[str, Any] = {"cold": cold, "cold_misses": cache.computed - computed0}
    cache.commit()
    if st["warm_mode"] == "fill":
        out["warm_fill"] = cache.fill()
    if device.type == "cuda" and not args.compile:  # the engine's captured step over the same warm cache
        loops["graphed"] = loop(cache if cache.capturable else live, graph=True)
        timed_steps(loops["graphed"], 1000, st["warmup"])  # first step eager, capture, replays (untimed)
        out["graphed_teacher"] = "cache" if cache.capturable else "live"
        out["graphed_counts"] = loops["graphed"].counts()
    times: Dict[str, List[float]] = {"reference": [], **{name: [] for name in loops}}
    computed, lookups = cache.computed, cache.lookups
    for _ in range(st["repeats"]):
        times["reference"].append(_timed(device, lambda: ref.steps(steps)))
        for name, lp in loops.items():
            times[name].append(_timed(device, lambda lp=lp: timed_steps(lp, 1, steps)))
    if "graphed" in loops:
        loops["graphed"].release()
    out.update(times=times, warm_misses=cache.computed - computed, warm_lookups=cache.lookups - lookups,
               cache_complete=cache.complete, cache_dtype=cache.dtype)
    cache.close()
    ref.iterator = None  # stop the workers
    out["fill"] = _fill_cost(args, st, dataset, fast_data, fast_teacher, live, os.path.join(root, "fill"))
    return out


def _fill_cost(args, st: Dict[str, Any], dataset, fast_data, teacher, live, root: str) -> Dict[str, Any]:
    """The one-time cost of a full fill: every view of a few images, timed (extrapolated by the caller)."""
    from kdlib import logit_cache

    fill_cache = logit_cache.TeacherLogitCache(
        teacher, fast_data.train_images, num_classes=dataset.num_classes, live=live, teacher_name=st["pair"][0],
        dataset_description=dataset.description, device=st["device"], amp=st["amp"],
        channels_last=args.channels_last, dtype=args.cache_dtype, root=root)
    k = max(1, min(st["fill_images"], int(fast_data.train_images.shape[0]) - 1))
    fill_cache.fill([0])  # warm-up of the large-batch kernels (untimed)
    fill = fill_cache.fill(range(1, 1 + k))
    fill_cache.close()
    return fill


def measure(args: argparse.Namespace) -> Dict[str, Any]:
    from kdlib import engine, logit_cache, models
    from kdlib.data import make_synthetic

    st = _settings(args)
    device, bs, steps = st["device"], st["bs"], st["steps"]
    if args.threads:
        torch.set_num_threads(args.threads)
    load_before = os.getloadavg() if hasattr(os, "getloadavg") else None
    # data: the reference's epoch covers every step it takes; the fast path uses the first fast_n images
    per_class = max(1, math.ceil((st["warmup"] + steps * st["repeats"] + 1) * bs / 100))
    dataset = make_synthetic(train_per_class=per_class, test_per_class=1, seed=args.seed)
    fast_n = min(steps, 64) * bs  # a whole number of batches; longer passes go round it again (new views)
    fast_data = dataclasses.replace(dataset, train_images=dataset.train_images[:fast_n].contiguous(),
                                    train_labels=dataset.train_labels[:fast_n].contiguous()).to(device)
    torch.manual_seed(args.seed)  # one teacher, one student initialisation copied into each variant
    teacher = models.create(st["pair"][0]).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    student0 = models.create(st["pair"][1])
    with engine.fast_kernels(device), tempfile.TemporaryDirectory(prefix="kdlib-bench-cache-") as root:
        t = _time_variants(args, st, dataset, fast_data, teacher, student0, root)
    img = steps * bs
    rate = {name: img / statistics.median(v) for name, v in t["times"].items()}
    views_per_s, V = t["fill"]["views_per_second"], logit_cache.num_views(4)
    saving = 1.0 / rate["live"] - 1.0 / rate["cache"]
    breakeven = (V / views_per_s) / saving if saving > 0 else float("inf")
    goal = GOALS.get(device.type)
    result: Dict[str, Any] = {
        "reference_img_s": rate["reference"], "kdlib_img_s": rate["cache"], "speedup": rate["cache"] / rate["reference"],
        "kdlib_live_teacher_img_s": rate["live"], "speedup_live_teacher": rate["live"] / rate["reference"],
        "kdlib_cache_cold_img_s": img / t["cold"], "cache_fill_seconds": st["profile_images"] * V / views_per_s,
        "cache_fill_estimated": True, "cache_fill_images": st["profile_images"],
        "cache_fill_measured_views": t["fill"]["views"], "cache_fill_views_per_s": views_per_s,
        "cache_breakeven_epochs": breakeven, "cache_breakeven_runs": breakeven / st["profile_epochs"],
        "profile": st["profile"], "profile_epochs": st["profile_epochs"], "cache_dtype": t["cache_dtype"],
        "cache_warmup": st["warm_mode"], "cache_complete_during_timing": t["cache_complete"],
        "cache_hits_during_timing": (t["warm_lookups"] - t["warm_misses"]) / max(1, t["warm_lookups"]),
        "cache_cold_misses": t["cold_misses"], "device": device.type,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name(),
        "pair": ":".join(st["pair"]), "batch_size": bs, "steps": steps, "repeats": st["repeats"],
        "warmup": st["warmup"], "reference_workers": args.workers, "amp": st["amp"],
        "channels_last": bool(args.channels_last), "compile": bool(args.compile and device.type == "cuda"),
        "dataset": f"{dataset.description}; fast path on the first {fast_n} images", "torch": torch.__version__,
        "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "host": platform.node(),
        "load_before": list(load_before) if load_before else None,
        "load_after": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "times_s": t["times"], "goal_speedup": goal, "goal_met": (rate["cache"] / rate["reference"] >= goal) if goal else None,
    }
    if "warm_fill" in t:
        result["cache_warm_fill"] = t["warm_fill"]
    if "graphed" in rate:
        result.update({"kdlib_graphed_img_s": rate["graphed"], "speedup_graphed": rate["graphed"] / rate["reference"],
                       "graphed_vs_eager": rate["graphed"] / rate["cache"], "graphed_teacher": t["graphed_teacher"],
                       "graphed_counts": t["graphed_counts"]})
    if st["amp"] == "bf16" and device.type != "cuda":
        result["note"] = "bf16 autocast on CPU changes numerics; measured as asked"
    import torchvision

    result["torchvision"] = torchvision.__version__
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
