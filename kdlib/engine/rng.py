"""Random numbers of a run: per-epoch generators seeded by (seed, epoch), global seeding, RNG snapshots.

Nothing about the data order depends on earlier epochs: epoch ``e`` shuffles with a CPU generator seeded
by ``(seed, e, 1)`` and augments with a generator on the data's device seeded by ``(seed, e, 2)``, so a
resumed run sees exactly the batches of an uninterrupted one.
"""
from __future__ import annotations

import random
from typing import Any, Dict

import numpy as np
import torch

__all__ = ["epoch_generator", "seed_everything", "rng_state", "set_rng_state", "STREAM_SHUFFLE",
           "STREAM_AUGMENT", "STREAM_VIEWS"]

#: generator streams of one epoch: the shuffle, the augmentation, the extra views (methods' extra_views)
STREAM_SHUFFLE, STREAM_AUGMENT, STREAM_VIEWS = 1, 2, 3


def _mix_seed(*parts: int) -> int:
    state = np.random.SeedSequence([int(p) & 0xFFFFFFFFFFFFFFFF for p in parts]).generate_state(2, np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])  # < 2**63


def epoch_generator(seed: int, epoch: int, stream: int, device="cpu") -> torch.Generator:
    """The generator of one epoch's shuffle (stream 1) or augmentation (stream 2), seeded by (seed, epoch)."""
    return torch.Generator(device=device).manual_seed(_mix_seed(seed, epoch, stream))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds every CUDA device


def rng_state() -> Dict[str, Any]:
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]),
                  int(np_state[3]), float(np_state[4])),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
