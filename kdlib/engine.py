"""The training engine: every run of every method, profile and chapter goes through :func:`train`.

One loop for all methods (the method turns logits into named loss terms; the engine has no
``if method == ...``), on any device:

* The dataset stays on the device as uint8. Epoch ``e`` (counted from 1) shuffles with a permutation
  drawn from a CPU ``torch.Generator`` seeded by ``(seed, e)`` and augments each batch (batched random
  crop + flip, then normalise) with a device generator seeded by ``(seed, e)``. Nothing about the data
  order depends on earlier epochs, so a resumed run sees exactly the batches of an uninterrupted one.
* The teacher is frozen: ``eval()`` mode, ``requires_grad=False``, outside the optimiser, forward under
  ``no_grad``. Its logits come through one function, ``teacher_logits(images, views)``: a
  :class:`LiveTeacher`, or (``teacher_cache``, default ``auto``) the exact cache of the 162 crop/flip
  views per image, :class:`kdlib.logit_cache.TeacherLogitCache`, shared by every run with that teacher
  and data (bit-identical logits on CPU in float32). ``metrics.json`` records which
  (``config.teacher_cache``, and per segment the cache's lookups and computed views).
* Student forward (and teacher forward) may run under bf16 autocast (``amp``); the logits are cast to
  float32 before the method sees them, so every loss is computed in float32.
* SGD (momentum, weight decay, no Nesterov) over the student's and the method's parameters, the
  learning rate of epoch ``e`` being ``lr * lr_decay ** #(milestones < e)`` (mdistiller's
  ``adjust_learning_rate``).
* Losses and accuracy are summed on the device and read once per epoch. A non-finite loss stops the
  run with a :class:`~kdlib.errors.KDLibError` naming the epoch and step; the checkpoint of the last
  good epoch stays.

Records, in ``config.out`` (every file written atomically, see :mod:`kdlib.io`):

* ``metrics.json`` after every epoch: ``config`` (the resolved :class:`~kdlib.config.RunConfig`, the
  method's hyperparameters, the dataset, the teacher and its test accuracy, versions, git commit),
  ``history`` (one row per epoch), ``final`` (after the last epoch), ``status``.
* ``checkpoint.pt`` after every epoch: student, method, optimiser, epoch, best so far, history and the
  RNG states (python, numpy, torch, CUDA). The one it replaces stays as ``checkpoint.prev.pt``, so a
  checkpoint damaged on disk costs one epoch, never the run: resume then stops with an error that says
  how to continue from the earlier one.
* at the end: ``confusion.npy`` (rows: true class, columns: predicted; last epoch), ``student.pt``
  (``{"model": state_dict}``, the community format) and ``method_artifacts.npz`` (if the method has any).

Accuracies are percentages (0-100) everywhere.

Resume and determinism: re-running the same config on the same ``out`` continues after the last
completed epoch; the result is bit-identical to an uninterrupted run on the same CPU machine (same
number of threads). A finished run is not re-run; a different config (anything but the execution fields
``device``, ``amp``, ``channels_last``, ``eval_batch_size``, ``compile``, ``out``, ``teachers_dir``,
``data_root``, ``teacher_cache``, ``teacher_cache_dtype``) is refused. On CPU the engine enables
``torch.use_deterministic_algorithms`` (warn-only) while it runs. On GPUs the engine turns on cuDNN
autotuning (:func:`fast_kernels`); the algorithms it picks and atomic-add kernels make runs differ in the
last bits from run to run, so GPU runs (and resumed GPU runs) agree statistically, not bit for bit.

SIGINT / SIGTERM: the current step finishes, the run stops without touching the last completed epoch's
checkpoint, ``metrics.json`` says ``"status": "interrupted"`` and :class:`TrainingInterrupted` (a
``KeyboardInterrupt``) is raised; running the same command again resumes. A second signal acts as usual.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdlib import config as kconfig
from kdlib.errors import KDLibError
from kdlib.io import atomic_torch_save, atomic_write, atomic_write_json

METRICS = "metrics.json"
CHECKPOINT = "checkpoint.pt"
PREVIOUS_CHECKPOINT = "checkpoint.prev.pt"
CONFUSION = "confusion.npy"
ARTIFACTS = "method_artifacts.npz"
STUDENT = "student.pt"
SCHEMA_VERSION = 1

__all__ = ["train", "lr_at", "evaluate", "predict", "LiveTeacher", "Views", "TrainingInterrupted",
           "make_batch", "train_step", "EpochSums", "compile_student", "fast_kernels",
           "resolve_device", "resolve_amp", "autocast", "epoch_generator", "seed_everything",
           "read_checkpoint", "METRICS", "CHECKPOINT", "CONFUSION", "ARTIFACTS", "STUDENT"]


class TrainingInterrupted(KeyboardInterrupt):
    """SIGINT/SIGTERM stopped a run; the last completed epoch is checkpointed (resume by re-running)."""

    def __init__(self, signum: int, epoch: int, out: str):
        self.signum, self.epoch, self.out = signum, epoch, out
        try:
            name = signal.Signals(signum).name
        except ValueError:
            name = f"signal {signum}"
        super().__init__(f"{name}: stopped during epoch {epoch}; epochs up to {epoch - 1} are "
                         f"checkpointed in {out} (run the same command again to resume)")


# -- small pieces, public for tests, the book and the benchmarks -----------------------------------
def lr_at(epoch: int, base_lr: float, milestones, decay: float) -> float:
    """Learning rate of ``epoch`` (from 1): ``base_lr * decay ** #(milestones < epoch)``."""
    steps = sum(1 for m in milestones if epoch > m)
    return base_lr * (decay ** steps) if steps > 0 else base_lr


