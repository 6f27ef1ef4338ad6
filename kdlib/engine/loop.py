"""The epoch loop: learning rate, shuffling, steps (eager or replayed graph), signals, evaluation, records.

:func:`train` is the engine's entry point: :func:`kdlib.engine.run.open_run` and
:func:`~kdlib.engine.run.prepare`, then :func:`run_epochs`, then :func:`finish`.
"""
from __future__ import annotations

import contextlib
import math
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
from kdlib.engine.rng import STREAM_AUGMENT, STREAM_SHUFFLE, STREAM_VIEWS, epoch_generator, rng_state
from kdlib.engine.run import Run, open_run, optimizer_state, prepare
from kdlib.engine.step import EpochSums, GraphedStep
from kdlib.errors import KDLibError
from kdlib.io import atomic_torch_save, atomic_write, atomic_write_json
from kdlib.teacher_logits import TeacherProvider

__all__ = ["train", "lr_at", "progress_at", "TrainingInterrupted", "run_epochs", "finish"]


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


def progress_at(epoch: int, step: int, steps_per_epoch: int) -> float:
    """Training progress in epochs including this step (seam S1): the last step of epoch e gives e."""
    return (epoch - 1) + (step + 1) / steps_per_epoch


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


class _Stepper:
    """Runs the steps of an epoch: eagerly, or by replaying the captured graph of the full batch size."""

    def __init__(self, run: Run):
        from kdlib.methods.base import StepContext

        self.run = run
        cfg, device = run.opening.cfg, run.opening.device
        self.N = int(run.dataset.train_images.shape[0])
        self.bs = cfg.batch_size
        self.steps = max(1, math.ceil(self.N / self.bs))
        self.graph = run.graph
        self.graphed: Optional[GraphedStep] = None
        self.views = bool(run.step.extra_views)
        if self.graph:
            # one generator per stream for the whole run, re-seeded by (seed, epoch) in place: the graph
            # holds on to the generator objects it was captured with
            self.aug = torch.Generator(device=device)
            self.view_gen = torch.Generator(device=device) if self.views else None
            self.sums = EpochSums(device)
            self.ctx = StepContext(epoch=0, step=0, steps_per_epoch=self.steps, epochs=cfg.epochs,
                                   progress=torch.zeros((), dtype=torch.float32, device=device))

    def start_epoch(self, epoch: int):
        cfg, device = self.run.opening.cfg, self.run.opening.device
        perm = torch.randperm(self.N, generator=epoch_generator(cfg.seed, epoch, STREAM_SHUFFLE)).to(device)
        if self.graph:
            seed_of = lambda stream: epoch_generator(cfg.seed, epoch, stream).initial_seed()  # noqa: E731
            self.aug.manual_seed(seed_of(STREAM_AUGMENT))
            if self.view_gen is not None:
                self.view_gen.manual_seed(seed_of(STREAM_VIEWS))
            self.sums.reset()
            return perm, self.sums
        self.aug = epoch_generator(cfg.seed, epoch, STREAM_AUGMENT, device=device)
        self.view_gen = epoch_generator(cfg.seed, epoch, STREAM_VIEWS, device=device) if self.views else None
        return perm, EpochSums(device)

    def __call__(self, epoch: int, step: int, idx: Tensor, sums: EpochSums) -> None:
        from kdlib.methods.base import StepContext

        run, cfg = self.run, self.run.opening.cfg
        progress = progress_at(epoch, step, self.steps)
        full = int(idx.shape[0]) == self.bs
        if self.graph and full and (self.graphed is not None or run.optimizer.state):
            if self.graphed is None:  # resumed, warmed up: capture once, now (the momentum buffers exist)
                self.ctx.epoch, self.ctx.step = epoch, step
                self.ctx.progress.fill_(progress)
                self.graphed = GraphedStep(run.step, self.sums, self.bs, self.aug, self.view_gen, self.ctx,
                                           first_indices=idx)
            self.graphed.replay(idx, step, progress)
            return
        # eager: CPU, graph=false, the run's very first step (it creates the momentum buffers a fused
        # SGD capture needs) and the last partial batch of an epoch (never padded: BatchNorm would see it)
        ctx = StepContext(epoch=epoch, step=step, steps_per_epoch=self.steps, epochs=cfg.epochs, indices=idx,
                          progress=progress)
        run.step(idx, self.aug, ctx, sums, self.view_gen)


