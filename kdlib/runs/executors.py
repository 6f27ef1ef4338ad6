"""Execute planned runs, each under its lock: in this process, in a pool of worker processes, as submitit
jobs on this machine, or as Slurm arrays (:mod:`kdlib.runs.slurm`); and :func:`ensure`, the chapters' door.

Every executor trains a run with :func:`execute_run`: its lock, then :func:`kdlib.engine.train` (or
:func:`kdlib.teachers.train_teacher`), which resumes an interrupted run from its last completed epoch; a
failure goes to ``<run dir>/run_error.json``, so summaries rebuilt from the files know it. Every
executor trains the teachers before the runs that need them.
"""
from __future__ import annotations

import collections
import json
import os
import platform
import re
import sys
import time
import traceback
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from kdlib import config as kconfig
from kdlib.engine.rundir import RunLock, RunLocked
from kdlib.errors import KDLibError
from kdlib.io import atomic_write_json
from kdlib.runs.plan import ERROR, Run

try:
    from submitit.helpers import Checkpointable as _JobBase
except ImportError:  # pragma: no cover - submitit is a dependency; the other executors work without it
    _JobBase = object  # type: ignore[assignment,misc]

EXECUTORS = ("inline", "pool", "local", "slurm")
#: set by `kdlib book --executor`: a chapter records the runs it lacks in this file instead of training them,
#: then stops the cell, or with WAIT_ENV set waits until the book's executor has trained them
COLLECT_ENV, WAIT_ENV = "KDLIB_COLLECT_RUNS", "KDLIB_COLLECT_WAIT"


@dataclass
class Outcome:
    run: Run
    status: str  # finished, failed, incomplete (stopped from outside: resuming continues it), locked
    error: str = ""
    log: Optional[str] = None


class RunsCollected(BaseException):
    """Stops a chapter's cell at a run it lacks, in the book's collect mode: a BaseException, so that a
    chapter's own ``except Exception`` cannot take it for a result."""


def cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def run_threads(threads: Optional[int], cpus: int, workers: int) -> int:
    """The torch thread count of every run of a sweep or a book build, the same under every executor:
    ``threads``, else the CPUs of a Slurm task, at most this machine's cores shared by ``workers``.

    One explicit value, because on a CPU the thread count changes a run's numbers (sums split across
    threads add in another order) while the run keeps its identity: left to each executor, one run would
    give one number locally and another on the cluster. The engine records it (``segments[].threads``).
    """
    return int(threads) if threads is not None else max(1, min(int(cpus), (os.cpu_count() or 1) // max(1, workers)))


def last_line(exc: BaseException, limit: int = 300) -> str:
    """The line a table can show: ``Type: last line of the message`` (a FailedJobError's trace end)."""
    text = str(exc).split("----------------------")[1] if "----------------------" in str(exc) else str(exc)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    line = lines[-1] if lines else ""
    if not re.match(r"^[\w.]+(Error|Exception|Interrupt|Locked|Exit)\b", line):
        line = f"{type(exc).__name__}: {line}" if line else type(exc).__name__
    return line if len(line) <= limit else line[:limit - 3] + "..."


def write_error(run_dir: Path, message: str, detail: str = "", log: Optional[str] = None,
                status: str = "failed") -> None:
    """Why the run's last attempt ended unfinished: ``failed`` (an error) or ``incomplete`` (stopped from
    outside, e.g. a cancelled Slurm task: resuming continues it)."""
    atomic_write_json(Path(run_dir) / ERROR, {
        "error": message, "detail": detail, "log": log, "host": platform.node(), "status": status,
        "time": datetime.now(timezone.utc).isoformat(timespec="seconds")})


def execute_run(run: Run, *, threads: Optional[int] = None, cuda_visible_devices: Optional[str] = None,
                verbose: bool = False, wait: bool = False, raise_errors: bool = False) -> Dict[str, Any]:
    """Train one run under its lock; ``{"status", "error"}``. ``wait``: wait for another holder of the lock,
    else report ``locked``. A failure is recorded, then returned, or with ``raise_errors`` raised again."""
    if cuda_visible_devices is not None:  # before anything initialises CUDA in this process
        os.environ["CUDA_VISIBLE_DEVICES"] = cuda_visible_devices
    from kdlib import engine, teachers

    try:
        if threads is not None:
            import torch

            torch.set_num_threads(threads)
        with RunLock(run.run_dir, wait=wait):
            (run.run_dir / ERROR).unlink(missing_ok=True)  # a retry makes an old failure moot
            if not run.finished():
                train = teachers.train_teacher if run.role == "teacher" else engine.train
                train(run.config, verbose=verbose, **({} if run.role == "teacher" else {"progress": False}))
    except RunLocked as exc:
        return {"status": "locked", "error": str(exc)}
    except Exception as exc:  # noqa: BLE001 - recorded; one failed run must not stop the others
        try:
            write_error(run.run_dir, last_line(exc), traceback.format_exc())
        except OSError:
            pass  # an unwritable run directory: the returned status still says it
        if raise_errors:
            raise
        return {"status": "failed", "error": last_line(exc)}
    except engine.TrainingInterrupted as exc:  # a KeyboardInterrupt: the engine kept the last epoch
        if raise_errors:
            raise
        return {"status": "incomplete", "error": last_line(exc)}
    return {"status": "finished" if run.finished() else "incomplete", "error": ""}


class RunJob(_JobBase):  # type: ignore[misc,valid-type]
    """What a submitit job (a local job, a Slurm array task) calls: its runs, one after the other. Being
    ``Checkpointable``, a task reaching its Slurm time limit is requeued with the same arguments: finished
    runs are skipped and the engine resumes the others."""

    def __init__(self, runs: List[Run], threads: Optional[int] = None, cuda_visible_devices: Optional[str] = None):
        self.runs, self.threads, self.cuda_visible_devices = list(runs), threads, cuda_visible_devices

    def __call__(self) -> List[Dict[str, Any]]:
        return [execute_run(run, threads=self.threads, cuda_visible_devices=self.cuda_visible_devices)
                for run in self.runs]


class Progress:
    """The outcomes of the runs as they come, and a tqdm bar counting them on stderr, drawn on a terminal
    only (logs and the book's pages get nothing); a failed run gets a line."""

    def __init__(self, total: int, desc: str = "runs", enabled: bool = True):
        from tqdm import tqdm

        self.outcomes: List[Outcome] = []
        self.bar = tqdm(total=total, desc=desc, unit="run", dynamic_ncols=True, file=sys.stderr,
                        disable=None if enabled else True)

    def done(self, outcome: Outcome) -> None:
        self.outcomes.append(outcome)
        self.bar.update(1)
        self.bar.set_postfix(sorted(collections.Counter(o.status for o in self.outcomes).items()), refresh=True)
        if outcome.status == "failed" and not self.bar.disable:
            self.bar.write(f"failed: {outcome.run.label}: {outcome.error}", file=sys.stderr)

    def follow(self, jobs: Dict[Any, Tuple[Any, List[Run]]], outcome_of: Callable) -> None:
        """Take the outcomes of the ``jobs`` (key: (job, its runs)) that are over, ``outcome_of(job, runs)``
        being None while one is not, and drop those jobs: the local and the Slurm executors' polling."""
        for key, (job, runs) in list(jobs.items()):
            outcomes = outcome_of(job, runs)
            if outcomes is not None:
                del jobs[key]
                for outcome in outcomes:
                    self.done(outcome)


# -- in this process, and a pool of worker processes ---------------------------------------------------
def run_inline(runs: Sequence[Run], bar: Progress, threads: Optional[int] = None, verbose: bool = False,
               wait: bool = False, raise_errors: bool = False) -> None:
    import torch

    before = torch.get_num_threads()  # the caller's setting comes back afterwards
    try:
        for run in runs:
            bar.done(Outcome(run, **execute_run(run, threads=threads, verbose=verbose, wait=wait,
                                                raise_errors=raise_errors)))
    finally:
        torch.set_num_threads(before)


def run_workers(configs: Sequence[kconfig.RunConfig]) -> int:
    """How many runs the pool trains at once: one per CPU core on a CPU-only run, else 1.

    Small CIFAR networks use two cores poorly, so independent runs train faster side by side in worker
    processes of one thread each than one after the other with every thread. ``KDLIB_RUN_WORKERS=1``
    trains them one by one in this process.
    """
    setting = os.environ.get("KDLIB_RUN_WORKERS", "").strip()
    if setting and (not setting.isdigit() or int(setting) < 1):
        raise KDLibError(f"KDLIB_RUN_WORKERS must be a whole number >= 1, not {setting!r}")
    if not setting:
        import torch

        on_gpu = any(str(c.device).startswith("cuda") or (c.device == "auto" and torch.cuda.is_available())
                     for c in configs)
    return max(1, min(int(setting) if setting else 1 if on_gpu else cores(), len(configs)))


_POOL: Dict[tuple, Any] = {}


def _worker_ignores_interrupts() -> None:
    """Ctrl-C, or a notebook server stopping its kernel's process group, is for the kernel: the kernel
    cancels what has not started and the pool's workers exit when it goes (no traceback from each)."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)


def worker_pool(workers: int):
    """A process pool kept for the life of this process (a chapter asks for runs several times); a changed
    environment (``KDLIB_HOME``, ...) gets a new one. Spawned, not forked: forking a process whose OpenMP
    threads have run can hang the child."""
    import atexit
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    key = (workers, tuple(sorted(os.environ.items())))
    if key not in _POOL:
        for old in _POOL.values():
            old.shutdown(wait=True)
        _POOL.clear()
        _POOL[key] = ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"),
                                         initializer=_worker_ignores_interrupts)
        atexit.register(_POOL[key].shutdown, wait=False, cancel_futures=True)
    return _POOL[key]


def run_pool(runs: Sequence[Run], bar: Progress, workers: int, raise_errors: bool = True) -> None:
    """Teachers here with every thread, then the other runs ``workers`` at a time with ``cores // workers``
    threads each. With ``raise_errors`` the first error is raised once the runs not started yet are dropped
    (a run already training finishes in its worker, its lock keeping others out, and is reused next time)."""
    from concurrent.futures import as_completed

    run_inline([r for r in runs if r.role == "teacher"], bar, wait=True, raise_errors=raise_errors)
    threads, pool = max(1, cores() // workers), worker_pool(workers)
    futures = {pool.submit(execute_run, run, threads=threads, wait=True, raise_errors=raise_errors): run
               for run in runs if run.role != "teacher"}
    try:
        for future in as_completed(futures):
            bar.done(Outcome(futures[future], **future.result()))
    except BaseException:
        for future in futures:
            future.cancel()
        raise


def ensure(runs: Sequence[Run], verbose: bool = False) -> None:
    """The chapters' door: make sure ``runs`` are finished, training what is missing here (the pool on a
    CPU, :func:`run_workers`; one by one with the engine's lines when ``verbose``). Prints nothing.

    In the book's executor path (``KDLIB_COLLECT_RUNS`` names a file) nothing is trained here: the missing
    runs are appended to that file, then :class:`RunsCollected` stops the cell, or (``KDLIB_COLLECT_WAIT``)
    the call waits until the book's executor has trained them. A run the engine stopped (non-finite loss:
    a result, not an accident) raises the engine's recorded error, as training it again would.
    """
    todo, collect = [r for r in runs if not r.finished()], os.environ.get(COLLECT_ENV)
    if collect:  # every run the chapter asks for (a plan with its finished runs too), what it lacks marked
        with open(collect, "a") as handle:
            handle.writelines(json.dumps({"role": r.role, "needs": r.needs, "config": r.config.to_dict(),
                                          "missing": r in todo}) + "\n" for r in runs)
    if todo and collect:
        asked = time.time()
        _raise_recorded_failure(todo, since=0)
        if not os.environ.get(WAIT_ENV):
            raise RunsCollected(f"{len(todo)} run(s) recorded for the book's plan: {', '.join(r.label for r in todo)}")
        while any(not r.finished() for r in todo):  # trained by the book's executor meanwhile
            time.sleep(1.0)
            _raise_recorded_failure([r for r in todo if not r.finished()], since=asked)
    elif todo:
        workers = 1 if verbose else run_workers([r.config for r in todo if r.role != "teacher"] or [todo[0].config])
        bar = Progress(len(todo), desc="training")
        try:
            run_inline(todo, bar, verbose=verbose, wait=True, raise_errors=True) if workers == 1 \
                else run_pool(todo, bar, workers)
        finally:
            bar.bar.close()


def _raise_recorded_failure(runs: Sequence[Run], since: float) -> None:
    """The error of a run the engine stopped, or (from ``since`` on) whose attempt failed, as a KDLibError."""
    for run in runs:
        record, error = run.record() or {}, run.run_dir / ERROR
        if record.get("status") == "failed" and record.get("error"):
            raise KDLibError(record["error"])
        if since and error.is_file() and error.stat().st_mtime >= since - 1:
            written = json.loads(error.read_text())
            raise KDLibError(f"{run.label}: {written.get('error')} (log: {written.get('log')})")


# -- submitit jobs on this machine --------------------------------------------------------------------
def job_outcome(job: Any, runs: List[Run]) -> Optional[List[Outcome]]:
    """What a submitit job says once it is over (one outcome per run), or None while it runs.

    The result file counts as the end: submitit writes it before the job's interpreter exits, and tearing
    down a process that imported torch takes seconds on a busy machine. A job that ended without a
    result (killed, out of memory, time limit) fails its runs, with the last line of what submitit saw.
    """
    import pickle

    log = str(job.paths.stderr)
    if job.paths.result_pickle.exists():
        with open(job.paths.result_pickle, "rb") as handle:
            kind, value = pickle.load(handle)
        if kind == "success":
            return [Outcome(run, v.get("status", "failed"), v.get("error", ""), log) for run, v in zip(runs, value)]
        exc: BaseException = RuntimeError(str(value))
    elif job.done():
        exc = job.exception() or RuntimeError(f"job {job.job_id} ended without a result")
    else:
        return None
    for run in runs:
        if not run.finished():
            write_error(run.run_dir, last_line(exc), str(exc), log)
    return [Outcome(run, "finished" if run.finished() else "failed", last_line(exc), log) for run in runs]


def run_local(runs: Sequence[Run], bar: Progress, folder: Path, workers: int, threads: int,
              device: Optional[str] = None) -> None:
    """At most ``workers`` submitit local jobs at once (its LocalExecutor has no cap of its own), one GPU
    each round-robin (all of them when a ``cuda:N`` is named); a run starts once its teacher run is done."""
    import submitit

    executor = submitit.LocalExecutor(folder=str(folder))
    executor.update_parameters(timeout_min=60 * 24 * 365, gpus_per_node=0)  # submitit's default limit: 2 min
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    gpus = [] if device is not None and not str(device).startswith(("auto", "cuda")) else \
        [d.strip() for d in visible.split(",") if d.strip()] if visible is not None else \
        [str(i) for i in range(__import__("torch").cuda.device_count())]
    pending, running = list(runs), {}
    try:
        while pending or running:
            teachers = {str(r.run_dir) for r in [*pending, *(rs[0] for _, rs in running.values())]
                        if r.role == "teacher"}  # not done yet: the runs that need one wait
            for slot in [s for s in range(workers) if s not in running]:
                ready = next((r for r in pending if r.needs not in teachers), None)
                if ready is None:
                    break
                pending.remove(ready)
                gpu = ",".join(gpus) if re.fullmatch(r"cuda:\d+", str(device)) else gpus[slot % len(gpus)] if gpus else ""
                running[slot] = (executor.submit(RunJob([ready], threads, gpu)), [ready])
            bar.follow(running, job_outcome)
            time.sleep(0.5)
    except KeyboardInterrupt:  # SIGINT to every running job; the engine keeps each run's last epoch
        jobs = [job for job, _ in running.values()]
        for job in jobs:
            job.cancel(check=False)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not all(job.done() for job in jobs):
            time.sleep(0.5)
        raise
