"""Evaluation outside the training step: batched predictions and test metrics (eval mode, no grad).

Evaluation never runs inside a captured training graph: train/eval mode is frozen at capture.
"""
from __future__ import annotations

import contextlib
from typing import Any, Dict

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdlib.engine.device import autocast, to_input

__all__ = ["predict", "evaluate", "eval_mode"]


@contextlib.contextmanager
def eval_mode(model: nn.Module):
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def predict(model: nn.Module, images_u8: Tensor, batch_size: int = 256, channels_last: bool = False,
            amp: str = "none") -> Tensor:
    """float32 logits (N, C) of un-augmented uint8 images: eval mode, no grad, normalised, batched."""
    from kdlib.data import normalize

    device = images_u8.device
    outs = []
    with eval_mode(model), torch.no_grad():
        for start in range(0, images_u8.shape[0], batch_size):
            x = to_input(normalize(images_u8[start:start + batch_size]), channels_last)
            with autocast(device, amp):
                outs.append(model(x).float())
    if not outs:
        return torch.zeros(0, 0, device=device)
    return torch.cat(outs)


def evaluate(model: nn.Module, images_u8: Tensor, labels: Tensor, num_classes: int, batch_size: int = 256,
             channels_last: bool = False, amp: str = "none") -> Dict[str, Any]:
    """Top-1/top-5 accuracy (%), mean cross-entropy, per-class accuracy (%) and the confusion matrix.

    ``confusion[i, j]`` counts test images of class ``i`` predicted as ``j`` (int64 numpy array).
    """
    from kdlib.data import normalize

    device = images_u8.device
    C = num_classes
    k = min(5, C)
    correct1 = torch.zeros((), dtype=torch.int64, device=device)
    correct5 = torch.zeros((), dtype=torch.int64, device=device)
    loss_sum = torch.zeros((), dtype=torch.float32, device=device)
    confusion = torch.zeros(C * C, dtype=torch.int64, device=device)
    with eval_mode(model), torch.no_grad():
        for start in range(0, images_u8.shape[0], batch_size):
            x = to_input(normalize(images_u8[start:start + batch_size]), channels_last)
            y = labels[start:start + batch_size]
            with autocast(device, amp):
                logits = model(x)
            logits = logits.float()
            loss_sum += F.cross_entropy(logits, y, reduction="sum")
            top = logits.topk(k, dim=1).indices
            pred = top[:, 0]
            correct1 += (pred == y).sum()
            correct5 += (top == y[:, None]).any(dim=1).sum()
            confusion += torch.bincount(y * C + pred, minlength=C * C)
    n = int(labels.shape[0])
    confusion_np = confusion.view(C, C).cpu().numpy()
    per_class_n = confusion_np.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        per_class = np.where(per_class_n > 0, 100.0 * np.diag(confusion_np) / np.maximum(per_class_n, 1), np.nan)
    return {
        "test_acc": 100.0 * int(correct1) / max(n, 1),
        "test_acc5": 100.0 * int(correct5) / max(n, 1),
        "test_loss": float(loss_sum) / max(n, 1),
        "per_class_acc": [float(a) for a in per_class],
        "confusion": confusion_np,
    }

