"""Teachers: load a community checkpoint, or train one with the engine and cache it.

:func:`get_teacher` returns the frozen teacher of a run (``eval()``, ``requires_grad=False``, on the
device) and a dict describing it, with its accuracy on the run's own test set:

* ``teacher_checkpoint`` set: the file is loaded with :func:`kdlib.models.load_pretrained` (community
  format ``{"model": state_dict}``, e.g. mdistiller's ``cifar_teachers.tar``).
* otherwise the teacher is looked up in ``teachers_dir`` (default ``$KDLIB_HOME/teachers``, with
  ``KDLIB_HOME`` defaulting to ``~/.cache/kdlib``) under a key naming the architecture, the data (name,
  size, data seed), the profile and the teacher seed, plus a hash of the whole teacher recipe. If it is
  not there, the engine trains it (method ``vanilla``, the profile's teacher recipe:
  ``teacher_epochs``, ``teacher_lr``, ``teacher_milestones``, ``teacher_seed``) in
  ``teachers_dir/KEY/`` (a normal, resumable run directory with its own ``metrics.json``) and saves
  ``teachers_dir/KEY.pt`` = ``{"model": state_dict, "arch", "test_acc", "config", "dataset"}``.

The teacher is a run like any other (:func:`teacher_run_config`): the run layer (:mod:`kdlib.runs`)
plans it before the students that need it and trains it with :func:`train_teacher`. Two processes asking
for the same missing teacher do not both train it: the trainer holds the run's lock
(:class:`kdlib.engine.rundir.RunLock`) and the checkpoint appears by an atomic rename, so a reader never
sees half a file.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, Dict, Tuple

import torch
from torch import nn

from kdlib import config as kconfig
from kdlib.errors import KDLibError
from kdlib.io import atomic_torch_save

__all__ = ["get_teacher", "teacher_key", "teacher_path", "teacher_run_config", "train_teacher", "freeze"]


def teacher_key(config: kconfig.RunConfig) -> str:
    """Cache key of the teacher ``config`` would train: readable parts plus a hash of its recipe."""
    t = config.teacher_config()
    size = f"{t.train_per_class}pc" if t.train_per_class else "full"
    test = f"-test{t.test_per_class}pc" if t.test_per_class else ""
    return (f"{t.student}-{t.dataset}-{size}{test}-d{t.data_seed}-{t.profile}-s{t.seed}-"
            f"{t.identity_hash(8)}")


def teacher_path(config: kconfig.RunConfig) -> Path:
    """Where the cached teacher of ``config`` is (or will be) stored."""
    root = Path(config.teachers_dir).expanduser() if config.teachers_dir else kconfig.default_teachers_dir()
    return root / f"{teacher_key(config)}.pt"


def teacher_run_config(config: kconfig.RunConfig) -> kconfig.RunConfig:
    """The run that trains ``config``'s teacher, in ``teachers_dir/KEY/`` (its checkpoint: ``KEY.pt``)."""
    return config.teacher_config().replace(out=str(teacher_path(config).with_suffix("")))


def freeze(model: nn.Module) -> nn.Module:
    """Eval mode and no gradients: a teacher never changes, not even its BatchNorm statistics."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def train_teacher(teacher_run: kconfig.RunConfig, *, dataset=None, progress: bool = False,
                  verbose: bool = False) -> Path:
    """Train (or resume) the teacher run :func:`teacher_run_config` made and save its checkpoint
    ``<run dir>.pt``; returns that path. The caller holds the run's lock."""
    from kdlib import engine

    out = Path(teacher_run.out)
    path = out.with_suffix(".pt")
    if verbose:
        print(f"training teacher {teacher_run.student} ({teacher_run.epochs} epochs) -> {path}", flush=True)
    metrics = engine.train(teacher_run, progress=progress, verbose=verbose, _dataset=dataset)
    state = torch.load(out / engine.STUDENT, map_location="cpu", weights_only=True)
    atomic_torch_save(path, {
        "model": state["model"], "arch": teacher_run.student, "test_acc": metrics["final"]["test_acc"],
        "config": teacher_run.resolved().to_dict(), "dataset": metrics["config"]["dataset"]["description"],
    })
    return path


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def get_teacher(config: kconfig.RunConfig, dataset, device, *, progress: bool = False,
                verbose: bool = True) -> Tuple[nn.Module, Dict[str, Any]]:
    """The run's frozen teacher on ``device`` and its description (source, path, test accuracy)."""
    from kdlib import models
    from kdlib.engine import evaluate

    cfg = config.resolved()
    if not cfg.teacher:
        raise KDLibError(f"method {cfg.method!r} uses no teacher")
    device = torch.device(device)
    if cfg.teacher_checkpoint:
        path = Path(cfg.teacher_checkpoint).expanduser()
        if not path.is_file():
            raise KDLibError(f"teacher checkpoint {str(path)!r} does not exist")
        source, key = "checkpoint", None
    else:
        path = teacher_path(cfg)
        key = teacher_key(cfg)
        source = "cache"
        if not path.is_file():
            from kdlib.engine.rundir import RunLock

            with RunLock(path.with_suffix(""), wait=True):
                if not path.is_file():  # another process may have trained it while we waited
                    train_teacher(teacher_run_config(cfg), dataset=dataset, progress=progress, verbose=verbose)
                    source = "trained"
    model = models.load_pretrained(cfg.teacher, str(path), num_classes=dataset.num_classes)
    memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
    model = freeze(model.to(device=device, memory_format=memory_format))
    from kdlib.engine import resolve_amp

    result = evaluate(model, dataset.test_images.to(device), dataset.test_labels.to(device), dataset.num_classes,
                      cfg.eval_batch_size, bool(cfg.channels_last), resolve_amp(cfg.amp, device))
    info = {
        "arch": cfg.teacher,
        "source": source,
        "checkpoint": str(Path(os.path.abspath(path))),
        "key": key,
        "run_dir": str(Path(os.path.abspath(path.with_suffix("")))) if key else None,
        "test_acc": result["test_acc"],
        "test_acc5": result["test_acc5"],
        "test_loss": result["test_loss"],
        "per_class_acc": result["per_class_acc"],
        "evaluated_on": dataset.description,
        "sha256": _sha256(path),
    }
    return model, info
