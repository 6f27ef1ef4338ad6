"""The training engine: every run of every method, profile and chapter goes through :func:`train`.

A package of parts, each with one job, importing only downwards (``tests/test_imports.py`` checks it):

| module | job |
|---|---|
| :mod:`~kdlib.engine.run` | prepare a run: config, resume or refuse, data, teacher-logit source, student, method, optimizer |
| :mod:`~kdlib.engine.step` | the training step, from the shuffle to the epoch's sums, read top to bottom; the steps of an epoch |
| :mod:`~kdlib.engine.capture` | the step's CUDA-graph capture and replay (simulated off CUDA), and the check of what a graph cannot hold |
| :mod:`~kdlib.engine.loop` | :func:`train`: epochs, learning rate, signals, evaluation, checkpoints and records |
| :mod:`~kdlib.engine.evaluate` | batched predictions and test metrics |
| :mod:`~kdlib.engine.rundir` | the run directory's files, identity, checkpoints |
| :mod:`~kdlib.engine.rng` | per-epoch generators seeded by (seed, epoch), RNG snapshots |
| :mod:`~kdlib.engine.device` | device, execution and precision (graph, then amp), cuDNN autotuning, determinism |

One loop for all methods (the method turns logits into named loss terms; the engine has no
``if method == ...``), on any device:

* The dataset stays on the device as uint8. Epoch ``e`` (counted from 1) shuffles with a permutation
  drawn from a CPU ``torch.Generator`` seeded by ``(seed, e)`` and augments each batch (batched random
  crop + flip, then normalise) with a device generator seeded by ``(seed, e)``. Nothing about the data
  order depends on earlier epochs, so a resumed run sees exactly the batches of an uninterrupted one.
* The teacher is frozen: ``eval()`` mode, ``requires_grad=False``, outside the optimiser, forward under
  ``no_grad``. The network comes from a *teacher provider* (default :func:`kdlib.default_teacher_provider`,
  which loads or trains it with :mod:`kdlib.teachers`; the engine never imports that module). Its logits
  come through one interface (:mod:`kdlib.teacher_logits`): the live teacher, or (``teacher_cache``,
  default ``auto``) the exact cache of the 162 crop/flip views per image,
  :class:`kdlib.logit_cache.TeacherLogitCache`, shared by every run with that teacher and data
  (bit-identical logits on CPU in float32). ``metrics.json`` records which.
* Student forward (and teacher forward) may run under bf16 autocast (``amp``); the logits are cast to
  float32 before the method sees them, so every loss is computed in float32.
* SGD (momentum, weight decay, no Nesterov) over the student's and the method's parameters, the
  learning rate of epoch ``e`` being ``lr * lr_decay ** #(milestones < e)`` (mdistiller's
  ``adjust_learning_rate``).
* On CUDA (``graph=auto``) the whole step is captured once as a CUDA graph and replayed
  (:class:`~kdlib.engine.capture.GraphedStep`); the last partial batch of an epoch runs eagerly. A capture
  that fails does not stop the run: it steps eagerly on from the same state, and ``metrics.json`` records
  why, with the number of captures, replays and eager steps of each segment. The graph is freed when its
  run ends. The precision follows the execution: ``amp=auto`` is bf16 for a graphed CUDA step, fp32 for
  an eager one (bf16 on a CPU with native bf16), and a resumed run keeps the precision it started with.
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
of :data:`kdlib.config.EXECUTION_FIELDS`) is refused. On CPU the engine enables
``torch.use_deterministic_algorithms`` (warn-only) while it runs. On GPUs the engine turns on cuDNN
autotuning (:func:`fast_kernels`); the algorithms it picks and atomic-add kernels make runs differ in the
last bits from run to run, so GPU runs (and resumed GPU runs) agree statistically, not bit for bit.

SIGINT / SIGTERM: the current step finishes, the run stops without touching the last completed epoch's
checkpoint, ``metrics.json`` says ``"status": "interrupted"`` and :class:`TrainingInterrupted` (a
``KeyboardInterrupt``) is raised; running the same command again resumes. A second signal acts as usual.
"""
from __future__ import annotations

from kdlib.engine.capture import CaptureHazard, GraphedStep, check_capture_safety, live_graphs
from kdlib.engine.device import (Execution, autocast, compile_student, decide_execution, fast_kernels, machine_info, resolve_amp,
                                 resolve_device, resolve_graph)
from kdlib.engine.evaluate import evaluate, predict
from kdlib.engine.loop import TrainingInterrupted, lr_at, progress_at, train
from kdlib.engine.rng import epoch_generator, seed_everything
from kdlib.engine.rundir import (ARTIFACTS, CHECKPOINT, CONFUSION, METRICS, PREVIOUS_CHECKPOINT,
                                 SCHEMA_VERSION, STUDENT, read_checkpoint)
from kdlib.engine.step import EpochLoop, EpochSums, TrainingStep, check_extra_views, make_optimizer
from kdlib.teacher_logits import LiveTeacher, ViewKeys

__all__ = ["train", "lr_at", "progress_at", "evaluate", "predict", "LiveTeacher", "ViewKeys",
           "TrainingInterrupted", "TrainingStep", "EpochLoop", "EpochSums", "make_optimizer", "check_extra_views",
           "GraphedStep", "CaptureHazard", "check_capture_safety", "live_graphs", "Execution", "decide_execution",
           "compile_student", "fast_kernels", "resolve_device", "resolve_amp", "resolve_graph", "autocast", "machine_info",
           "epoch_generator", "seed_everything", "read_checkpoint", "METRICS", "CHECKPOINT",
           "PREVIOUS_CHECKPOINT", "CONFUSION", "ARTIFACTS", "STUDENT", "SCHEMA_VERSION"]
