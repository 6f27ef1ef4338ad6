"""The epoch loop: learning rate, shuffling, steps (eager or replayed graph), signals, evaluation, records.

:func:`train` is the engine's entry point: :func:`kdlib.engine.run.open_run` and
:func:`~kdlib.engine.run.prepare`, then :func:`run_epochs`, then :func:`finish`.
"""
from __future__ import annotations

import contextlib
import signal
import threading
import time
from typing import Any, Dict, Optional

import numpy as np
import torch
from torch import Tensor

from kdlib import config as kconfig
from kdlib.engine import rundir
from kdlib.engine.device import deterministic, fast_kernels
from kdlib.engine.evaluate import evaluate
from kdlib.engine.rng import rng_state
from kdlib.engine.run import Run, open_run, optimizer_state, prepare
from kdlib.engine.step import EpochLoop
from kdlib.errors import KDLibError
from kdlib.io import atomic_torch_save, atomic_write, atomic_write_json
from kdlib.methods.base import progress_at
from kdlib.teacher_logits import TeacherProvider

__all__ = ["train", "lr_at", "progress_at", "set_learning_rate", "TrainingInterrupted", "run_epochs", "finish"]


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


def lr_at(epoch: int, base_lr: float, milestones, decay: float) -> float:
    """Learning rate of ``epoch`` (from 1): ``base_lr * decay ** #(milestones < epoch)``."""
    steps = sum(1 for m in milestones if epoch > m)
    return base_lr * (decay ** steps) if steps > 0 else base_lr


@contextlib.contextmanager
def stop_on_signals():
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


def _bar(enabled: bool, **kwargs):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(dynamic_ncols=True, **kwargs)


def train(config: kconfig.RunConfig, progress: bool = True, *, verbose: bool = True,
          stop_after_epoch: Optional[int] = None, teacher_provider: Optional[TeacherProvider] = None,
          _dataset=None) -> Dict[str, Any]:
    """Train (or distil) one run described by ``config`` into ``config.out``; return its metrics.

    ``progress`` shows tqdm bars (only on a terminal); ``verbose`` prints one summary line per epoch.
    ``stop_after_epoch`` pauses the run once that epoch is recorded (``"status": "paused"``); running
    it again continues. A finished run prints "already finished" and returns its metrics.
    ``teacher_provider`` gives the frozen teacher (:data:`kdlib.teacher_logits.TeacherProvider`);
    default :func:`kdlib.default_teacher_provider` (load or train it with :mod:`kdlib.teachers`).
    """
    opening = open_run(config, progress=progress, verbose=verbose, stop_after_epoch=stop_after_epoch)
    if opening.finished is not None:
        return opening.finished
    with deterministic(opening.device), fast_kernels(opening.device), stop_on_signals() as stop:
        run = prepare(opening, teacher_provider=teacher_provider, progress=progress, verbose=verbose,
                      _dataset=_dataset)
        atomic_write_json(opening.metrics_path, run.metrics)
        paused = run_epochs(run, stop, stop_after_epoch)
        if paused is not None:
            return paused
        return finish(run)