def _mix_seed(*parts: int) -> int:
    state = np.random.SeedSequence([int(p) & 0xFFFFFFFFFFFFFFFF for p in parts]).generate_state(2, np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])  # < 2**63


_STREAM_SHUFFLE, _STREAM_AUGMENT = 1, 2


def epoch_generator(seed: int, epoch: int, stream: int, device="cpu") -> torch.Generator:
    """The generator of one epoch's shuffle (stream 1) or augmentation (stream 2), seeded by (seed, epoch)."""
    return torch.Generator(device=device).manual_seed(_mix_seed(seed, epoch, stream))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds every CUDA device


def resolve_device(name: str) -> torch.device:
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise KDLibError(f"device {name!r} asked for, but CUDA is not available here; use --device cpu")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise KDLibError(f"device {name!r} asked for, but MPS is not available here; use --device cpu")
    return device


def resolve_amp(amp: str, device: torch.device) -> str:
    if amp == "auto":
        return "bf16" if device.type == "cuda" else "none"
    return amp


def autocast(device: torch.device, amp: str):
    """bf16 autocast when ``amp == "bf16"``, else a no-op context."""
    if amp == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


@dataclass
class Views:
    """Which augmented view of which training image each row of a batch is (for teacher-logit caches)."""

    indices: Tensor  # int64 (B,) dataset indices
    offsets: Tensor  # int64 (B, 2) crop (top, left)
    flips: Tensor  # bool (B,)


class LiveTeacher:
    """``teacher_logits(images, views)``: the frozen teacher run on the normalised batch, float32 logits."""

    def __init__(self, model: nn.Module, device: torch.device, amp: str = "none"):
        self.model, self.device, self.amp = model, device, amp

    def __call__(self, images: Tensor, views: Optional[Views] = None) -> Tensor:
        with torch.no_grad(), autocast(self.device, self.amp):
            return self.model(images).float()


def _to_input(x: Tensor, channels_last: bool) -> Tensor:
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


# -- one training step, shared by train() and the benchmark ------------------------------------------
def make_batch(images_u8: Tensor, labels: Tensor, indices: Tensor, generator: torch.Generator,
               channels_last: bool = False):
    """The augmented, normalised batch of ``indices``: ``(x float32, y int64, Views)``.

    Random crop + flip drawn from ``generator`` (on the images' device), then the CIFAR-100 normalisation.
    """
    from kdlib.data import normalize, random_crop_flip

    views_u8, offsets, flips = random_crop_flip(images_u8.index_select(0, indices), generator)
    x = normalize(views_u8, channels_last)  # the layout changes on uint8: same values, a quarter of the bytes
    return x, labels.index_select(0, indices), Views(indices, offsets, flips)


# -- extra views (seam S3, MLKD's strong view): isolated here, the engine only reads method.extra_views --
_STREAM_VIEWS = 3


def check_extra_views(method: nn.Module, teacher: Optional[nn.Module], images: Optional[Tensor]) -> None:
    """Refuse, before training, a method with extra views that this run cannot make: views need the raw
    uint8 training images, and a method that uses a teacher needs the live teacher network on them."""
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


def make_extra_views(method: nn.Module, images_u8: Tensor, indices: Tensor, generator: torch.Generator,
                     channels_last: bool = False) -> Dict[str, Tensor]:
    """The method's extra views of the batch ``indices``, normalised (name -> float32 batch)."""
    from kdlib.data import normalize

    raw = images_u8.index_select(0, indices)
    return {name: normalize(fn(raw, generator), channels_last)
            for name, fn in (getattr(method, "extra_views", {}) or {}).items()}


