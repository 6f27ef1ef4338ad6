"""An exact teacher-logit cache: every augmented view's logits, computed once per teacher and dataset.

Why it is exact
---------------
The recipe's augmentation is ``RandomCrop(32, padding=4)`` + ``RandomHorizontalFlip``: 9 x 9 crop offsets
times 2 flips = 162 views per training image (:func:`kdlib.data.view_index` numbers them), and the
teacher is frozen in eval mode. The teacher's logits for (image index, top, left, flip) are therefore a
pure function, and a table of them replaces the teacher's forward pass in every step of every method,
seed and student distilled from that teacher.

:class:`TeacherLogitCache` has the call signature of :class:`kdlib.teacher_logits.LiveTeacher`
(``cache(images, keys) -> float32 logits (B, C)``, ``keys`` a :class:`kdlib.teacher_logits.ViewKeys`), so the engine swaps it in. ``images`` is the
normalised batch the live teacher would have seen; the cache uses it only for views it does not hold yet.

Storage
-------
One folder per key under ``$KDLIB_HOME/logit_cache/`` (``KDLIB_HOME`` defaults to ``~/.cache/kdlib``)::

    <teacher>-n<N>-p<padding>-<dtype>-<device type>[-bf16]-<hash>/
        meta.json    the key in full, shapes, dtype, versions (written atomically, last, by kdlib.io)
        logits.bin   (N, V, C) values, raw little-endian float32 / float16 / bfloat16 (numpy memmap)
        filled.bin   (N, V) uint8 flags: 1 = the entry holds the teacher's logits
        lock         flock(2) lock for creation and flag commits

The key is everything that decides the values: the teacher's weights (SHA-256 of its state dict:
names, dtypes, shapes, bytes), the training images (SHA-256 of the uint8 tensor, plus the dataset's
description, for humans), the padding (hence the number of views), the number of classes, the storage
dtype, the device type and the autocast mode the teacher runs in. It does not contain the method, the
seed, the student or any recipe field, so every run with that teacher and data shares one cache.

``logits.bin`` has its blocks reserved at creation (``posix_fallocate``: no data written, and a full
disk is an error then rather than a SIGBUS in the middle of a run). On a CPU the
memmap *is* the in-memory table (page cache, zero copy); on a GPU a device copy is kept when it fits
(``device_copy="auto"``: at most half of the free device memory), otherwise rows are gathered from the
memmap on the host.

Filling
-------
* ``lazy`` (:meth:`__call__`): each batch looks its views up; only the missing ones go through the live
  teacher (as a sub-batch of the batch's own normalised images), and are stored.
* ``full`` (:meth:`fill`): every view of every image up front, in batches of all 162 views of a few
  images, with a tqdm bar. Resumable: a second call skips what is filled.

Once every entry is filled the lookup is a single ``index_select`` on the device: no host
synchronisation per step. While entries are missing, each lookup reads how many are missing (one sync).

Crash safety and sharing
------------------------
* An entry counts as filled only when its flag is set, and a flag is set only after its values are
  written and flushed (``msync``): :meth:`commit` writes the values' pages to disk, then the flags, then
  flushes the flags. Flags are committed every ``commit_interval`` seconds (30 s), at :meth:`commit`
  and at :meth:`close`; a killed process loses at most that much work, never correctness (entries it
  wrote without flags are recomputed by the next reader).
* Several processes may share a cache: they map the same files (``MAP_SHARED``, so one process's
  writes never clobber another's neighbouring entries), only ever set flags, and only write entries they
  found missing. Two processes may compute the same entry (duplicate work); both write the teacher's
  values for it. Each process adopts the entries others committed (:meth:`refresh`, at every commit and
  before computing a miss). The files must live on a local filesystem (mmap coherence).
* The folder is created under the lock; its files appear by rename and ``meta.json`` is written last
  and atomically, so a folder without ``meta.json`` is an interrupted creation and is re-created.

Fidelity (measured, see ``benchmarks/RESULTS.md``)
--------------------------------------------------
* float32 on CPU: bit-identical to the live teacher on the training batch. oneDNN computes a sample's
  logits independently of the rest of the batch for batches of 4, 8 and >= 12 images, but differs in
  the last bit or two for sub-batches of 1-3, 5-7 and 9-11; the cache pads every sub-batch it sends to
  the teacher to at least :data:`MIN_BATCH` rows, so its entries equal a full batch's. (The live
  teacher itself, on an epoch's final partial batch of 1-11 images, can differ from them by that ulp.)
* float16 storage rounds each logit to 11 significant bits: relative error <= 2**-11 (measured numbers
  in RESULTS.md); it halves the size. bfloat16 storage is chosen automatically when the teacher runs
  under bf16 autocast, whose logits are bf16 values already, so it loses nothing.
* On GPUs, cuDNN may pick other algorithms for other batch sizes; cached and live logits then agree to
  the last bits (as GPU runs agree among themselves), not bit for bit.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Optional, Tuple

import numpy as np
import torch
from torch import Tensor, nn

from kdlib.errors import KDLibError
from kdlib.io import atomic_write_json, file_lock

__all__ = ["TeacherLogitCache", "MODES", "DTYPES", "MIN_BATCH", "FORMAT", "num_views", "view_params",
           "teacher_fingerprint", "images_fingerprint", "default_root", "resolve_dtype", "cache_bytes",
           "plan", "open_for_run"]

FORMAT = 1
#: ``teacher_cache`` values: auto (lazy when a teacher is used and the table fits), off, lazy, full
MODES = ("auto", "off", "lazy", "full")
#: ``teacher_cache_dtype`` values; auto = bfloat16 for a bf16-autocast teacher (lossless), else float32
DTYPES = ("auto", "float32", "float16", "bfloat16")
#: sub-batches sent to the teacher are padded to at least this many rows (batch-independent oneDNN kernels)
MIN_BATCH = 16
META, VALUES, FLAGS, LOCK = "meta.json", "logits.bin", "filled.bin", "lock"

_NP = {"float32": np.float32, "float16": np.float16, "bfloat16": np.uint16}
_TORCH = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2}


# -- views ----------------------------------------------------------------------------------------
def num_views(padding: int = 4) -> int:
    """Crop offsets per axis squared, times 2 flips: 162 for padding 4."""
    return (2 * padding + 1) ** 2 * 2


def view_params(view_ids: Tensor, padding: int = 4) -> Tuple[Tensor, Tensor]:
    """The inverse of :func:`kdlib.data.view_index`: ``(offsets int64 (B, 2), flips bool (B,))``."""
    side = 2 * padding + 1
    crop = view_ids // 2
    offsets = torch.stack([crop // side, crop % side], dim=1)
    return offsets, (view_ids % 2).bool()


# -- keys -----------------------------------------------------------------------------------------
def teacher_fingerprint(model: nn.Module) -> str:
    """SHA-256 over the state dict (names, dtypes, shapes, bytes): the identity of the teacher's weights."""
    h = hashlib.sha256()
    for name, value in model.state_dict().items():
        t = value.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def images_fingerprint(images_u8: Tensor) -> str:
    """SHA-256 of the uint8 training images (their shape included)."""
    t = images_u8.detach().cpu().contiguous()
    h = hashlib.sha256(f"{t.dtype}|{tuple(t.shape)}|".encode())
    h.update(t.numpy().tobytes())
    return h.hexdigest()


