"""Reading community checkpoints into state dicts, with errors that say what is wrong with the file.

The released teachers (``cifar_teachers/<name>_vanilla/ckpt_epoch_240.pth``) are
``{"model": state_dict, "epoch": int, "accuracy": ..., "optimizer": ...}``; mdistiller's full checkpoints
hold the whole distiller, so the student's keys start with ``module.student.`` (and the teacher's with
``module.teacher.``).

Files are read with ``torch.load(weights_only=True)``: it rebuilds tensors, numbers, strings and
containers but cannot run code hidden in a pickle. Some files also hold a few plain python objects
(numpy scalars for an accuracy, an ``argparse.Namespace`` of options). Those few harmless types are
allow-listed one by one and the file is read again, still restricted. Any other python object would need
full unpickling, which can execute arbitrary code: that happens only when the caller passes
``allow_pickle=True`` for a file they trust.
"""
from __future__ import annotations

import importlib
import pickle
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

from kdlib.errors import KDLibError

# python objects that are plain data and may appear beside the weights
_HARMLESS_GLOBALS = {
    "argparse.Namespace",
    "numpy.dtype",
    "numpy.ndarray",
    "numpy.core.multiarray.scalar",
    "numpy._core.multiarray.scalar",
    "numpy.core.multiarray._reconstruct",
    "numpy._core.multiarray._reconstruct",
}
_HARMLESS_PATTERN = re.compile(r"numpy\.dtypes\.\w+DType")
# torch's two ways of saying which python object the restricted unpickler refused
_REFUSED_GLOBAL = (
    re.compile(r"Unsupported global: GLOBAL ([\w.]+)"),
    re.compile(r"allowlisted via `add_safe_globals`, but got <class '([\w.]+)'>"),
)
_WRAPPER_PREFIXES = ("module.student.", "student.")
_SHOW = 5  # how many offending keys an error message lists


def _resolve_harmless(name: str):
    if name not in _HARMLESS_GLOBALS and not _HARMLESS_PATTERN.fullmatch(name):
        return None
    module, _, attr = name.rpartition(".")
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError):
        return None


def _refused_global(err: BaseException) -> Optional[str]:
    for pattern in _REFUSED_GLOBAL:
        match = pattern.search(str(err))
        if match:
            return match.group(1)
    return None


def _not_a_checkpoint(path: Path, err: BaseException) -> KDLibError:
    text = str(err)
    # keep torch's actual reason, not the generic advice wrapped around a weights-only failure
    if "WeightsUnpickler error:" in text:
        text = text.split("WeightsUnpickler error:", 1)[1]
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    reason = f"{type(err).__name__}: {lines[0]}" if lines else type(err).__name__
    return KDLibError(f"{path} is not a PyTorch checkpoint that torch.load can read ({reason})")


def read_checkpoint(path, map_location="cpu", allow_pickle: bool = False):
    """``torch.load`` the file restricted to weights and plain data; see the module docstring."""
    path = Path(path)
    if not path.exists():
        raise KDLibError(f"checkpoint file {path} does not exist")
    if not path.is_file():
        raise KDLibError(f"checkpoint path {path} is not a file")
    if path.stat().st_size == 0:
        raise KDLibError(f"checkpoint file {path} is empty")
    allowed: List[Tuple[object, str]] = []
    while True:
        try:
            with torch.serialization.safe_globals(allowed):
                return torch.load(path, map_location=map_location, weights_only=True)
        except pickle.UnpicklingError as err:
            name = _refused_global(err)
            if name is None:
                raise _not_a_checkpoint(path, err) from err
            obj = _resolve_harmless(name)
            if obj is not None and all(n != name for _, n in allowed):
                allowed.append((obj, name))
                continue
            if not allow_pickle:
                raise KDLibError(
                    f"{path} holds the python object {name!r} besides the weights; kdlib does not "
                    "unpickle arbitrary objects because that can run code from the file. If you trust "
                    "the file, pass allow_pickle=True."
                ) from err
            break
        except Exception as err:  # noqa: BLE001 -- whatever torch.load trips on, the file is unreadable
            raise _not_a_checkpoint(path, err) from err
    try:
        return torch.load(path, map_location=map_location, weights_only=False)
    except Exception as err:  # noqa: BLE001
        raise _not_a_checkpoint(path, err) from err


def _describe(obj) -> str:
    if isinstance(obj, Mapping):
        keys = list(obj)[:_SHOW]
        return f"a {type(obj).__name__} with {len(obj)} entries (keys {keys})"
    return f"a {type(obj).__name__}"


def extract_state_dict(obj, path) -> Dict[str, torch.Tensor]:
    """The state dict inside a loaded checkpoint: ``obj["model"]`` (or ``obj["state_dict"]``) or ``obj``.

    Wrapper prefixes are removed: ``module.student.``/``student.`` (mdistiller distillers: only the
    student's keys are kept) and any number of leading ``module.`` (``DataParallel``).
    """
    if isinstance(obj, Mapping):
        for key in ("model", "state_dict"):
            inner = obj.get(key)
            if isinstance(inner, (Mapping, nn.Module)):
                obj = inner
                break
    if isinstance(obj, nn.Module):
        obj = obj.state_dict()
    if not (
        isinstance(obj, Mapping)
        and obj
        and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())
    ):
        raise KDLibError(
            f"{path} is not a model checkpoint: expected a state dict (a dict of tensors) or "
            f"{{'model': state_dict, ...}}, found {_describe(obj)}"
        )
    state = dict(obj)
    for prefix in _WRAPPER_PREFIXES:
        if any(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
            break
    while state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def _listing(items: List[str], what: str) -> str:
    shown = ", ".join(items[:_SHOW])
    more = f", ... ({len(items) - _SHOW} more)" if len(items) > _SHOW else ""
    return f"{len(items)} {what} ({shown}{more})"


def mismatch_report(expected: Mapping[str, torch.Size], state: Mapping) -> Optional[str]:
    """None when ``state`` fits the ``expected`` key -> shape layout, else a short report.

    A missing ``num_batches_tracked`` is not a mismatch (see :func:`fill_batch_counters`).
    """
    missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in expected]
    shapes = [
        f"{k}: file {list(state[k].shape)} vs model {list(expected[k])}"
        for k in expected
        if k in state and state[k].shape != expected[k]
    ]
    parts = []
    if missing:
        parts.append(_listing(missing, "missing keys"))
    if unexpected:
        parts.append(_listing(unexpected, "unexpected keys"))
    if shapes:
        parts.append(_listing(shapes, "shape mismatches"))
    return "; ".join(parts) or None


def fill_batch_counters(expected: Mapping, state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Checkpoints written before PyTorch 0.4.1 lack BN's ``num_batches_tracked``: start those at 0."""
    for k, v in expected.items():
        if k.endswith("num_batches_tracked") and k not in state:
            state[k] = torch.zeros_like(v, device="cpu")
    return state