def set_learning_rate(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """The epoch's learning rate, in place where it is a tensor (a captured step reads that tensor)."""
    for group in optimizer.param_groups:
        if isinstance(group["lr"], Tensor):
            group["lr"].fill_(lr)
        else:
            group["lr"] = lr


def run_epochs(run: Run, stop: Dict[str, Optional[int]], stop_after_epoch: Optional[int]) -> Optional[Dict]:
    """Train from ``run.start_epoch`` to the last epoch; returns the metrics when paused, else None."""
    opening, cfg, metrics = run.opening, run.opening.cfg, run.metrics
    loop = EpochLoop(run.step, seed=cfg.seed, batch_size=cfg.batch_size, epochs=cfg.epochs, graph=run.graph,
                     log=lambda message: opening.log(f"[{opening.label}] {message}"))
    run.last_eval = None
    epoch_bar = _bar(opening.bars, total=cfg.epochs, initial=run.start_epoch - 1, desc=opening.label, unit="epoch")
    try:
        for epoch in range(run.start_epoch, cfg.epochs + 1):
            row = _train_epoch(run, loop, epoch, stop)
            _record_epoch(run, loop, epoch, row)
            if epoch_bar is not None:
                epoch_bar.update(1)
            if stop["signum"] is not None:
                raise TrainingInterrupted(stop["signum"], epoch + 1, str(opening.out))
            if stop_after_epoch is not None and stop_after_epoch <= epoch < cfg.epochs:
                metrics["status"] = "paused"
                atomic_write_json(opening.metrics_path, metrics)
                opening.log(f"[{opening.label}] paused after epoch {epoch} (run again to continue)")
                return metrics
    except TrainingInterrupted:
        metrics["status"] = "interrupted"
        metrics["segments"][-1].update(loop.counts())
        atomic_write_json(opening.metrics_path, metrics)
        raise
    finally:
        if epoch_bar is not None:
            epoch_bar.close()
        if run.cache is not None:
            run.cache.close()
        loop.release()
    return None


def _train_epoch(run: Run, loop: EpochLoop, epoch: int, stop: Dict[str, Optional[int]]) -> Dict[str, Any]:
    """The epoch's steps; returns the start of its history row (learning rate, train sums, times)."""
    opening, cfg, metrics = run.opening, run.opening.cfg, run.metrics
    t0 = time.perf_counter()
    lr = lr_at(epoch, cfg.lr, cfg.milestones, cfg.lr_decay)
    set_learning_rate(run.optimizer, lr)
    run.student.train()
    run.method.train()
    if run.teacher is not None:
        run.teacher.eval()
    run.method.start_epoch(epoch)  # outside any graph; state changes in place
    batch_bar = _bar(opening.bars, total=loop.steps_per_epoch, desc=f"epoch {epoch}", unit="batch", leave=False)
    sums = loop.run_epoch(epoch, stop=stop, on_step=batch_bar.update if batch_bar is not None else None)
    if batch_bar is not None:
        batch_bar.close()
    if stop["signum"] is not None:
        raise TrainingInterrupted(stop["signum"], epoch, str(opening.out))
    if run.cache is not None:
        run.cache.commit()  # this epoch's new entries become visible to every other run
        metrics["segments"][-1]["teacher_cache"] = {
            k: v for k, v in run.cache.info().items() if k in ("filled", "lookups", "computed", "adopted")}
    epoch_sums = sums.read()  # the epoch's one host synchronisation
    bad_step = epoch_sums.pop("bad_step")
    if bad_step >= 0:
        message = (f"non-finite loss (nan/inf) at epoch {epoch}, step {bad_step} of run {opening.out}; "
                   f"the checkpoint of epoch {epoch - 1} is kept. Lower the learning rate or "
                   f"check the method's hyperparameters")
        metrics.update(status="failed", error=message)
        metrics["segments"][-1].update(loop.counts())
        atomic_write_json(opening.metrics_path, metrics)
        raise KDLibError(message)
    return {"epoch": epoch, "lr": lr, **epoch_sums, "_t0": t0, "_train_seconds": time.perf_counter() - t0}


def _record_epoch(run: Run, loop: EpochLoop, epoch: int, row: Dict[str, Any]) -> None:
    """Evaluate, then the epoch's history row, checkpoint and ``metrics.json``, and the log line."""
    opening, cfg, metrics = run.opening, run.opening.cfg, run.metrics
    t0, train_seconds = row.pop("_t0"), row.pop("_train_seconds")
    dataset, student = run.dataset, run.student
    last_eval = evaluate(student, dataset.test_images, dataset.test_labels, dataset.num_classes,
                         cfg.eval_batch_size, bool(cfg.channels_last), opening.amp)
    run.last_eval = last_eval
    row.update({k: last_eval[k] for k in ("test_acc", "test_acc5", "test_loss", "per_class_acc")})
    row["method"] = rundir.jsonable(run.method.end_epoch(epoch) or {})
    row["epoch_seconds"] = time.perf_counter() - t0
    row["train_seconds"] = train_seconds
    row["images_per_second"] = loop.num_images / train_seconds if train_seconds > 0 else float("nan")
    run.history.append(row)
    if row["test_acc"] > run.best["test_acc"]:
        run.best = {"test_acc": row["test_acc"], "epoch": epoch}
    rundir.keep_previous_checkpoint(opening.ckpt_path)
    atomic_torch_save(opening.ckpt_path, {
        "epoch": epoch, "student": student.state_dict(), "method": run.method.state_dict(),
        "optimizer": optimizer_state(run.optimizer), "scheduler": {"epoch": epoch, "lr": row["lr"]},
        "best": run.best, "history": run.history, "rng": rng_state(), "identity": opening.identity})
    metrics["history"], metrics["best"] = run.history, run.best
    metrics["segments"][-1].update(loop.counts())
    atomic_write_json(opening.metrics_path, metrics)
    best = run.best
    opening.log(f"[{opening.label}] epoch {epoch}/{cfg.epochs} lr {row['lr']:.4g} loss {row['train_loss']:.4f} "
                f"train {row['train_acc']:.2f}% test {row['test_acc']:.2f}% "
                f"(best {best['test_acc']:.2f}% @ {best['epoch']}) {row['epoch_seconds']:.1f}s "
                f"{row['images_per_second']:.0f} img/s")


def finish(run: Run) -> Dict[str, Any]:
    """The end: confusion, final weights, method artifacts, then ``final`` in ``metrics.json``."""
    opening, cfg, metrics = run.opening, run.opening.cfg, run.metrics
    out, dataset, student, method = opening.out, run.dataset, run.student, run.method
    history, best = run.history, run.best
    last_eval = getattr(run, "last_eval", None)
    if last_eval is None:  # the last epoch was checkpointed by a process that stopped right after
        last_eval = evaluate(student, dataset.test_images, dataset.test_labels, dataset.num_classes,
                             cfg.eval_batch_size, bool(cfg.channels_last), opening.amp)
    atomic_write(out / rundir.CONFUSION, lambda f: np.save(f, last_eval["confusion"]))
    atomic_torch_save(out / rundir.STUDENT, {"model": student.state_dict(), "arch": cfg.student,
                                             "test_acc": last_eval["test_acc"]})
    artifacts = method.artifacts() or {}
    if artifacts:
        arrays = {k: (v.detach().cpu().numpy() if isinstance(v, Tensor) else np.asarray(v))
                  for k, v in artifacts.items()}
        atomic_write(out / rundir.ARTIFACTS, lambda f: np.savez(f, **arrays))
    metrics["final"] = {
        "epochs": cfg.epochs,
        "test_acc": last_eval["test_acc"],
        "test_acc5": last_eval["test_acc5"],
        "test_loss": last_eval["test_loss"],
        "best_test_acc": best["test_acc"],
        "best_epoch": best["epoch"],
        "per_class_acc": last_eval["per_class_acc"],
        "confusion": rundir.CONFUSION,
        "student": rundir.STUDENT,
        "method_artifacts": rundir.ARTIFACTS if artifacts else None,
        "wall_seconds": float(sum(r.get("epoch_seconds", 0.0) for r in history)),
    }
    metrics["status"] = "finished"
    metrics["best"] = best
    atomic_write_json(opening.metrics_path, metrics)
    # a finished run never resumes, so the spare checkpoint would only double the disk use
    with contextlib.suppress(FileNotFoundError):
        (out / rundir.PREVIOUS_CHECKPOINT).unlink()
    opening.log(f"[{opening.label}] finished: last {last_eval['test_acc']:.2f}%, best {best['test_acc']:.2f}% "
                f"@ epoch {best['epoch']} -> {out}")
    return metrics
