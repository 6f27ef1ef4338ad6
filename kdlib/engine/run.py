"""Preparing a run: config, resume or refuse, data, teacher-logit source, student, method, optimizer.

:func:`open_run` decides, before anything is computed, whether ``config.out`` is a new run, a run to
resume (its checkpoint is read here) or a finished run, and refuses a directory holding another run.
:func:`prepare` then builds everything the epoch loop needs, in an order that fixes the random numbers
(the goldens of ``tests/test_golden_engine.py`` hold it): data, teacher (from the *teacher provider*),
``seed_everything``, student, method, ``method.setup``, optimizer, teacher-logit source, resume.

The engine never imports the module that trains teachers: the teacher network comes from a provider
passed in by whoever prepares the run (:data:`kdlib.teacher_logits.TeacherProvider`); without one,
the library's default, :func:`kdlib.default_teacher_provider`, is used.
"""
from __future__ import annotations

import math
import os
import platform
import sys
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import torch
from torch import Tensor, nn

from kdlib import config as kconfig
from kdlib import logit_cache
from kdlib.engine import rundir
from kdlib.engine.capture import graph_blockers
from kdlib.engine.device import compile_student, decide_execution, machine_info, resolve_device
from kdlib.engine.evaluate import predict
from kdlib.engine.rng import seed_everything, set_rng_state
from kdlib.engine.step import TrainingStep, check_extra_views, make_optimizer
from kdlib.errors import KDLibError
from kdlib.teacher_logits import LiveTeacher, TeacherProvider

__all__ = ["Opening", "Run", "open_run", "prepare", "Logger", "label"]


class Logger:
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


def label(cfg: kconfig.RunConfig) -> str:
    pair = f"{cfg.teacher}->{cfg.student}" if cfg.teacher else cfg.student
    return f"{cfg.method} {pair} seed {cfg.seed}"


@dataclass
class Opening:
    """What the run directory says before anything is built."""

    cfg: kconfig.RunConfig
    out: Path
    identity: Dict[str, Any]
    previous: Optional[Dict[str, Any]]  # metrics.json of an earlier segment
    ckpt: Optional[Dict[str, Any]]  # the checkpoint to resume from
    finished: Optional[Dict[str, Any]]  # metrics of a finished run: nothing to do
    device: torch.device
    graph: bool  # the step will be captured (decided with the method and compile; see decide_execution)
    amp: str  # the student's precision, chosen after the graph decision
    log: Logger
    label: str
    bars: bool
    execution_notes: List[str] = field(default_factory=list)  # why the graph is off, why amp was kept

    @property
    def metrics_path(self) -> Path:
        return self.out / rundir.METRICS

    @property
    def ckpt_path(self) -> Path:
        return self.out / rundir.CHECKPOINT


def open_run(config: kconfig.RunConfig, *, progress: bool, verbose: bool,
             stop_after_epoch: Optional[int]) -> Opening:
    """Check the config and the run directory; read what is there (resume) or refuse."""
    if not isinstance(config, kconfig.RunConfig):
        raise KDLibError(f"train() expects a kdlib.config.RunConfig, got {type(config).__name__}")
    config.validate()
    cfg = config.resolved()
    if not cfg.out:
        raise KDLibError("the run needs an output directory (config.out / --out DIR)")
    if stop_after_epoch is not None and (not isinstance(stop_after_epoch, int) or stop_after_epoch < 1):
        raise KDLibError(f"stop_after_epoch must be an epoch >= 1, got {stop_after_epoch!r}")
    out = Path(cfg.out).expanduser()
    metrics_path, ckpt_path = out / rundir.METRICS, out / rundir.CHECKPOINT
    identity = rundir.normalised(cfg.identity())
    bars = bool(progress) and sys.stderr.isatty()
    log = Logger(verbose, bars)
    name = label(cfg)
    device = resolve_device(cfg.device)
    previous = rundir.read_metrics_file(metrics_path) if metrics_path.is_file() else None
    execution = _execution(cfg, device, previous)
    opening = Opening(cfg, out, identity, previous, None, None, device, execution.graph, execution.amp, log, name,
                      bars, execution.notes)
    if previous is not None:
        differences = rundir.diff(rundir.identity_from_metrics(previous), identity)
        if differences:
            raise KDLibError(f"{out} holds a different run ({'; '.join(differences)}); "
                             f"use another --out or delete that directory")
        if previous.get("final"):
            log(f"[{name}] already finished: {out} (best {previous['final']['best_test_acc']:.2f}%, "
                f"last {previous['final']['test_acc']:.2f}%)")
            opening.finished = previous
            return opening
    ckpt = rundir.read_resume_checkpoint(ckpt_path) if ckpt_path.is_file() else None
    if ckpt is not None:
        differences = rundir.diff(ckpt["identity"], identity)
        if differences:
            raise KDLibError(f"{ckpt_path} belongs to a different run ({'; '.join(differences)}); "
                             f"use another --out or delete that directory")
    elif previous is not None and previous.get("history"):
        raise KDLibError(f"{out} records {len(previous['history'])} epochs but has no {rundir.CHECKPOINT} to "
                         f"resume from; delete the directory to start over")
    opening.ckpt = ckpt
    rundir.check_writable(out)
    return opening