def run_epochs(run: Run, stop: Dict[str, Optional[int]], stop_after_epoch: Optional[int]) -> Optional[Dict]:
    """Train from ``run.start_epoch`` to the last epoch; returns the metrics when paused, else None."""
    opening, cfg = run.opening, run.opening.cfg
    out, log, name, metrics = opening.out, opening.log, opening.label, run.metrics
    metrics_path, ckpt_path = opening.metrics_path, opening.ckpt_path
    student, method, optimizer, cache = run.student, run.method, run.optimizer, run.cache
    dataset, C, eval_bs = run.dataset, run.dataset.num_classes, cfg.eval_batch_size
    channels_last, amp = bool(cfg.channels_last), opening.amp
    stepper = _Stepper(run)
    N, bs, steps = stepper.N, stepper.bs, stepper.steps
    history, best = run.history, run.best
    run.last_eval = None
    epoch_bar = _bar(opening.bars, total=cfg.epochs, initial=run.start_epoch - 1, desc=name, unit="epoch")
    try:
        for epoch in range(run.start_epoch, cfg.epochs + 1):
            t0 = time.perf_counter()
            lr = lr_at(epoch, cfg.lr, cfg.milestones, cfg.lr_decay)
            for group in optimizer.param_groups:
                if isinstance(group["lr"], Tensor):
                    group["lr"].fill_(lr)  # the graph reads this tensor at every replay
                else:
                    group["lr"] = lr
            student.train()
            method.train()
            if run.teacher is not None:
                run.teacher.eval()
            method.start_epoch(epoch)  # outside any graph; state changes in place (seam S2)
            perm, sums = stepper.start_epoch(epoch)
            batch_bar = _bar(opening.bars, total=steps, desc=f"epoch {epoch}", unit="batch", leave=False)
            for step in range(steps):
                stepper(epoch, step, perm[step * bs:(step + 1) * bs], sums)
                if batch_bar is not None:
                    batch_bar.update(1)
                if stop["signum"] is not None:
                    break
            if batch_bar is not None:
                batch_bar.close()
            if stop["signum"] is not None:
                raise TrainingInterrupted(stop["signum"], epoch, str(out))

            # -- once per epoch: read the sums, check them, evaluate, record ------------------------
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
            last_eval = evaluate(student, dataset.test_images, dataset.test_labels, C, eval_bs, channels_last, amp)
            run.last_eval = last_eval
            row.update({k: last_eval[k] for k in ("test_acc", "test_acc5", "test_loss", "per_class_acc")})
            row["method"] = rundir.jsonable(method.end_epoch(epoch) or {})
            row["epoch_seconds"] = time.perf_counter() - t0
            row["train_seconds"] = train_seconds
            row["images_per_second"] = N / train_seconds if train_seconds > 0 else float("nan")
            history.append(row)
            if row["test_acc"] > best["test_acc"]:
                best = {"test_acc": row["test_acc"], "epoch": epoch}
                run.best = best

            rundir.keep_previous_checkpoint(ckpt_path)
            atomic_torch_save(ckpt_path, {
                "epoch": epoch, "student": student.state_dict(), "method": method.state_dict(),
                "optimizer": optimizer_state(optimizer), "scheduler": {"epoch": epoch, "lr": lr},
                "best": best, "history": history, "rng": rng_state(), "identity": opening.identity})
            metrics["history"] = history
            metrics["best"] = best
            atomic_write_json(metrics_path, metrics)
            log(f"[{name}] epoch {epoch}/{cfg.epochs} lr {lr:.4g} loss {row['train_loss']:.4f} "
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
                log(f"[{name}] paused after epoch {epoch} (run again to continue)")
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
    return None


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
