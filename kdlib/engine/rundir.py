"""A run directory on disk: its files, its identity, its lock, reading and keeping checkpoints.

Files (every one written atomically, :mod:`kdlib.io`): ``metrics.json`` (rewritten after every epoch),
``checkpoint.pt`` (after every epoch; the one it replaces stays as ``checkpoint.prev.pt``, a hard link, so
``checkpoint.pt`` never vanishes), and at the end ``confusion.npy``, ``student.pt``, ``method_artifacts.npz``.
``.lock`` is the run's lock (:class:`RunLock`): whoever trains the run holds it.
"""
from __future__ import annotations

import contextlib
import json
import os
import platform
import time
import shutil
import subprocess
import tempfile
from pathlib import Path
from datetime import datetime, timezone
from typing import Any, Dict, List, Optional, Union

import numpy as np
import torch
from torch import Tensor

from kdlib import config as kconfig
from kdlib.errors import KDLibError

__all__ = ["RunLock", "RunLocked", "LOCK", "METRICS", "CHECKPOINT", "PREVIOUS_CHECKPOINT", "CONFUSION", "ARTIFACTS", "STUDENT",
           "SCHEMA_VERSION", "read_checkpoint", "read_metrics_file", "identity_from_metrics", "diff",
           "keep_previous_checkpoint", "read_resume_checkpoint", "check_writable", "versions", "git_commit",
           "dataset_info", "jsonable", "normalised"]

METRICS = "metrics.json"
CHECKPOINT = "checkpoint.pt"
PREVIOUS_CHECKPOINT = "checkpoint.prev.pt"
CONFUSION = "confusion.npy"
ARTIFACTS = "method_artifacts.npz"
STUDENT = "student.pt"
LOCK = ".lock"
SCHEMA_VERSION = 1

try:  # POSIX; without it (Windows) runs are not locked against a second process
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None  # type: ignore[assignment]


class RunLocked(KDLibError):
    """Another process is training this run right now."""


class RunLock:
    """The one lock of a run: an exclusive ``flock`` on ``<run dir>/.lock``, held while the run trains.

    Every way of running (a chapter, a sweep's job, a Slurm task, a teacher trained for a student) takes
    it, so two processes never train one run. flock, not a pid file: the kernel releases it when the
    holder exits, crashes or is killed (no stale lock), it works across hosts on NFS (Linux emulates it
    with POSIX locks there), and two opens in one process conflict too. The file's content (host, pid,
    start) only serves the messages. ``wait=True`` waits for the holder (a chapter asking for a run another
    chapter is training), ``wait=False`` raises :class:`RunLocked` (a sweep skips the run).
    """

    def __init__(self, run_dir: Union[str, os.PathLike], wait: bool = False):
        self.path, self.wait, self._fd = Path(run_dir) / LOCK, wait, None

    def acquire(self, retry_seconds: float = 1.0) -> "RunLock":
        if fcntl is None:  # pragma: no cover
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        deadline = time.monotonic() + retry_seconds  # rides out a probe by holder() at the same instant
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | (0 if self.wait else fcntl.LOCK_NB))
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    os.close(fd)
                    raise RunLocked(f"{self.path.parent} is being trained by another process "
                                    f"({_read_holder(self.path) or 'unknown'})") from None
                time.sleep(0.1)
        stamp = f"{platform.node()} pid {os.getpid()} since {datetime.now(timezone.utc).isoformat(timespec='seconds')}"
        os.ftruncate(fd, 0)
        os.write(fd, stamp.encode())
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            try:
                os.ftruncate(self._fd, 0)
                fcntl.flock(self._fd, fcntl.LOCK_UN)
            finally:
                os.close(self._fd)
                self._fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()

    @staticmethod
    def holder(run_dir: Union[str, os.PathLike]) -> Optional[str]:
        """Who holds the run's lock right now ("host pid N since ..."), or None when nobody does."""
        path = Path(run_dir) / LOCK
        if fcntl is None or not path.is_file():
            return None
        fd = os.open(path, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)  # shared: never blocks another prober
        except BlockingIOError:
            return _read_holder(path) or "another process"
        finally:
            os.close(fd)  # closing drops a lock we may have taken
        return None


def _read_holder(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return ""


# -- run records ----------------------------------------------------------------------------------
def versions() -> Dict[str, str]:
    import kdlib

    return {"kdlib": getattr(kdlib, "__version__", "?"), "torch": torch.__version__,
            "numpy": np.__version__, "python": platform.python_version()}


def git_commit() -> Optional[str]:
    try:
        root = Path(__file__).resolve().parents[2]
        res = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5)
        return res.stdout.strip() or None if res.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def dataset_info(dataset) -> Dict[str, Any]:
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


def jsonable(value: Any) -> Any:
    """Method facts (end_epoch/setup) as JSON: tensors and numpy values become lists/numbers."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [jsonable(v) for v in (sorted(value) if isinstance(value, set) else value)]
    if isinstance(value, Tensor):
        return jsonable(value.detach().cpu().tolist())
    if isinstance(value, np.ndarray):
        return jsonable(value.tolist())
    if isinstance(value, np.generic):
        return value.item()
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return str(value)


def normalised(obj: Any) -> Any:
    return json.loads(json.dumps(obj, sort_keys=True, default=str))



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


def read_metrics_file(path: Path) -> Dict[str, Any]:
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError) as exc:
        raise KDLibError(f"{path} is unreadable ({exc}); delete the run directory {path.parent} to start over") from None
    if not isinstance(data, dict) or "config" not in data:
        raise KDLibError(f"{path} is not a kdlib metrics file; choose another --out")
    return data


def identity_from_metrics(metrics: Dict[str, Any]) -> Dict[str, Any]:
    run = dict(metrics.get("config", {}).get("run", {}))
    for name in kconfig.EXECUTION_FIELDS:
        run.pop(name, None)
    return run


def diff(old: Dict[str, Any], new: Dict[str, Any]) -> List[str]:
    keys = sorted(set(old) | set(new))
    return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys if old.get(k) != new.get(k)]


def keep_previous_checkpoint(ckpt_path: Path) -> None:
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


def read_resume_checkpoint(ckpt_path: Path) -> Dict[str, Any]:
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


def check_writable(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-test.", dir=out)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise KDLibError(f"cannot write to the run directory {str(out)!r} ({exc.strerror or exc}); "
                         f"choose another --out") from None