def _execution(cfg: kconfig.RunConfig, device: torch.device, previous: Optional[Dict[str, Any]]):
    """Graph and precision of this segment: :func:`kdlib.engine.device.decide_execution`."""
    from kdlib import methods

    method = methods.get(cfg.method)
    return decide_execution(getattr(cfg, "graph", "auto"), cfg.amp, device, method=cfg.method,
                            graph_safe=bool(getattr(method, "graph_safe", True)), compile=bool(cfg.compile),
                            previous_segments=(previous or {}).get("segments", []))


@dataclass
class Run:
    """Everything the epoch loop needs, built by :func:`prepare`."""

    opening: Opening
    dataset: Any
    student: nn.Module
    method: nn.Module
    optimizer: torch.optim.Optimizer
    step: TrainingStep
    teacher: Optional[nn.Module]
    cache: Optional[logit_cache.TeacherLogitCache]
    lr: Optional[Tensor]  # the learning rate as a float32 device tensor (graph mode), else None
    graph: bool  # the step will be captured
    history: List[Dict[str, Any]] = field(default_factory=list)
    best: Dict[str, Any] = field(default_factory=lambda: {"test_acc": -math.inf, "epoch": 0})
    start_epoch: int = 1
    metrics: Dict[str, Any] = field(default_factory=dict)
    last_eval: Optional[Dict[str, Any]] = None  # the last epoch's evaluation in this process


def _default_provider() -> TeacherProvider:
    import kdlib

    return kdlib.default_teacher_provider


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: Dict[str, Any]) -> None:
    """``optimizer.load_state_dict`` keeping this run's own execution options (fused, lr tensor):
    a checkpoint written in graph mode resumes eagerly and the other way round."""
    own = [{k: g[k] for k in ("lr", "fused", "foreach", "capturable", "differentiable") if k in g}
           for g in optimizer.param_groups]
    optimizer.load_state_dict(state)
    for group, keep in zip(optimizer.param_groups, own):
        lr = keep.pop("lr")
        group.update(keep)
        if isinstance(lr, Tensor):
            lr.fill_(float(group["lr"]))
            group["lr"] = lr


def optimizer_state(optimizer: torch.optim.Optimizer) -> Dict[str, Any]:
    """``optimizer.state_dict()`` with a tensor learning rate written as a float (portable checkpoints)."""
    state = optimizer.state_dict()
    for group in state["param_groups"]:
        if isinstance(group.get("lr"), Tensor):
            group["lr"] = float(group["lr"])
    return state