class EpochSums:
    """Loss, loss terms, correct predictions and the first non-finite step, summed on the device.

    Nothing here synchronises with the host; :meth:`read` does, once per epoch.
    """

    def __init__(self, device):
        self.device = torch.device(device)
        self.count = 0
        self.loss = torch.zeros((), device=self.device)
        self.terms: Dict[str, Tensor] = {}
        self.correct = torch.zeros((), dtype=torch.int64, device=self.device)
        self.first_bad = torch.full((), -1, dtype=torch.int64, device=self.device)

    @torch.no_grad()
    def add(self, loss: Tensor, terms: Dict[str, Tensor], logits: Tensor, targets: Tensor, step: int) -> None:
        n = int(targets.shape[0])
        self.count += n
        loss = loss.detach().float()
        self.loss += loss * n
        for name, value in terms.items():
            if name not in self.terms:  # (setdefault would allocate a tensor every step)
                self.terms[name] = torch.zeros((), device=self.device)
            self.terms[name].add_(value.detach().float() * n)
        self.correct += (logits.detach().argmax(dim=1) == targets).sum()
        self.first_bad = torch.where((self.first_bad < 0) & ~torch.isfinite(loss),
                                     torch.full_like(self.first_bad, step), self.first_bad)

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
               extra_views: Optional[Dict[str, Tensor]] = None, view_teacher=None) -> Tensor:
    """One SGD step: student forward (autocast if ``amp``), float32 logits to the method, sum of its terms.

    ``extra_views`` (name -> normalised batch) are the method's extra views (``Method.extra_views``); the
    student and ``view_teacher`` (the live teacher) run on each, passed as ``ctx.views[name]``."""
    with autocast(device, amp):
        s_logits = forward(x)
    s_logits = s_logits.float()
    t_logits = teacher_logits(x, views) if teacher_logits is not None else None
    for name, xv in (extra_views or {}).items():  # seam S3: student (with grad) and live teacher per view
        with autocast(device, amp):
            sv = forward(xv)
        ctx.views[name] = (sv.float(), view_teacher(xv) if view_teacher is not None else None)
    terms = method(s_logits, t_logits, y, ctx)
    if not terms:
        raise KDLibError(f"method {getattr(method, 'name', type(method).__name__)!r} returned no loss terms")
    loss = sum(terms.values())
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    if sums is not None:
        sums.add(loss, terms, s_logits, y, ctx.step)
    return loss


def compile_student(student: nn.Module, device: torch.device, compile: bool) -> nn.Module:
    """``torch.compile(student)`` on CUDA when asked; the student itself otherwise (slower compiled on CPU)."""
    if compile and torch.device(device).type == "cuda":
        return torch.compile(student)
    return student


@contextlib.contextmanager
def fast_kernels(device):
    """cuDNN autotuning (``cudnn.benchmark``) on CUDA for the duration; nothing on other devices."""
    if torch.device(device).type != "cuda":
        yield
        return
    previous = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = True
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = previous


@contextlib.contextmanager
def _eval_mode(model: nn.Module):
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def predict(model: nn.Module, images_u8: Tensor, batch_size: int = 256, channels_last: bool = False,
            amp: str = "none") -> Tensor:
    """float32 logits (N, C) of un-augmented uint8 images: eval mode, no grad, normalised, batched."""
    from kdlib.data import normalize

    device = images_u8.device
    outs = []
    with _eval_mode(model), torch.no_grad():
        for start in range(0, images_u8.shape[0], batch_size):
            x = _to_input(normalize(images_u8[start:start + batch_size]), channels_last)
            with autocast(device, amp):
                outs.append(model(x).float())
    if not outs:
        return torch.zeros(0, 0, device=device)
    return torch.cat(outs)