def default_root() -> Path:
    """``$KDLIB_HOME/logit_cache`` (``KDLIB_HOME`` defaults to ``~/.cache/kdlib``)."""
    from kdlib.config import kdlib_home

    return kdlib_home() / "logit_cache"


def resolve_dtype(dtype: str, amp: str) -> str:
    if dtype not in DTYPES:
        raise KDLibError(f"teacher_cache_dtype must be one of {', '.join(map(repr, DTYPES))}, got {dtype!r}")
    if dtype == "auto":
        return "bfloat16" if amp == "bf16" else "float32"
    return dtype


def cache_bytes(num_images: int, num_classes: int, padding: int = 4, dtype: str = "float32") -> int:
    """Size of a full table: values plus one flag byte per entry."""
    entries = num_images * num_views(padding)
    return entries * num_classes * _ITEMSIZE[dtype] + entries


def _available_memory(device: torch.device) -> Optional[int]:
    if device.type == "cuda":
        try:
            free, _ = torch.cuda.mem_get_info(device)
            return int(free)
        except Exception:  # noqa: BLE001 - no answer means no limit we can check
            return None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def _free_disk(path: Path) -> Optional[int]:
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        return shutil.disk_usage(probe).free
    except OSError:
        return None


def plan(mode: str, *, uses_teacher: bool, num_images: int, num_classes: int, device, amp: str = "none",
         dtype: str = "auto", padding: int = 4, root: Optional[Path] = None) -> Dict[str, Any]:
    """Decide the cache mode of a run: ``{"requested", "mode", "dtype", "bytes", "reason"}``.

    ``auto`` is ``lazy`` when the method uses a teacher and the table fits: at most half of the
    available memory of the device (RAM on a CPU, where the page cache holds it) and the free disk
    minus 1 GiB. Otherwise ``off``, with the reason. ``lazy`` and ``full`` are used as asked.
    """
    if mode not in MODES:
        raise KDLibError(f"teacher_cache must be one of {', '.join(map(repr, MODES))}, got {mode!r}")
    device = torch.device(device)
    dtype = resolve_dtype(dtype, amp)
    nbytes = cache_bytes(num_images, num_classes, padding, dtype)
    result = {"requested": mode, "mode": mode, "dtype": dtype, "bytes": nbytes, "reason": "asked for"}
    if not uses_teacher:
        return {**result, "mode": "off", "reason": "the method uses no teacher"}
    if mode != "auto":
        return result
    root = Path(root) if root is not None else default_root()
    memory = _available_memory(device)
    disk = _free_disk(root)
    if memory is not None and nbytes > memory // 2:
        return {**result, "mode": "off", "reason": f"a full table ({nbytes / 2**30:.2f} GiB) exceeds half of "
                                                    f"the free {device.type} memory ({memory / 2**30:.2f} GiB)"}
    if disk is not None and nbytes > disk - 2**30:
        return {**result, "mode": "off", "reason": f"a full table ({nbytes / 2**30:.2f} GiB) does not fit in "
                                                    f"the free disk at {root} ({disk / 2**30:.2f} GiB) minus 1 GiB"}
    return {**result, "mode": "lazy", "reason": "a teacher is used and the table fits in memory and on disk"}