def prepare(opening: Opening, *, teacher_provider: Optional[TeacherProvider] = None, progress: bool = False,
            verbose: bool = True, _dataset=None) -> Run:
    """Build data, teacher source, student, method and optimizer; load the checkpoint when resuming.

    The order fixes the random numbers: data, teacher, ``seed_everything``, student, method, setup,
    optimizer, teacher-logit source, resume."""
    from kdlib import methods, models
    from kdlib.data import load_dataset
    from kdlib.methods.base import SetupContext

    cfg, device, amp, log, name = opening.cfg, opening.device, opening.amp, opening.log, opening.label
    channels_last = bool(cfg.channels_last)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format

    # -- data and teacher (the provider may train the teacher here, with a nested train()) -----------
    dataset = _dataset if _dataset is not None else load_dataset(
        cfg.dataset, root=cfg.data_root, train_per_class=cfg.train_per_class,
        test_per_class=cfg.test_per_class, seed=cfg.data_seed)
    dataset = dataset.to(device)
    C = dataset.num_classes
    teacher, teacher_info = None, None
    method_cls = methods.get(cfg.method)
    if method_cls.uses_teacher:
        provider = teacher_provider if teacher_provider is not None else _default_provider()
        teacher, teacher_info = provider(cfg, dataset, device, progress=progress, verbose=verbose)

    # -- student and method, seeded; setup sees a fresh student both on a new run and on resume -------
    seed_everything(cfg.seed)
    student = models.create(cfg.student, num_classes=C).to(device=device, memory_format=memory_format)
    method = methods.build(cfg.method, **cfg.method_params).to(device)
    check_extra_views(method, teacher, dataset.train_images)
    eval_bs = cfg.eval_batch_size

    def predict_fn(model: nn.Module, images_u8: Tensor) -> Tensor:
        return predict(model, images_u8, eval_bs, channels_last, "none")  # scores that steer training: fp32

    setup_facts = method.setup(SetupContext(
        num_classes=C, student=student, teacher=teacher, train_images=dataset.train_images,
        train_labels=dataset.train_labels, predict=predict_fn, device=device, epochs=cfg.epochs)) or {}
    graph = opening.graph
    optimizer = make_optimizer(list(student.parameters()) + list(method.parameters()), lr=cfg.lr,
                               momentum=cfg.momentum, weight_decay=cfg.weight_decay, graph=graph, device=device)
    lr_tensor = optimizer.param_groups[0]["lr"] if graph else None
    forward_student = compile_student(student, device, cfg.compile)
    if cfg.compile and forward_student is student:
        log(f"[{name}] compile=true ignored on {device.type}: torch.compile is slower than eager on CPUs")
    # the teacher's logits stay float32 on a CPU even when the student trains in bf16: oneDNN's bf16
    # logits of a sample depend on the rest of its batch, so a cache filled in other batches would no
    # longer equal the live teacher (kdlib.logit_cache, "Fidelity"); the teacher is a forward pass only
    teacher_amp = amp if device.type == "cuda" else "none"
    teacher_logits, cache, cache_record = _teacher_logits(opening, teacher, dataset, teacher_amp)
    step = TrainingStep(images_u8=dataset.train_images, labels=dataset.train_labels, forward=forward_student,
                        method=method, optimizer=optimizer, teacher_logits=teacher_logits, teacher=teacher,
                        device=device, amp=amp, channels_last=channels_last, teacher_amp=teacher_amp)
    for note in opening.execution_notes:  # why the graph is off, why the precision was kept
        log(f"[{name}] {note}")
    if graph:
        blockers = graph_blockers(method, teacher_logits, bool(cfg.compile))
        if blockers:  # the teacher-logit source (method and compile were decided before anything was built)
            log(f"[{name}] graph mode off, eager steps: {'; '.join(blockers)}")
            graph = False

    run = Run(opening, dataset, student, method, optimizer, step, teacher, cache, lr_tensor, graph)
    if opening.ckpt is not None:
        _resume(run, opening)
    run.metrics = _first_metrics(run, method_cls, setup_facts, teacher_info, cache_record)
    return run