def evaluate(model: nn.Module, images_u8: Tensor, labels: Tensor, num_classes: int, batch_size: int = 256,
             channels_last: bool = False, amp: str = "none") -> Dict[str, Any]:
    """Top-1/top-5 accuracy (%), mean cross-entropy, per-class accuracy (%) and the confusion matrix.

    ``confusion[i, j]`` counts test images of class ``i`` predicted as ``j`` (int64 numpy array).
    """
    from kdlib.data import normalize

    device = images_u8.device
    C = num_classes
    k = min(5, C)
    correct1 = torch.zeros((), dtype=torch.int64, device=device)
    correct5 = torch.zeros((), dtype=torch.int64, device=device)
    loss_sum = torch.zeros((), dtype=torch.float32, device=device)
    confusion = torch.zeros(C * C, dtype=torch.int64, device=device)
    with _eval_mode(model), torch.no_grad():
        for start in range(0, images_u8.shape[0], batch_size):
            x = _to_input(normalize(images_u8[start:start + batch_size]), channels_last)
            y = labels[start:start + batch_size]
            with autocast(device, amp):
                logits = model(x)
            logits = logits.float()
            loss_sum += F.cross_entropy(logits, y, reduction="sum")
            top = logits.topk(k, dim=1).indices
            pred = top[:, 0]
            correct1 += (pred == y).sum()
            correct5 += (top == y[:, None]).any(dim=1).sum()
            confusion += torch.bincount(y * C + pred, minlength=C * C)
    n = int(labels.shape[0])
    confusion_np = confusion.view(C, C).cpu().numpy()
    per_class_n = confusion_np.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        per_class = np.where(per_class_n > 0, 100.0 * np.diag(confusion_np) / np.maximum(per_class_n, 1), np.nan)
    return {
        "test_acc": 100.0 * int(correct1) / max(n, 1),
        "test_acc5": 100.0 * int(correct5) / max(n, 1),
        "test_loss": float(loss_sum) / max(n, 1),
        "per_class_acc": [float(a) for a in per_class],
        "confusion": confusion_np,
    }


# -- run records ----------------------------------------------------------------------------------
def _versions() -> Dict[str, str]:
    import kdlib

    return {"kdlib": getattr(kdlib, "__version__", "?"), "torch": torch.__version__,
            "numpy": np.__version__, "python": platform.python_version()}


def _git_commit() -> Optional[str]:
    try:
        root = Path(__file__).resolve().parent.parent
        res = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5)
        return res.stdout.strip() or None if res.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def _dataset_info(dataset) -> Dict[str, Any]:
    info = {
        "name": dataset.name,
        "description": dataset.description,
        "num_classes": dataset.num_classes,
        "train_size": int(dataset.train_images.shape[0]),
        "test_size": int(dataset.test_images.shape[0]),
        "class_names": list(dataset.class_names),
        "superclass_names": list(dataset.superclass_names),
        "class_to_superclass": [int(v) for v in dataset.class_to_superclass.tolist()],
    }
    for extra in ("class_difficulty", "class_separation"):
        value = getattr(dataset, extra, None)
        if value is not None:
            info[extra] = [float(v) for v in value.tolist()]
    return info


def _jsonable(value: Any) -> Any:
    """Method facts (end_epoch/setup) as JSON: tensors and numpy values become lists/numbers."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [_jsonable(v) for v in (sorted(value) if isinstance(value, set) else value)]
    if isinstance(value, Tensor):
        return _jsonable(value.detach().cpu().tolist())
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist())
    if isinstance(value, np.generic):
        return value.item()
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return str(value)


def _normalised(obj: Any) -> Any:
    return json.loads(json.dumps(obj, sort_keys=True, default=str))


def _rng_state() -> Dict[str, Any]:
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]),
                  int(np_state[3]), float(np_state[4])),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: Dict[str, Any]) -> None:
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _short(exc: BaseException, limit: int = 120) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    text = lines[0] if lines else ""
    text = text if len(text) <= limit else text[:limit - 3] + "..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def read_checkpoint(path: str | os.PathLike) -> Dict[str, Any]:
    """Load a run's ``checkpoint.pt`` (tensors on CPU); a damaged file is a :class:`KDLibError`."""
    path = Path(path)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any failure to read means the file is unusable
        raise KDLibError(f"checkpoint {path} is corrupt or unreadable ({_short(exc)}); "
                         f"delete the run directory {path.parent} to start the run over") from None
    required = ("epoch", "student", "method", "optimizer", "history", "rng", "identity")
    if not isinstance(ckpt, dict) or any(k not in ckpt for k in required):
        raise KDLibError(f"checkpoint {path} is not a kdlib run checkpoint (missing "
                         f"{[k for k in required if not isinstance(ckpt, dict) or k not in ckpt]}); "
                         f"delete the run directory {path.parent} to start the run over")
    return ckpt


def _read_metrics_file(path: Path) -> Dict[str, Any]:
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError) as exc:
        raise KDLibError(f"{path} is unreadable ({exc}); delete the run directory {path.parent} to start over") from None
    if not isinstance(data, dict) or "config" not in data:
        raise KDLibError(f"{path} is not a kdlib metrics file; choose another --out")
    return data


