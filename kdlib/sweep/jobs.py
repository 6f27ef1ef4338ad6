"""One run as a job: the run lock and :func:`execute_run` (what every executor calls)."""
from __future__ import annotations

import os
import platform
import re
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Dict, Optional

from kdlib import config as kconfig
from kdlib.errors import KDLibError
from kdlib.io import atomic_write_json
from kdlib.sweep.common import ERROR, LOCK

try:  # POSIX; without it (Windows) runs are not locked against a second sweep
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None  # type: ignore[assignment]

try:
    from submitit.helpers import Checkpointable as _JobBase
except ImportError:  # pragma: no cover - submitit is a dependency; inline mode works without it
    _JobBase = object  # type: ignore[assignment,misc]


# == locks ===========================================================================================
class RunLocked(KDLibError):
    """Another process is training this run right now."""


class RunLock:
    """An exclusive ``fcntl.flock`` on ``<run dir>/.sweep.lock``, held while the run trains.

    Why flock and not a pid file: the kernel releases the lock when the holding process exits, crashes
    or is killed, so there is no stale lock to detect; it works across hosts on NFS (Linux emulates flock
    with POSIX locks there); and two opens in one process conflict too, so inline sweeps and tests see
    it. The file's content (host, pid, start time) only serves the messages.
    """

    def __init__(self, run_dir: os.PathLike | str):
        self.path = Path(run_dir) / LOCK
        self._fd: Optional[int] = None

    def acquire(self, retry_seconds: float = 1.0) -> "RunLock":
        if fcntl is None:  # pragma: no cover
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        deadline = time.monotonic() + retry_seconds  # rides out a probe by holder() at the same instant
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    os.close(fd)
                    raise RunLocked(f"{self.path.parent} is being trained by another worker "
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
    def holder(run_dir: os.PathLike | str) -> Optional[str]:
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


# == one job =========================================================================================
def _last_line(exc: BaseException, limit: int = 300) -> str:
    """The line a table can show: ``Type: last line of the message`` (a FailedJobError's trace end)."""
    text = str(exc)
    if "----------------------" in text:  # submitit's FailedJobError: the trace sits between rulers
        text = text.split("----------------------")[1]
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    line = lines[-1] if lines else ""
    if not re.match(r"^[\w.]+(Error|Exception|Interrupt|Locked|Exit)\b", line):
        line = f"{type(exc).__name__}: {line}" if line else type(exc).__name__
    return line if len(line) <= limit else line[:limit - 3] + "..."


def _write_error(run_dir: Path, message: str, detail: str = "", log: Optional[str] = None,
                 status: str = "failed") -> None:
    """``sweep_error.json``: why the run's last job ended without finishing it. ``status`` is ``failed``
    (an error) or ``incomplete`` (stopped from outside, e.g. a cancelled Slurm task: resuming continues it)."""
    atomic_write_json(run_dir / ERROR, {
        "error": message, "detail": detail, "log": log, "host": platform.node(), "status": status,
        "time": datetime.now(timezone.utc).isoformat(timespec="seconds")})


def execute_run(config: Dict[str, Any] | kconfig.RunConfig, *, threads: Optional[int] = None,
                cuda_visible_devices: Optional[str] = None, verbose: bool = True) -> Dict[str, Any]:
    """Train one run under its lock; return ``{"status", "error", "best_test_acc", ...}``, never raise.

    Runs inside a job (or in process for ``--executor inline``). A failure is returned and written to
    ``<run dir>/sweep_error.json`` so that the summary, rebuilt later from the files, still knows it.
    """
    if cuda_visible_devices is not None:  # before anything initialises CUDA in this process
        os.environ["CUDA_VISIBLE_DEVICES"] = cuda_visible_devices
    run_dir: Optional[Path] = None
    try:
        from kdlib import engine

        cfg = config if isinstance(config, kconfig.RunConfig) else kconfig.RunConfig.from_dict(config)
        run_dir = Path(cfg.out)
        if threads is not None:
            import torch

            torch.set_num_threads(threads)
        with RunLock(run_dir):
            (run_dir / ERROR).unlink(missing_ok=True)  # a retry makes an old failure moot
            try:
                metrics = engine.train(cfg, progress=False, verbose=verbose)
            except engine.TrainingInterrupted as exc:
                return {"status": "incomplete", "error": _last_line(exc)}
            except Exception as exc:  # noqa: BLE001 - recorded while the lock is held: no retry races it
                return _failed(run_dir, exc)
    except RunLocked as exc:
        return {"status": "locked", "error": str(exc)}
    except Exception as exc:  # noqa: BLE001 - one failed run must not stop the sweep
        return _failed(run_dir, exc)
    final = metrics.get("final") or {}
    return {"status": "finished" if final else "incomplete", "error": "",
            "best_test_acc": final.get("best_test_acc"), "last_test_acc": final.get("test_acc")}


def _failed(run_dir: Optional[Path], exc: BaseException) -> Dict[str, Any]:
    message = _last_line(exc)
    if run_dir is not None:
        try:
            _write_error(run_dir, message, traceback.format_exc())
        except OSError:
            pass  # an unwritable run directory: the returned status still says it
    return {"status": "failed", "error": message}


class RunJob(_JobBase):  # type: ignore[misc,valid-type]
    """The callable each submitit job runs: :func:`execute_run` on one config.

    Being a ``submitit.helpers.Checkpointable``, a job that reaches its Slurm time limit is requeued
    with the same arguments, and the engine resumes the run from its last completed epoch.
    """

    def __init__(self, config: Dict[str, Any], threads: Optional[int] = None,
                 cuda_visible_devices: Optional[str] = None):
        self.config, self.threads, self.cuda_visible_devices = config, threads, cuda_visible_devices

    def __call__(self) -> Dict[str, Any]:
        return execute_run(self.config, threads=self.threads, cuda_visible_devices=self.cuda_visible_devices)