def _teacher_logits(opening: Opening, teacher: Optional[nn.Module], dataset, teacher_amp: str):
    """Where the step gets the teacher's logits: the live teacher, or the exact cache
    (:mod:`kdlib.logit_cache`) where it pays; with the cache's record for ``metrics.json``."""
    cfg, device, graph, log, name = opening.cfg, opening.device, opening.graph, opening.log, opening.label
    teacher_logits: Optional[Callable] = LiveTeacher(teacher, device, teacher_amp) if teacher is not None else None
    cache_plan = logit_cache.plan(cfg.teacher_cache, uses_teacher=teacher is not None,
                                  num_images=int(dataset.train_images.shape[0]), num_classes=dataset.num_classes,
                                  device=device, amp=teacher_amp, dtype=cfg.teacher_cache_dtype)
    if graph and cfg.teacher_cache == "auto" and cache_plan["mode"] == "lazy":
        # a graph cannot fill a lazy cache (a miss needs the host): fill it up front, once per teacher and
        # data, shared by every run (see RunConfig.graph; decided from GPU measurements, not measured here)
        cache_plan.update(mode="full", reason=cache_plan["reason"] + "; graph mode fills it up front")
    cache, cache_record = logit_cache.open_for_run(cache_plan, teacher, teacher_logits, dataset,
                                                   teacher_name=str(cfg.teacher), device=device, amp=teacher_amp,
                                                   channels_last=bool(cfg.channels_last), progress=opening.bars)
    if cache is not None:
        if graph and not cache.capturable:
            # a lazy (incomplete) cache cannot be read inside a graph: the live teacher runs in the graph
            cache_record["graph"] = "not used in graph mode: incomplete or not on the device; live teacher"
            log(f"[{name}] teacher logits: live teacher inside the graph (the cache is incomplete)")
            cache.close()
            cache = None
        else:
            teacher_logits = cache
            log(f"[{name}] teacher logits: {cache_record['mode']} cache ({cache_record['dtype']}, "
                f"{100 * cache_record['filled']:.1f}% filled) {cache_record['path']}")
    return teacher_logits, cache, cache_record


def _resume(run: Run, opening: Opening) -> None:
    """Load the checkpoint's student, method, optimizer, history and random state into ``run``."""
    ckpt = opening.ckpt
    try:
        run.student.load_state_dict(ckpt["student"])
        run.method.load_state_dict(ckpt["method"])
        load_optimizer_state(run.optimizer, ckpt["optimizer"])
    except (RuntimeError, KeyError, ValueError) as exc:
        raise KDLibError(f"checkpoint {opening.ckpt_path} does not fit this run ({exc}); delete the run "
                         f"directory {opening.out} to start over") from None
    run.history, run.best = list(ckpt["history"]), dict(ckpt["best"])
    run.start_epoch = int(ckpt["epoch"]) + 1
    set_rng_state(ckpt["rng"])


def _first_metrics(run: Run, method_cls, setup_facts, teacher_info, cache_record) -> Dict[str, Any]:
    """``metrics.json`` as this segment starts: the resolved config and what the run was built from."""
    opening = run.opening
    cfg, previous = opening.cfg, opening.previous
    return {
        "schema": rundir.SCHEMA_VERSION,
        "status": "running",
        "config": {
            "run": cfg.to_dict(),
            "profile": cfg.profile,
            "seed": cfg.seed,
            "method": {"name": cfg.method, "hparams": rundir.jsonable(cfg.method_params),
                       "defaults": rundir.jsonable(dict(method_cls.defaults)),
                       "uses_teacher": bool(method_cls.uses_teacher), "setup": rundir.jsonable(setup_facts),
                       "recipe": rundir.jsonable(cfg.method_recipe())},
            "dataset": rundir.dataset_info(run.dataset),
            "teacher": teacher_info,
            "teacher_cache": cache_record,
            "versions": rundir.versions(),
            "git_commit": rundir.git_commit(),
            "created": (previous or {}).get("config", {}).get("created")
            or datetime.now(timezone.utc).isoformat(timespec="seconds"),
        },
        "history": run.history,
        "final": None,
        "segments": list((previous or {}).get("segments", [])) + [{
            "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "start_epoch": run.start_epoch, "device": str(opening.device), "amp": opening.amp,
            "channels_last": bool(cfg.channels_last), "threads": torch.get_num_threads(),
            # where it ran: a Slurm job's id (None elsewhere), so a record says which job trained it
            "host": platform.node(), "slurm_job": os.environ.get("SLURM_JOB_ID"), "graph": run.graph,
            "machine": machine_info(), "execution_notes": list(opening.execution_notes),
            "graph_captures": 0, "graph_replays": 0, "eager_steps": 0, "graph_fallback": None}],
    }