def _identity_from_metrics(metrics: Dict[str, Any]) -> Dict[str, Any]:
    run = dict(metrics.get("config", {}).get("run", {}))
    for name in kconfig.EXECUTION_FIELDS:
        run.pop(name, None)
    return run


def _diff(old: Dict[str, Any], new: Dict[str, Any]) -> List[str]:
    keys = sorted(set(old) | set(new))
    return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys if old.get(k) != new.get(k)]


def _keep_previous_checkpoint(ckpt_path: Path) -> None:
    """Make ``checkpoint.prev.pt`` the current checkpoint, before that one is replaced.

    A hard link (a copy where links are impossible) under a temporary name, then an atomic rename:
    ``checkpoint.pt`` never disappears, so a SIGKILL at any moment leaves a resumable run.
    """
    if not ckpt_path.is_file():
        return
    previous = ckpt_path.with_name(PREVIOUS_CHECKPOINT)
    staging = ckpt_path.with_name(PREVIOUS_CHECKPOINT + ".tmp")
    with contextlib.suppress(FileNotFoundError):
        staging.unlink()
    try:
        os.link(ckpt_path, staging)
    except OSError:
        shutil.copyfile(ckpt_path, staging)
    os.replace(staging, previous)


def _read_resume_checkpoint(ckpt_path: Path) -> Dict[str, Any]:
    """:func:`read_checkpoint`, whose error on a damaged file says how to go on from the earlier one."""
    try:
        return read_checkpoint(ckpt_path)
    except KDLibError as exc:
        previous = ckpt_path.with_name(PREVIOUS_CHECKPOINT)
        try:
            epoch = int(read_checkpoint(previous)["epoch"])
        except KDLibError:
            raise exc from None
        raise KDLibError(f"{exc}, or resume from epoch {epoch}, whose checkpoint was kept: "
                         f"mv {previous} {ckpt_path}") from None


def _check_writable(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-test.", dir=out)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise KDLibError(f"cannot write to the run directory {str(out)!r} ({exc.strerror or exc}); "
                         f"choose another --out") from None


@contextlib.contextmanager
def _stop_on_signals():
    """Turn the first SIGINT/SIGTERM into a flag the loop checks after each step."""
    flag: Dict[str, Optional[int]] = {"signum": None}
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}

    def handler(signum, frame):
        flag["signum"] = signum
        for s, h in previous.items():  # a second signal acts as it would have
            signal.signal(s, h)

    for s in previous:
        signal.signal(s, handler)
    try:
        yield flag
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


@contextlib.contextmanager
def _deterministic(device: torch.device):
    if device.type != "cpu":
        yield
        return
    enabled = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(enabled, warn_only=warn_only)


class _Logger:
    def __init__(self, verbose: bool, bars: bool):
        self.verbose, self.bars = verbose, bars

    def __call__(self, message: str) -> None:
        if not self.verbose:
            return
        if self.bars:
            from tqdm import tqdm

            tqdm.write(message)
        else:
            print(message, flush=True)


def _label(cfg: kconfig.RunConfig) -> str:
    pair = f"{cfg.teacher}->{cfg.student}" if cfg.teacher else cfg.student
    return f"{cfg.method} {pair} seed {cfg.seed}"