def _sized_file(path: Path, size: int) -> None:
    """Create ``path`` holding ``size`` zero bytes by writing a temporary file and renaming it.

    The blocks are reserved (``posix_fallocate``, no data written) where the filesystem can: a write
    through a memory map into a sparse file on a full disk would kill the process with SIGBUS; this way
    a full disk is a clear error when the cache is created.
    """
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.truncate(size)
            if size and hasattr(os, "posix_fallocate"):
                try:
                    os.posix_fallocate(f.fileno(), 0, size)
                except OSError as exc:
                    if exc.errno == errno.ENOSPC:
                        raise KDLibError(f"no room for the teacher-logit cache ({size / 2**30:.2f} GiB) in "
                                         f"{path.parent}; free disk space, point KDLIB_HOME elsewhere or set "
                                         f"teacher_cache=off") from None
                    # EOPNOTSUPP / EINVAL: a filesystem without fallocate keeps the sparse file
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


# -- the cache ------------------------------------------------------------------------------------
class TeacherLogitCache:
    """``cache(images, keys) -> float32 logits (B, C)``: the live teacher's logits, computed once per view.

    ``teacher`` is the frozen teacher (its weights are hashed for the key); ``train_images`` the uint8
    training images on the training device (``fill`` augments them); ``live`` computes logits of a
    normalised batch (default: ``kdlib.teacher_logits.LiveTeacher(teacher, device, amp)``). ``channels_last`` is
    the memory format of the batches :meth:`fill` builds (the engine's setting, so that the teacher sees
    the same tensors it sees in training).
    """

    def __init__(self, teacher: nn.Module, train_images: Tensor, *, num_classes: int,
                 live: Optional[Callable[[Tensor, Any], Tensor]] = None, teacher_name: str = "teacher",
                 dataset_description: str = "", device=None, amp: str = "none", channels_last: bool = False,
                 padding: int = 4, dtype: str = "auto", root: Optional[os.PathLike] = None,
                 device_copy: Any = "auto", commit_interval: float = 30.0):
        if train_images.dtype != torch.uint8 or train_images.dim() != 4:
            raise KDLibError(f"the logit cache needs the uint8 training images (N, 3, H, W), got "
                             f"{train_images.dtype} {tuple(train_images.shape)}")
        self.device = torch.device(device) if device is not None else train_images.device
        self.teacher, self.train_images = teacher, train_images
        if live is None:
            from kdlib.teacher_logits import LiveTeacher

            live = LiveTeacher(teacher, self.device, amp)
        self.live = live
        self.amp, self.channels_last, self.padding = amp, bool(channels_last), int(padding)
        self.dtype = resolve_dtype(dtype, amp)
        self.num_images, self.num_classes = int(train_images.shape[0]), int(num_classes)
        self.views_per_image = num_views(self.padding)
        self.entries = self.num_images * self.views_per_image
        self.commit_interval = float(commit_interval)
        self.key = {
            "format": FORMAT, "teacher": teacher_name, "teacher_sha256": teacher_fingerprint(teacher),
            "dataset": dataset_description, "images_sha256": images_fingerprint(train_images),
            "num_images": self.num_images, "image_shape": list(train_images.shape[1:]),
            "num_classes": self.num_classes, "padding": self.padding, "views": self.views_per_image,
            "dtype": self.dtype, "device_type": self.device.type, "amp": amp,
        }
        digest = hashlib.sha256(json.dumps(self.key, sort_keys=True).encode()).hexdigest()[:16]
        name = (f"{teacher_name}-n{self.num_images}-p{self.padding}-{self.dtype}-{self.device.type}"
                f"{'-bf16' if amp == 'bf16' else ''}-{digest}")
        self.root = Path(root).expanduser() if root is not None else default_root()
        self.path = self.root / name
        # counters (python ints: reading them never synchronises a device)
        self.lookups = self.computed = self.teacher_calls = self.adopted = self.commits = 0
        self._pending: list = []
        self._last_commit = time.monotonic()
        self._open(device_copy)

    # -- files ------------------------------------------------------------------------------------
    def _open(self, device_copy: Any) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        values_size = self.entries * self.num_classes * _ITEMSIZE[self.dtype]
        with file_lock(self.path / LOCK):
            meta = self._read_meta()
            ok = (meta is not None and (self.path / VALUES).is_file() and (self.path / FLAGS).is_file()
                  and (self.path / VALUES).stat().st_size == values_size
                  and (self.path / FLAGS).stat().st_size == self.entries)
            if meta is not None and meta.get("key") != self.key:
                raise KDLibError(f"logit cache {self.path} holds another key (hash collision or a foreign "
                                 f"folder); delete it")
            if not ok:
                # interrupted creation or damaged files: a cache can always be rebuilt from scratch
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.path / META)
                _sized_file(self.path / VALUES, values_size)
                _sized_file(self.path / FLAGS, self.entries)
                atomic_write_json(self.path / META, {
                    "key": self.key, "shape": [self.num_images, self.views_per_image, self.num_classes],
                    "values": VALUES, "flags": FLAGS, "byte_order": "little",
                    "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                    "torch": torch.__version__, "channels_last": self.channels_last,
                    "threads": torch.get_num_threads()})
        self._values_mm = np.memmap(self.path / VALUES, dtype=_NP[self.dtype], mode="r+",
                                    shape=(self.entries, self.num_classes))
        self._flags_mm = np.memmap(self.path / FLAGS, dtype=np.uint8, mode="r+", shape=(self.entries,))
        host = torch.from_numpy(self._values_mm)
        self._host = host.view(torch.bfloat16) if self.dtype == "bfloat16" else host  # zero copy
        flags = torch.from_numpy(np.array(self._flags_mm, dtype=bool))
        if self.device.type == "cpu":
            self._store = self._host
        else:
            if device_copy == "auto":
                free = _available_memory(self.device)
                device_copy = free is None or self._host.numel() * self._host.element_size() <= free // 2
            self._store = None
            if device_copy:
                self._store = torch.empty(self._host.shape, dtype=self._host.dtype, device=self.device)
                step = max(1, 2**28 // (self.num_classes * _ITEMSIZE[self.dtype]))  # 256 MiB at a time
                for lo in range(0, self.entries, step):
                    self._store[lo:lo + step].copy_(self._host[lo:lo + step])
        self._filled = flags.to(self.device)
        self._complete = bool(flags.all())
        self.filled_at_open = int(flags.sum())

    def _read_meta(self) -> Optional[Dict[str, Any]]:
        path = self.path / META
        if not path.is_file():
            return None
        try:
            with open(path) as f:
                meta = json.load(f)
            return meta if isinstance(meta, dict) else None
        except (OSError, ValueError):
            return None

    # -- lookups ----------------------------------------------------------------------------------
    def __call__(self, images: Tensor, keys) -> Tensor:
        """float32 logits (B, C) of the batch's views; missing views go through the live teacher once."""
        if keys is None:
            raise KDLibError("the teacher-logit cache needs the keys of the batch's views (dataset indices, crop "
                             "offsets, flips); call it as teacher_logits(images, keys)")
        from kdlib.data import view_index

        flat = (keys.indices.to(self.device) * self.views_per_image
                + view_index(keys.offsets, keys.flips, self.padding).to(self.device))
        self.lookups += int(flat.shape[0])
        if not self._complete:
            miss = torch.nonzero(~self._filled.index_select(0, flat)).squeeze(1)  # one sync per step
            if miss.numel():
                self._fill_missing(images, flat, miss)
            if self._pending and time.monotonic() - self._last_commit >= self.commit_interval:
                self.commit()
        return self._gather(flat).float()

    @property
    def capturable(self) -> bool:
        """Whether a lookup may run inside a captured CUDA graph: only when every view is filled and the
        table lives on the device (a lookup is then one gather; a miss would need the host)."""
        return bool(self._complete) and self._store is not None and self._store.device.type == self.device.type

    def count_lookups(self, n: int) -> None:
        """Count ``n`` lookups made by replays of a captured graph (the graph runs no Python)."""
        self.lookups += int(n)

    def _gather(self, flat: Tensor) -> Tensor:
        if self._store is not None:
            return self._store.index_select(0, flat)
        return self._host.index_select(0, flat.cpu()).to(self.device)

    def _fill_missing(self, images: Tensor, flat: Tensor, miss: Tensor) -> None:
        miss_flat = flat.index_select(0, miss)
        # entries another process committed since we last looked: adopt them instead of recomputing
        on_disk = torch.from_numpy(self._flags_mm[miss_flat.cpu().numpy()].astype(bool))
        if bool(on_disk.any()):
            self._adopt(miss_flat.cpu()[on_disk])
            keep = (~on_disk).to(self.device)
            miss, miss_flat = miss[keep], miss_flat[keep]
            if miss.numel() == 0:
                return
        x = images.index_select(0, miss)
        if images.dim() == 4 and images.is_contiguous(memory_format=torch.channels_last):
            x = x.contiguous(memory_format=torch.channels_last)
        self._write(miss_flat, self._teacher(x))

    def _teacher(self, x: Tensor) -> Tensor:
        """Live logits of ``x``, padded to :data:`MIN_BATCH` rows (batch-independent kernels), float32."""
        n = x.shape[0]
        if n < MIN_BATCH:
            fmt = torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format
            x = torch.cat([x, x[:1].expand(MIN_BATCH - n, *x.shape[1:])]).contiguous(memory_format=fmt)
        self.teacher_calls += 1
        self.computed += n
        out = self.live(x, None)
        return out[:n].float()

    def _write(self, flat: Tensor, values: Tensor) -> None:
        """Store values (not yet flagged on disk: :meth:`commit` does that after flushing them)."""
        stored = values.to(_TORCH[self.dtype])
        flat_cpu = flat.cpu()
        if self._store is not None:
            self._store.index_copy_(0, flat.to(self._store.device), stored.to(self._store.device))
        if self._store is not self._host:
            self._host.index_copy_(0, flat_cpu, stored.cpu())
        self._filled.index_fill_(0, flat.to(self._filled.device), True)
        self._pending.append(flat_cpu.numpy().copy())

    def _adopt(self, flat_cpu: Tensor) -> None:
        """Take entries other processes committed: their values are in the shared file already."""
        if self._store is not None and self._store is not self._host:
            self._store.index_copy_(0, flat_cpu.to(self.device), self._host.index_select(0, flat_cpu).to(self.device))
        self._filled.index_fill_(0, flat_cpu.to(self._filled.device), True)
        self.adopted += int(flat_cpu.numel())

    # -- durability -------------------------------------------------------------------------------
    def commit(self) -> int:
        """Flush the values written since the last commit, then set and flush their flags; adopt others'.

        Returns the number of entries this process newly flagged.
        """
        n = 0
        if self._pending:
            flat = np.unique(np.concatenate(self._pending))
            self._values_mm.flush()  # msync: the values reach the file before any flag claims them
            with file_lock(self.path / LOCK):
                self._flags_mm[flat] = 1
                self._flags_mm.flush()
            self._pending = []
            n = int(flat.size)
            self.commits += 1
        self.refresh()
        self._last_commit = time.monotonic()
        return n

    def refresh(self) -> int:
        """Adopt every entry flagged on disk that this object does not hold yet; returns how many."""
        disk = torch.from_numpy(np.array(self._flags_mm, dtype=bool))
        new = torch.nonzero(disk & ~self._filled.cpu()).squeeze(1)
        if new.numel():
            self._adopt(new)
        self._complete = bool(disk.all()) or bool(self._filled.all())
        return int(new.numel())

    def close(self) -> None:
        """Commit what is pending and release the files (the object is unusable afterwards)."""
        if getattr(self, "_values_mm", None) is None:
            return
        self.commit()
        self._store = self._host = None
        self._values_mm = self._flags_mm = None

    def __enter__(self) -> "TeacherLogitCache":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- up-front fill ----------------------------------------------------------------------------
    def fill(self, images: Optional[Iterable[int]] = None, batch_size: Optional[int] = None,
             progress: bool = False, desc: str = "teacher logits") -> Dict[str, Any]:
        """Compute every missing view of ``images`` (dataset indices; default: all), ``batch_size`` views
        at a time (all views of ``batch_size // 162`` images; default 256 on a CPU, where larger batches
        fall out of the caches and run slower, 4096 on a GPU).
        Returns seconds, views computed and views per second."""
        from kdlib.data import crop_flip, normalize

        if batch_size is None:
            batch_size = 256 if self.device.type == "cpu" else 4096

        t0 = time.perf_counter()
        self.refresh()
        V = self.views_per_image
        order = torch.arange(self.num_images) if images is None else torch.as_tensor(list(images), dtype=torch.int64)
        done = self._filled.view(self.num_images, V).all(dim=1).cpu()
        todo = order[~done[order]]
        per = max(1, int(batch_size) // V)
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=int(todo.numel()) * V, desc=desc, unit="view", dynamic_ncols=True)
        computed_before = self.computed
        all_views = torch.arange(V, device=self.device)
        offsets, flips = view_params(all_views, self.padding)
        for lo in range(0, int(todo.numel()), per):
            chunk = todo[lo:lo + per].to(self.device)
            k = int(chunk.numel())
            flat = (chunk[:, None] * V + all_views[None, :]).reshape(-1)
            need = ~self._filled.index_select(0, flat)
            if bool(need.any()):
                imgs = self.train_images.index_select(0, chunk).repeat_interleave(V, dim=0)
                x = normalize(crop_flip(imgs, offsets.repeat(k, 1), flips.repeat(k), self.padding),
                              self.channels_last)
                values = self._teacher(x)
                sel = torch.nonzero(need).squeeze(1)
                self._write(flat.index_select(0, sel), values.index_select(0, sel))
            if bar is not None:
                bar.update(k * V)
            if time.monotonic() - self._last_commit >= self.commit_interval:
                self.commit()
        if bar is not None:
            bar.close()
        self.commit()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        seconds = time.perf_counter() - t0
        n = self.computed - computed_before
        return {"seconds": seconds, "views": n, "views_per_second": n / seconds if seconds > 0 else float("nan")}

    # -- facts ------------------------------------------------------------------------------------
    @property
    def complete(self) -> bool:
        return self._complete

    def filled_fraction(self) -> float:
        return float(self._filled.float().mean())

    def info(self) -> Dict[str, Any]:
        """What the run records about its cache (JSON-serialisable)."""
        return {"path": str(self.path), "dtype": self.dtype, "bytes": cache_bytes(
            self.num_images, self.num_classes, self.padding, self.dtype), "views": self.views_per_image,
            "filled_at_open": self.filled_at_open / self.entries, "filled": self.filled_fraction(),
            "lookups": self.lookups, "computed": self.computed, "teacher_calls": self.teacher_calls,
            "adopted": self.adopted, "device_copy": self._store is not None and self._store is not self._host,
            "teacher_sha256": self.key["teacher_sha256"], "images_sha256": self.key["images_sha256"]}


def open_for_run(cache_plan: Dict[str, Any], teacher: nn.Module, live, dataset, *, teacher_name: str,
                 device, amp: str, channels_last: bool, progress: bool = False,
                 root: Optional[os.PathLike] = None) -> Tuple[Optional[TeacherLogitCache], Dict[str, Any]]:
    """The engine's entry point: open (and for ``full``, fill) the cache a :func:`plan` decided on.

    Returns ``(cache or None, record)``; ``record`` is what the run writes to ``metrics.json``.
    """
    record = dict(cache_plan)
    if cache_plan["mode"] == "off":
        return None, record
    cache = TeacherLogitCache(teacher, dataset.train_images, num_classes=dataset.num_classes, live=live,
                              teacher_name=teacher_name, dataset_description=dataset.description,
                              device=device, amp=amp, channels_last=channels_last,
                              dtype=cache_plan["dtype"], root=root)
    if cache_plan["mode"] == "full":
        record["fill"] = cache.fill(progress=progress, desc=f"teacher logits ({teacher_name})")
    record.update(cache.info())
    return cache, record