# -- the engine -------------------------------------------------------------------------------------
def train(config: kconfig.RunConfig, progress: bool = True, *, verbose: bool = True,
          stop_after_epoch: Optional[int] = None, _dataset=None) -> Dict[str, Any]:
    """Train (or distil) one run described by ``config`` into ``config.out``; return its metrics.

    ``progress`` shows tqdm bars (only on a terminal); ``verbose`` prints one summary line per epoch.
    ``stop_after_epoch`` pauses the run once that epoch is recorded (``"status": "paused"``); running
    it again continues. A finished run prints "already finished" and returns its metrics.
    """
    from kdlib import logit_cache, methods, models, teachers
    from kdlib.data import load_dataset
    from kdlib.methods.base import SetupContext, StepContext

    if not isinstance(config, kconfig.RunConfig):
        raise KDLibError(f"train() expects a kdlib.config.RunConfig, got {type(config).__name__}")
    config.validate()
    cfg = config.resolved()
    if not cfg.out:
        raise KDLibError("the run needs an output directory (config.out / --out DIR)")
    if stop_after_epoch is not None and (not isinstance(stop_after_epoch, int) or stop_after_epoch < 1):
        raise KDLibError(f"stop_after_epoch must be an epoch >= 1, got {stop_after_epoch!r}")
    out = Path(cfg.out).expanduser()
    metrics_path, ckpt_path = out / METRICS, out / CHECKPOINT
    identity = _normalised(cfg.identity())
    bars = bool(progress) and sys.stderr.isatty()
    log = _Logger(verbose, bars)
    label = _label(cfg)

    # -- an existing run directory: same run (resume / finished) or refuse -------------------------
    previous = _read_metrics_file(metrics_path) if metrics_path.is_file() else None
    if previous is not None:
        differences = _diff(_identity_from_metrics(previous), identity)
        if differences:
            raise KDLibError(f"{out} holds a different run ({'; '.join(differences)}); "
                             f"use another --out or delete that directory")
        if previous.get("final"):
            log(f"[{label}] already finished: {out} (best {previous['final']['best_test_acc']:.2f}%, "
                f"last {previous['final']['test_acc']:.2f}%)")
            return previous
    ckpt = _read_resume_checkpoint(ckpt_path) if ckpt_path.is_file() else None
    if ckpt is not None:
        differences = _diff(ckpt["identity"], identity)
        if differences:
            raise KDLibError(f"{ckpt_path} belongs to a different run ({'; '.join(differences)}); "
                             f"use another --out or delete that directory")
    elif previous is not None and previous.get("history"):
        raise KDLibError(f"{out} records {len(previous['history'])} epochs but has no {CHECKPOINT} to resume "
                         f"from; delete the directory to start over")
    _check_writable(out)

    device = resolve_device(cfg.device)
    amp = resolve_amp(cfg.amp, device)
    channels_last = bool(cfg.channels_last)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format

    with _deterministic(device), fast_kernels(device), _stop_on_signals() as stop:
        # -- data and teacher (the teacher may be trained here, by a nested train()) ------------------
        dataset = _dataset if _dataset is not None else load_dataset(
            cfg.dataset, root=cfg.data_root, train_per_class=cfg.train_per_class,
            test_per_class=cfg.test_per_class, seed=cfg.data_seed)
        dataset = dataset.to(device)
        C = dataset.num_classes
        teacher, teacher_info = None, None
        method_cls = methods.get(cfg.method)
        if method_cls.uses_teacher:
            teacher, teacher_info = teachers.get_teacher(cfg, dataset, device, progress=progress, verbose=verbose)

        # -- student and method, seeded; setup sees a fresh student both on a new run and on resume ---
        seed_everything(cfg.seed)
        student = models.create(cfg.student, num_classes=C).to(device=device, memory_format=memory_format)
        method = methods.build(cfg.method, **cfg.method_params).to(device)
        check_extra_views(method, teacher, dataset.train_images)
        view_teacher = LiveTeacher(teacher, device, amp) if method.extra_views and teacher is not None else None
        eval_bs = cfg.eval_batch_size

        def predict_fn(model: nn.Module, images_u8: Tensor) -> Tensor:
            return predict(model, images_u8, eval_bs, channels_last, amp)

        setup_facts = method.setup(SetupContext(
            num_classes=C, student=student, teacher=teacher, train_images=dataset.train_images,
            train_labels=dataset.train_labels, predict=predict_fn, device=device, epochs=cfg.epochs)) or {}
        optimizer = torch.optim.SGD(list(student.parameters()) + list(method.parameters()), lr=cfg.lr,
                                    momentum=cfg.momentum, weight_decay=cfg.weight_decay, nesterov=False)
        forward_student = compile_student(student, device, cfg.compile)
        if cfg.compile and forward_student is student:
            log(f"[{label}] compile=true ignored on {device.type}: torch.compile is slower than eager on CPUs")
        teacher_logits: Optional[Callable[[Tensor, Views], Tensor]] = (
            LiveTeacher(teacher, device, amp) if teacher is not None else None)
        # the exact teacher-logit cache (kdlib.logit_cache) replaces the live teacher where it pays
        cache_plan = logit_cache.plan(cfg.teacher_cache, uses_teacher=teacher is not None,
                                      num_images=int(dataset.train_images.shape[0]), num_classes=C,
                                      device=device, amp=amp, dtype=cfg.teacher_cache_dtype)
        cache, cache_record = logit_cache.open_for_run(cache_plan, teacher, teacher_logits, dataset,
                                                       teacher_name=str(cfg.teacher), device=device, amp=amp,
                                                       channels_last=channels_last, progress=bars)
        if cache is not None:
            teacher_logits = cache
            log(f"[{label}] teacher logits: {cache_record['mode']} cache ({cache_record['dtype']}, "
                f"{100 * cache_record['filled']:.1f}% filled) {cache_record['path']}")

        history: List[Dict[str, Any]] = []
        best = {"test_acc": -math.inf, "epoch": 0}
        start_epoch = 1
        if ckpt is not None:
            try:
                student.load_state_dict(ckpt["student"])
                method.load_state_dict(ckpt["method"])
                optimizer.load_state_dict(ckpt["optimizer"])
            except (RuntimeError, KeyError, ValueError) as exc:
                raise KDLibError(f"checkpoint {ckpt_path} does not fit this run ({exc}); delete the run "
                                 f"directory {out} to start over") from None
            history, best = list(ckpt["history"]), dict(ckpt["best"])
            start_epoch = int(ckpt["epoch"]) + 1
            _set_rng_state(ckpt["rng"])

        metrics: Dict[str, Any] = {
            "schema": SCHEMA_VERSION,
            "status": "running",
            "config": {
                "run": cfg.to_dict(),
                "profile": cfg.profile,
                "seed": cfg.seed,
                "method": {"name": cfg.method, "hparams": _jsonable(cfg.method_params),
                           "defaults": _jsonable(dict(method_cls.defaults)),
                           "uses_teacher": bool(method_cls.uses_teacher), "setup": _jsonable(setup_facts),
                           "recipe": _jsonable(cfg.method_recipe())},
                "dataset": _dataset_info(dataset),
                "teacher": teacher_info,
                "teacher_cache": cache_record,
                "versions": _versions(),
                "git_commit": _git_commit(),
                "created": (previous or {}).get("config", {}).get("created")
                or datetime.now(timezone.utc).isoformat(timespec="seconds"),
            },
            "history": history,
            "final": None,
            "segments": list((previous or {}).get("segments", [])) + [{
                "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "start_epoch": start_epoch, "device": str(device), "amp": amp,
                "channels_last": channels_last, "threads": torch.get_num_threads(),
                "host": platform.node()}],
        }
        atomic_write_json(metrics_path, metrics)

        N = int(dataset.train_images.shape[0])
        bs = cfg.batch_size
        steps = max(1, math.ceil(N / bs))
        last_eval: Optional[Dict[str, Any]] = None
        epoch_bar = _bar(bars, total=cfg.epochs, initial=start_epoch - 1, desc=label, unit="epoch")
        try:
            for epoch in range(start_epoch, cfg.epochs + 1):
                t0 = time.perf_counter()
                lr = lr_at(epoch, cfg.lr, cfg.milestones, cfg.lr_decay)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                student.train()
                method.train()
                if teacher is not None:
                    teacher.eval()
                perm = torch.randperm(N, generator=epoch_generator(cfg.seed, epoch, _STREAM_SHUFFLE)).to(device)
                aug = epoch_generator(cfg.seed, epoch, _STREAM_AUGMENT, device=device)
                view_gen = epoch_generator(cfg.seed, epoch, _STREAM_VIEWS, device=device)
                method.start_epoch(epoch)  # seam S2: before the epoch's first step
                sums = EpochSums(device)
                batch_bar = _bar(bars, total=steps, desc=f"epoch {epoch}", unit="batch", leave=False)
                for step in range(steps):
                    idx = perm[step * bs:(step + 1) * bs]
                    x, y, views = make_batch(dataset.train_images, dataset.train_labels, idx, aug, channels_last)
                    extra = (make_extra_views(method, dataset.train_images, idx, view_gen, channels_last)
                             if method.extra_views else None)
                    train_step(forward_student, method, optimizer, x, y, views, teacher_logits,
                               StepContext(epoch=epoch, step=step, steps_per_epoch=steps, epochs=cfg.epochs,
                                           indices=idx), device=device, amp=amp, sums=sums,
                               extra_views=extra, view_teacher=view_teacher)
                    if batch_bar is not None:
                        batch_bar.update(1)
                    if stop["signum"] is not None:
                        break
                if batch_bar is not None:
                    batch_bar.close()
                if stop["signum"] is not None:
                    raise TrainingInterrupted(stop["signum"], epoch, str(out))

                # -- once per epoch: read the sums, check them, evaluate, record --------------------
                if cache is not None:
                    cache.commit()  # this epoch's new entries become visible to every other run
                    metrics["segments"][-1]["teacher_cache"] = {
                        k: v for k, v in cache.info().items() if k in ("filled", "lookups", "computed", "adopted")}
                epoch_sums = sums.read()  # the epoch's one host synchronisation
                bad_step = epoch_sums.pop("bad_step")
                if bad_step >= 0:
                    message = (f"non-finite loss (nan/inf) at epoch {epoch}, step {bad_step} of run {out}; "
                               f"the checkpoint of epoch {epoch - 1} is kept. Lower the learning rate or "
                               f"check the method's hyperparameters")
                    metrics.update(status="failed", error=message)
                    atomic_write_json(metrics_path, metrics)
                    raise KDLibError(message)
                train_seconds = time.perf_counter() - t0
                row: Dict[str, Any] = {"epoch": epoch, "lr": lr, **epoch_sums}
                last_eval = evaluate(student, dataset.test_images, dataset.test_labels, C, eval_bs,
                                     channels_last, amp)
                row.update({k: last_eval[k] for k in ("test_acc", "test_acc5", "test_loss", "per_class_acc")})
                row["method"] = _jsonable(method.end_epoch(epoch) or {})
                row["epoch_seconds"] = time.perf_counter() - t0
                row["train_seconds"] = train_seconds
                row["images_per_second"] = N / train_seconds if train_seconds > 0 else float("nan")
                history.append(row)
                if row["test_acc"] > best["test_acc"]:
                    best = {"test_acc": row["test_acc"], "epoch": epoch}

                _keep_previous_checkpoint(ckpt_path)
                atomic_torch_save(ckpt_path, {
                    "epoch": epoch, "student": student.state_dict(), "method": method.state_dict(),
                    "optimizer": optimizer.state_dict(), "scheduler": {"epoch": epoch, "lr": lr},
                    "best": best, "history": history, "rng": _rng_state(), "identity": identity})
                metrics["history"] = history
                metrics["best"] = best
                atomic_write_json(metrics_path, metrics)
                log(f"[{label}] epoch {epoch}/{cfg.epochs} lr {lr:.4g} loss {row['train_loss']:.4f} "
                    f"train {row['train_acc']:.2f}% test {row['test_acc']:.2f}% "
                    f"(best {best['test_acc']:.2f}% @ {best['epoch']}) {row['epoch_seconds']:.1f}s "
                    f"{row['images_per_second']:.0f} img/s")
                if epoch_bar is not None:
                    epoch_bar.update(1)
                if stop["signum"] is not None:
                    raise TrainingInterrupted(stop["signum"], epoch + 1, str(out))
                if stop_after_epoch is not None and epoch >= stop_after_epoch and epoch < cfg.epochs:
                    metrics["status"] = "paused"
                    atomic_write_json(metrics_path, metrics)
                    log(f"[{label}] paused after epoch {epoch} (run again to continue)")
                    return metrics
        except TrainingInterrupted:
            metrics["status"] = "interrupted"
            atomic_write_json(metrics_path, metrics)
            raise
        finally:
            if epoch_bar is not None:
                epoch_bar.close()
            if cache is not None:
                cache.close()

        # -- the end: confusion, final weights, method artifacts, then `final` -------------------------
        if last_eval is None:  # the last epoch was checkpointed by a process that stopped right after
            last_eval = evaluate(student, dataset.test_images, dataset.test_labels, C, eval_bs, channels_last, amp)
        atomic_write(out / CONFUSION, lambda f: np.save(f, last_eval["confusion"]))
        atomic_torch_save(out / STUDENT, {"model": student.state_dict(), "arch": cfg.student,
                                          "test_acc": last_eval["test_acc"]})
        artifacts = method.artifacts() or {}
        if artifacts:
            arrays = {k: (v.detach().cpu().numpy() if isinstance(v, Tensor) else np.asarray(v))
                      for k, v in artifacts.items()}
            atomic_write(out / ARTIFACTS, lambda f: np.savez(f, **arrays))
        metrics["final"] = {
            "epochs": cfg.epochs,
            "test_acc": last_eval["test_acc"],
            "test_acc5": last_eval["test_acc5"],
            "test_loss": last_eval["test_loss"],
            "best_test_acc": best["test_acc"],
            "best_epoch": best["epoch"],
            "per_class_acc": last_eval["per_class_acc"],
            "confusion": CONFUSION,
            "student": STUDENT,
            "method_artifacts": ARTIFACTS if artifacts else None,
            "wall_seconds": float(sum(r.get("epoch_seconds", 0.0) for r in history)),
        }
        metrics["status"] = "finished"
        metrics["best"] = best
        atomic_write_json(metrics_path, metrics)
        # a finished run never resumes, so the spare checkpoint would only double the disk use
        with contextlib.suppress(FileNotFoundError):
            (out / PREVIOUS_CHECKPOINT).unlink()
        log(f"[{label}] finished: last {last_eval['test_acc']:.2f}%, best {best['test_acc']:.2f}% "
            f"@ epoch {best['epoch']} -> {out}")
        return metrics


def _bar(enabled: bool, **kwargs):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(dynamic_ncols=True, **kwargs)
