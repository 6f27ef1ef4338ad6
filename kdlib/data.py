"""Data: the CIFAR-100 reader, the offline ``synthetic`` dataset, and batched crop/flip/normalise.

Every chapter and every run gets its images from :func:`load_dataset`, as one :class:`ImageDataset` of
uint8 tensors. Augmentation is batched tensor work (:func:`random_crop_flip`, :func:`crop_flip`,
:func:`normalize`) so it runs wherever the images are, CPU or GPU, without PIL or a DataLoader.

CIFAR-100
---------
:func:`load_cifar100` reads the official python layout ``ROOT/cifar-100-python/{train,test,meta}``
(``python data_scripts/download_cifar100.py --root ROOT`` puts it there). The files are pickles; they
are read with an unpickler that only accepts the handful of numpy objects the official files contain,
so a corrupt or foreign file is refused with a :class:`~kdlib.errors.KDLibError` instead of running
code or returning a wrong array. Subsets (``train_per_class``/``test_per_class``, the ``course``
profile) take the **first n images of each class in file order**; the official files are already in a
random order, so this is a uniform sample, and it is the same for every seed, so runs with different
seeds differ only in training randomness, never in their data.

The synthetic dataset
---------------------
``synthetic`` is CIFAR-100-shaped (100 classes in 20 superclasses of 5, 32x32 RGB uint8) and built in a
second from a seed, so the whole book runs without a download. It is designed so that the analyses of
the book mean something on it: sibling classes look alike (top-K similar classes and class
correlations are real), and classes differ in difficulty by design (class-wise accuracy spreads, and
distillation can help some classes and hurt others).

The generative recipe (:func:`make_synthetic`; all draws come from ``torch.Generator`` objects seeded
from ``seed``, one for the class design, one for the training images and one for the test images, so
the test set does not change when ``train_per_class`` does and nothing depends on the global RNG):

1. **Superclass prototypes.** Each of the 20 superclasses draws a scene: a sinusoidal grating
   (orientation uniform in [0, pi), frequency uniform in [1.5, 4] cycles per image, a foreground and a
   background colour, each channel uniform in [0.1, 0.9]) with a soft-edged coloured disc on top
   (centre uniform in the middle half of the image, radius 0.25-0.45 of the half-width, colour uniform).
2. **Fine classes.** Each of the 5 classes of a superclass moves its prototype in a random direction
   of this parameter space (a standard normal vector), by a class-specific distance
   ``class_separation * u`` with ``u`` uniform in ``separation_range``. One unit moves the orientation by
   0.3 rad, the frequency by a factor e^0.2, each colour channel by 0.1, the disc centre by 0.15 of the
   half-width and its radius by a factor e^0.15. Siblings therefore share a look, and how far a class
   sits from its siblings varies from class to class.
3. **Class difficulty.** Each class gets a pixel-noise level; the 100 levels are evenly spaced over
   ``noise_range`` and shuffled across classes (so every superclass mixes easy and hard classes). They
   are stored as ``ImageDataset.class_difficulty``, the ground truth for accuracy-vs-difficulty plots.
4. **Samples.** Every image re-draws the nuisances: the grating phase (uniform), a jitter of its
   orientation (normal, ``orientation_jitter`` rad), its contrast (uniform in [0.5, 1]), a global
   brightness factor and a per-channel colour cast (normal, ``colour_jitter``), the disc radius
   (factor e^N(0, 0.1)) and a translation of the whole scene (uniform, up to ``max_shift`` pixels per
   axis). Then noise of the class's level ``s`` is added: white noise of std ``s`` plus a smooth
   clutter field (a 4x4 normal field upsampled bicubically) of std ``clutter * s``, which hides colour
   and disc cues that white noise alone would leave to averaging. Values are clipped to [0, 1] and
   rounded to uint8.

Determinism: the same arguments give the same tensors on a machine (the generation is a fixed sequence
of CPU tensor operations). Different seeds give different class designs and images.

Augmentation
------------
``crop_flip`` is exactly torchvision's ``RandomCrop(32, padding=4)`` followed by
``RandomHorizontalFlip()`` for given parameters: zero padding in pixel space (before normalisation),
crop offsets ``(top, left)`` in ``0..2*padding`` of the padded image, then the flip. The standard space
has 9 x 9 x 2 = 162 views per image; :func:`view_index` numbers them, for exact teacher-logit caches.
"""
from __future__ import annotations

import inspect
import math
import os
import pickle
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from kdlib.errors import KDLibError, unknown_name

__all__ = [
    "CIFAR100_MEAN",
    "CIFAR100_STD",
    "DATASETS",
    "ImageDataset",
    "CIFAR100Meta",
    "load_dataset",
    "load_cifar100",
    "cifar100_meta",
    "make_synthetic",
    "default_root",
    "random_crop_flip",
    "crop_flip",
    "view_index",
    "normalize",
]

CIFAR100_MEAN = (0.5071, 0.4867, 0.4408)
CIFAR100_STD = (0.2675, 0.2565, 0.2761)
DATASETS = ("synthetic", "cifar100")
#: classes of each dataset (both CIFAR-100-shaped), known before any data is read
NUM_CLASSES = {"synthetic": 100, "cifar100": 100}

CIFAR100_FOLDER = "cifar-100-python"
DOWNLOAD_HINT = "python data_scripts/download_cifar100.py --root {root}"
_NUM_FINE, _NUM_COARSE, _PIXELS = 100, 20, 3 * 32 * 32


# --------------------------------------------------------------------------------------------------
# The dataset record
# --------------------------------------------------------------------------------------------------
@dataclass
class ImageDataset:
    """One dataset as uint8 tensors, with the class structure the analyses need.

    ``description`` is one line naming the dataset, its size and seed; every number in the book is
    labelled with it. ``class_difficulty`` and ``class_separation`` exist only for ``synthetic``: the
    designed pixel-noise level of each class and its distance from the superclass prototype.
    """

    name: str
    train_images: Tensor  # uint8 (N, 3, 32, 32)
    train_labels: Tensor  # int64 (N,)
    test_images: Tensor
    test_labels: Tensor
    class_names: List[str]
    superclass_names: List[str]
    class_to_superclass: Tensor  # int64 (C,)
    description: str
    class_difficulty: Optional[Tensor] = None  # float32 (C,), synthetic only
    class_separation: Optional[Tensor] = None  # float32 (C,), synthetic only

    def __post_init__(self) -> None:
        # a malformed dataset would otherwise surface as a shape error deep inside training
        for split in ("train", "test"):
            x, y = getattr(self, f"{split}_images"), getattr(self, f"{split}_labels")
            if x.dtype != torch.uint8 or x.dim() != 4 or x.shape[1] != 3:
                raise KDLibError(f"{self.name}: {split}_images must be uint8 (N, 3, H, W), got {x.dtype} {tuple(x.shape)}")
            if y.dtype != torch.int64 or y.shape != (x.shape[0],):
                raise KDLibError(f"{self.name}: {split}_labels must be int64 ({x.shape[0]},), got {y.dtype} {tuple(y.shape)}")
        if self.class_to_superclass.shape != (len(self.class_names),):
            raise KDLibError(f"{self.name}: class_to_superclass must have one entry per class")

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def num_superclasses(self) -> int:
        return len(self.superclass_names)

    def to(self, device) -> "ImageDataset":
        """A copy with every tensor on ``device`` (the training engine keeps the whole set on the GPU)."""
        moved = {f.name: getattr(self, f.name).to(device) for f in fields(self) if isinstance(getattr(self, f.name), Tensor)}
        return replace(self, **moved)


def default_root() -> Path:
    """Where datasets live unless told otherwise: ``$KDLIB_DATA``, else ``./data``."""
    return Path(os.environ.get("KDLIB_DATA") or "data")


def load_dataset(
    name: str,
    root=None,
    train_per_class: Optional[int] = None,
    test_per_class: Optional[int] = None,
    seed: int = 0,
    **synthetic_options,
) -> ImageDataset:
    """The one entry point to data: ``synthetic`` (generated, offline) or ``cifar100`` (from ``root``).

    For ``synthetic``, ``*_per_class`` default to 100 and 20, ``seed`` picks the dataset and
    ``synthetic_options`` go to :func:`make_synthetic`. For ``cifar100``, ``None`` means every image;
    a number keeps the first that many images of each class in file order (independent of ``seed``).
    """
    if name not in DATASETS:
        raise unknown_name("dataset", name, DATASETS)
    if name == "synthetic":
        knobs = [k for k, p in inspect.signature(make_synthetic).parameters.items() if p.kind is p.KEYWORD_ONLY]
        unknown = sorted(set(synthetic_options) - set(knobs))
        if unknown:
            raise KDLibError(f"unknown synthetic option(s) {', '.join(unknown)}; valid: {', '.join(knobs)}")
        return make_synthetic(
            train_per_class=100 if train_per_class is None else train_per_class,
            test_per_class=20 if test_per_class is None else test_per_class,
            seed=seed,
            **synthetic_options,
        )
    if synthetic_options:
        raise KDLibError(f"options {sorted(synthetic_options)} apply to the synthetic dataset only, not to {name!r}")
    return _load_cifar100_dataset(root, train_per_class, test_per_class)


# --------------------------------------------------------------------------------------------------
# CIFAR-100 reader
# --------------------------------------------------------------------------------------------------
class CIFAR100Meta(NamedTuple):
    fine_names: List[str]
    coarse_names: List[str]
    fine_to_coarse: Tensor  # int64 (100,)


# The official files hold numpy arrays, lists, bytes and ints; nothing else may be resolved while
# unpickling, so a foreign or damaged file cannot run code.
_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),  # how Python 3 writes bytes at protocol 2
}


class _SafeUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) not in _ALLOWED_GLOBALS:
            raise pickle.UnpicklingError(f"unexpected object {module}.{name}")
        if module.startswith("numpy.core.") and int(np.__version__.split(".")[0]) >= 2:
            module = "numpy._core." + module[len("numpy.core."):]  # same object, without numpy 2's warning
        return super().find_class(module, name)


def _resolve_cifar_dir(root) -> Path:
    root = Path(default_root() if root is None else root).expanduser()
    for candidate in (root / CIFAR100_FOLDER, root):
        if (candidate / "meta").is_file() or (candidate.name == CIFAR100_FOLDER and candidate.is_dir()):
            return candidate
    hint_root = root.parent if root.name == CIFAR100_FOLDER else root
    raise KDLibError(
        f"CIFAR-100 not found: no {root / CIFAR100_FOLDER} (expected train, test and meta there); "
        f"run `{DOWNLOAD_HINT.format(root=hint_root)}`"
    )


def _unpickle(path: Path) -> dict:
    if not path.is_file():
        raise KDLibError(
            f"CIFAR-100 file {path} is missing; run `{DOWNLOAD_HINT.format(root=path.parent.parent)}`"
        )
    try:
        with open(path, "rb") as f:
            obj = _SafeUnpickler(f, encoding="bytes").load()
    except MemoryError:
        raise
    except Exception as exc:
        raise KDLibError(
            f"CIFAR-100 file {path} is truncated or corrupt ({type(exc).__name__}: {exc}); delete "
            f"{path.parent} and run `{DOWNLOAD_HINT.format(root=path.parent.parent)}`"
        ) from None
    if not isinstance(obj, dict):
        raise KDLibError(f"CIFAR-100 file {path} holds a {type(obj).__name__}, not the expected dict")
    # the official files have bytes keys; files re-saved by Python 3 tools often have str keys
    return {(k.decode("latin-1") if isinstance(k, bytes) else k): v for k, v in obj.items()}


def _field(d: dict, key: str, path: Path):
    if key not in d:
        raise KDLibError(f"CIFAR-100 file {path} has no {key!r} entry (found {sorted(map(str, d))})")
    return d[key]


def _labels(d: dict, key: str, n: int, num: int, path: Path) -> np.ndarray:
    try:
        y = np.asarray(_field(d, key, path))
    except KDLibError:
        raise
    except Exception as exc:
        raise KDLibError(f"CIFAR-100 file {path}: {key} is not a list of integers ({exc})") from None
    if y.ndim != 1 or y.shape[0] != n:
        raise KDLibError(f"CIFAR-100 file {path}: {key} has shape {y.shape}, expected ({n},) to match the images")
    if n and (y.dtype.kind not in "iu" or int(y.min()) < 0 or int(y.max()) >= num):
        bad = y if y.dtype.kind not in "iu" else y[(y < 0) | (y >= num)]
        raise KDLibError(f"CIFAR-100 file {path}: {key} must be integers in 0..{num - 1}, found {bad.tolist()[0]!r}")
    return y.astype(np.int64)


def _read_split(directory: Path, train: bool) -> Tuple[Tensor, Tensor, Tensor]:
    path = directory / ("train" if train else "test")
    d = _unpickle(path)
    data = _field(d, "data", path)
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != _PIXELS:
        what = f"{data.dtype} array of shape {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise KDLibError(f"CIFAR-100 file {path}: data must be a uint8 array of shape (N, {_PIXELS}), got {what}")
    n = data.shape[0]
    if n == 0:
        raise KDLibError(f"CIFAR-100 file {path} holds no images")
    fine = _labels(d, "fine_labels", n, _NUM_FINE, path)
    coarse = _labels(d, "coarse_labels", n, _NUM_COARSE, path)
    images = torch.from_numpy(np.ascontiguousarray(data).reshape(n, 3, 32, 32))
    return images, torch.from_numpy(fine), torch.from_numpy(coarse)


def load_cifar100(root=None, train: bool = True) -> Tuple[Tensor, Tensor]:
    """The official training (or test) split: uint8 images (N, 3, 32, 32) and int64 fine labels, in file order.

    ``root`` is the folder holding ``cifar-100-python`` or that folder itself (default
    :func:`default_root`).
    """
    images, fine, _ = _read_split(_resolve_cifar_dir(root), train)
    return images, fine


def _names(d: dict, key: str, num: int, path: Path) -> List[str]:
    raw = _field(d, key, path)
    if not isinstance(raw, (list, tuple)) or len(raw) != num:
        raise KDLibError(f"CIFAR-100 file {path}: {key} must list {num} names")
    return [x.decode("utf-8") if isinstance(x, bytes) else str(x) for x in raw]


def _fine_to_coarse(fine: Tensor, coarse: Tensor, path: Path) -> Tensor:
    pairs = torch.unique(torch.stack([fine, coarse], 1), dim=0)
    counts = torch.bincount(pairs[:, 0], minlength=_NUM_FINE)
    if (counts != 1).any():
        k = int(torch.nonzero(counts != 1)[0])
        problem = "has no images" if counts[k] == 0 else "has several coarse labels"
        raise KDLibError(f"CIFAR-100 file {path}: fine class {k} {problem}, cannot map fine to coarse classes")
    mapping = torch.empty(_NUM_FINE, dtype=torch.int64)
    mapping[pairs[:, 0]] = pairs[:, 1]
    return mapping


def cifar100_meta(root=None) -> CIFAR100Meta:
    """Fine and coarse class names, and the fine-to-coarse map derived from the training labels."""
    directory = _resolve_cifar_dir(root)
    return _meta(directory, *_read_split(directory, True)[1:])


def _meta(directory: Path, fine: Tensor, coarse: Tensor) -> CIFAR100Meta:
    path = directory / "meta"
    d = _unpickle(path)
    return CIFAR100Meta(
        _names(d, "fine_label_names", _NUM_FINE, path),
        _names(d, "coarse_label_names", _NUM_COARSE, path),
        _fine_to_coarse(fine, coarse, directory / "train"),
    )


def _first_per_class(labels: Tensor, n: Optional[int], split: str) -> Optional[Tensor]:
    """Indices (in file order) of the first ``n`` images of each class; None keeps everything."""
    if n is None:
        return None
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise KDLibError(f"{split}_per_class must be a positive integer, got {n!r}")
    counts = torch.bincount(labels, minlength=_NUM_FINE)
    if int(counts.min()) < n:
        raise KDLibError(f"{split}_per_class={n} but some class has only {int(counts.min())} {split} images")
    order = torch.argsort(labels, stable=True)
    rank = torch.empty_like(labels)
    starts = torch.cumsum(counts, 0) - counts
    rank[order] = torch.arange(labels.numel()) - starts[labels[order]]
    return torch.nonzero(rank < n).flatten()


def _load_cifar100_dataset(root, train_per_class, test_per_class) -> ImageDataset:
    directory = _resolve_cifar_dir(root)
    train_x, train_y, train_coarse = _read_split(directory, True)
    test_x, test_y, _ = _read_split(directory, False)
    meta = _meta(directory, train_y, train_coarse)
    keep_train = _first_per_class(train_y, train_per_class, "train")
    keep_test = _first_per_class(test_y, test_per_class, "test")
    if keep_train is not None:
        train_x, train_y = train_x[keep_train], train_y[keep_train]
    if keep_test is not None:
        test_x, test_y = test_x[keep_test], test_y[keep_test]
    if keep_train is None and keep_test is None:
        description = f"CIFAR-100 ({len(train_y)} train / {len(test_y)} test)"
    elif keep_train is not None and keep_test is not None:
        description = f"CIFAR-100 subset ({train_per_class} train / {test_per_class} test per class, first in file order)"
    else:
        sizes = (f"{train_per_class} train per class" if keep_train is not None else f"all {len(train_y)} train",
                 f"{test_per_class} test per class" if keep_test is not None else f"all {len(test_y)} test")
        description = f"CIFAR-100 subset ({' / '.join(sizes)}, first in file order)"
    return ImageDataset(
        name="cifar100",
        train_images=train_x,
        train_labels=train_y,
        test_images=test_x,
        test_labels=test_y,
        class_names=meta.fine_names,
        superclass_names=meta.coarse_names,
        class_to_superclass=meta.fine_to_coarse,
        description=description,
    )


# --------------------------------------------------------------------------------------------------
# The synthetic dataset
# --------------------------------------------------------------------------------------------------
def _seeded(seed: int, stream: int) -> torch.Generator:
    # independent streams from one user seed, without touching the global RNG
    state = np.random.SeedSequence([int(seed) & 0xFFFFFFFFFFFFFFFF, stream]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 31 ^ int(state[1]))


def _uniform(g: torch.Generator, shape, lo: float, hi: float) -> Tensor:
    return lo + (hi - lo) * torch.rand(shape, generator=g)


def _design_classes(g, num_super, per_super, class_separation, separation_range, noise_range) -> Dict[str, Tensor]:
    """Per-class scene parameters: superclass prototypes moved by a class-specific distance."""
    S, K = num_super, per_super
    C = S * K
    proto = {
        "theta": _uniform(g, (S, 1), 0.0, math.pi),
        "log_freq": torch.log(_uniform(g, (S, 1), 1.5, 4.0)),
        "fg": _uniform(g, (S, 3), 0.1, 0.9),
        "bg": _uniform(g, (S, 3), 0.1, 0.9),
        "centre": _uniform(g, (S, 2), -0.5, 0.5),
        "log_radius": torch.log(_uniform(g, (S, 1), 0.25, 0.45)),
        "blob": _uniform(g, (S, 3), 0.1, 0.9),
    }
    # one unit of separation in each parameter (see the module docstring)
    unit = {"theta": 0.3, "log_freq": 0.2, "fg": 0.1, "bg": 0.1, "centre": 0.15, "log_radius": 0.15, "blob": 0.1}
    separation = class_separation * _uniform(g, (C,), *separation_range)
    params = {}
    for key, p in proto.items():
        direction = torch.randn((C, p.shape[1]), generator=g)
        params[key] = p.repeat_interleave(K, 0) + separation[:, None] * unit[key] * direction
    for key in ("fg", "bg", "blob"):
        params[key] = params[key].clamp(0.0, 1.0)
    params["noise"] = torch.linspace(noise_range[0], noise_range[1], C)[torch.randperm(C, generator=g)]
    params["separation"] = separation
    return params


_CHUNK = 2048  # images rendered at a time: bounded memory, and the draws do not depend on the machine


def _bicubic_matrix(size: int, coarse: int) -> Tensor:
    # bicubic upsampling is linear and separable: interpolating the unit vectors gives its matrix
    eye = torch.eye(coarse).view(coarse, 1, 1, coarse)
    rows = F.interpolate(eye, size=(1, size), mode="bicubic", align_corners=False)
    return rows.view(coarse, size).T.contiguous()  # (size, coarse)


def _render(g: torch.Generator, params: Dict[str, Tensor], per_class: int, size: int, opts: dict) -> Tuple[Tensor, Tensor]:
    """``per_class`` images of every class, in a random order: uint8 (N, 3, size, size) and labels."""
    C = params["theta"].shape[0]
    labels = torch.arange(C).repeat_interleave(per_class)
    labels = labels[torch.randperm(labels.numel(), generator=g)]
    N = labels.numel()
    p = {k: v[labels] for k, v in params.items()}

    # the per-image nuisances, all drawn before any pixel is rendered
    shift = _uniform(g, (N, 2), -1.0, 1.0) * opts["max_shift"] * (2.0 / size)
    theta = p["theta"][:, 0] + opts["orientation_jitter"] * torch.randn(N, generator=g)
    phase = _uniform(g, (N,), 0.0, 2 * math.pi)
    contrast = _uniform(g, (N,), 0.5, 1.0)
    radius = torch.exp(p["log_radius"][:, 0] + 0.1 * torch.randn(N, generator=g))
    brightness = 1.0 + opts["colour_jitter"] * torch.randn((N, 1), generator=g)
    cast = opts["colour_jitter"] * torch.randn((N, 3), generator=g)
    # the image is a convex blend of its three colours, so brightness and cast can act on the colours
    bg, fg, blob = (p[k] * brightness + cast for k in ("bg", "fg", "blob"))
    freq = torch.exp(p["log_freq"][:, 0]) * math.pi  # cycles per image width (2 units)
    level = p["noise"]

    upsample = _bicubic_matrix(size, 4)
    # a pixel of upsampled i.i.d. unit-normal 4x4 values has variance r_i * r_j (r = squared row sums
    # of the matrix); dividing by mean(r) gives the clutter unit variance on average over the image
    clutter_scale = opts["clutter"] / float(upsample.pow(2).sum(1).mean())
    axis = (torch.arange(size, dtype=torch.float32) + 0.5) * (2.0 / size) - 1.0  # pixel centres in [-1, 1]
    out = torch.empty((N, 3, size, size), dtype=torch.uint8)
    for lo in range(0, N, _CHUNK):
        s = slice(lo, min(N, lo + _CHUNK))
        n = s.stop - s.start
        # a shift of the whole scene moves the sampling grid
        yy = axis.view(1, size, 1) - shift[s, 0].view(n, 1, 1)
        xx = axis.view(1, 1, size) - shift[s, 1].view(n, 1, 1)
        along = xx * torch.cos(theta[s]).view(n, 1, 1) + yy * torch.sin(theta[s]).view(n, 1, 1)
        wave = along.mul_(freq[s].view(n, 1, 1)).add_(phase[s].view(n, 1, 1)).sin_()
        wave = wave.mul_(0.5 * contrast[s].view(n, 1, 1)).add_(0.5).unsqueeze(1)  # (n, 1, H, W) in [0, 1]
        dist = torch.hypot(yy - p["centre"][s, 0].view(n, 1, 1), xx - p["centre"][s, 1].view(n, 1, 1))
        disc = (radius[s].view(n, 1, 1) - dist).mul_(size / 2.0).sigmoid_().unsqueeze(1)  # ~1 pixel soft edge
        img = torch.lerp(bg[s].view(n, 3, 1, 1), fg[s].view(n, 3, 1, 1), wave)
        img = torch.lerp(img, blob[s].view(n, 3, 1, 1).expand_as(img), disc)

        white = torch.randn((n, 3, size, size), generator=g)
        coarse = torch.randn((n, 3, 4, 4), generator=g)
        smooth = upsample @ coarse @ upsample.T
        noise = white.add_(smooth, alpha=clutter_scale).mul_(level[s].view(n, 1, 1, 1))
        out[s] = img.add_(noise).clamp_(0.0, 1.0).mul_(255.0).round_().to(torch.uint8)
    return out, labels


def make_synthetic(
    train_per_class: int = 100,
    test_per_class: int = 20,
    seed: int = 0,
    *,
    num_superclasses: int = 20,
    classes_per_superclass: int = 5,
    class_separation: float = 1.0,
    separation_range: Sequence[float] = (0.5, 1.5),
    noise_range: Sequence[float] = (0.05, 0.45),
    clutter: float = 1.0,
    max_shift: float = 3.0,
    orientation_jitter: float = 0.15,
    colour_jitter: float = 0.05,
    image_size: int = 32,
) -> ImageDataset:
    """The offline CIFAR-100-shaped dataset (recipe in the module docstring).

    Difficulty knobs (defaults in brackets): ``class_separation`` [1.0] scales how far sibling classes
    sit from their superclass prototype (smaller: more within-superclass confusion);
    ``separation_range`` [(0.5, 1.5)] spreads that distance per class; ``noise_range``
    [(0.05, 0.45)] is the span of per-class pixel-noise levels (the designed class difficulty, on the
    [0, 1] pixel scale); ``clutter`` [1.0] weights the smooth part of the noise against the white part;
    ``max_shift`` [3] pixels of random translation; ``orientation_jitter`` [0.15 rad] and
    ``colour_jitter`` [0.05] per-image nuisances.
    """
    given = dict(locals())
    for name, n in (("train_per_class", train_per_class), ("test_per_class", test_per_class)):
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
            raise KDLibError(f"{name} must be a positive integer, got {n!r}")
    if num_superclasses < 1 or classes_per_superclass < 1:
        raise KDLibError("num_superclasses and classes_per_superclass must be at least 1")
    if not (0 <= noise_range[0] <= noise_range[1]) or not (0 <= separation_range[0] <= separation_range[1]):
        raise KDLibError("noise_range and separation_range must be (low, high) with 0 <= low <= high")
    opts = dict(max_shift=float(max_shift), orientation_jitter=float(orientation_jitter),
                colour_jitter=float(colour_jitter), clutter=float(clutter))
    params = _design_classes(_seeded(seed, 0), num_superclasses, classes_per_superclass, float(class_separation),
                             tuple(map(float, separation_range)), tuple(map(float, noise_range)))
    train_x, train_y = _render(_seeded(seed, 1), params, int(train_per_class), image_size, opts)
    test_x, test_y = _render(_seeded(seed, 2), params, int(test_per_class), image_size, opts)

    superclass_names = [f"sc{s:02d}" for s in range(num_superclasses)]
    class_names = [f"sc{s:02d}_c{k}" for s in range(num_superclasses) for k in range(classes_per_superclass)]
    # the description names every knob that differs from its default, so a figure can't mislabel its data
    changed = []
    for name, parameter in inspect.signature(make_synthetic).parameters.items():
        if parameter.kind is inspect.Parameter.KEYWORD_ONLY:
            value = tuple(given[name]) if isinstance(given[name], (list, tuple)) else given[name]
            if value != parameter.default:
                changed.append(f"{name}={value}")
    description = f"synthetic (seed {seed}, {train_per_class} train / {test_per_class} test per class"
    description += (", " + ", ".join(changed) if changed else "") + ")"
    return ImageDataset(
        name="synthetic",
        train_images=train_x,
        train_labels=train_y,
        test_images=test_x,
        test_labels=test_y,
        class_names=class_names,
        superclass_names=superclass_names,
        class_to_superclass=torch.arange(num_superclasses).repeat_interleave(classes_per_superclass),
        description=description,
        class_difficulty=params["noise"].clone(),
        class_separation=params["separation"].clone(),
    )


# --------------------------------------------------------------------------------------------------
# Augmentation
# --------------------------------------------------------------------------------------------------
def _check_images(images: Tensor, what: str = "images") -> None:
    if images.dim() != 4:
        raise KDLibError(f"{what} must be a batch (B, C, H, W), got shape {tuple(images.shape)}")


def random_crop_flip(images_u8: Tensor, generator: torch.Generator, padding: int = 4):
    """Random crop with zero padding and horizontal flip, independently per image.

    Draws, from ``generator`` (which must live on the images' device), first the offsets
    ``(top, left)`` uniform in ``0..2*padding`` per image and axis, then the flips with p = 0.5 per
    image. Returns ``(views_u8, offsets int64 (B, 2), flips bool (B,))``; the parameters let a caller
    look up cached teacher logits for exactly these views (:func:`view_index`).
    """
    _check_images(images_u8)
    if generator.device.type != images_u8.device.type:
        raise KDLibError(f"the generator is on {generator.device} but the images are on {images_u8.device}")
    B, device = images_u8.shape[0], images_u8.device
    offsets = torch.randint(0, 2 * padding + 1, (B, 2), generator=generator, device=device)
    flips = torch.rand(B, generator=generator, device=device) < 0.5
    return _crop_flip(images_u8, offsets, flips, padding), offsets, flips  # in range by construction


def crop_flip(images_u8: Tensor, offsets: Tensor, flips: Tensor, padding: int = 4) -> Tensor:
    """The deterministic view: zero-pad by ``padding``, crop at ``offsets`` (top, left), then flip where ``flips``.

    Equals torchvision's ``RandomCrop(size, padding)`` + ``RandomHorizontalFlip()`` on the PIL image
    for the same parameters: output pixel (i, j) of image b is padded[b, top + i, left + j], or
    padded[b, top + i, left + W - 1 - j] when flipped. No Python loop over the batch: one pad, one
    gather of the chosen windows, one select of the flipped ones.
    """
    _check_images(images_u8)
    B, _, H, W = images_u8.shape
    device = images_u8.device
    if offsets.shape != (B, 2) or flips.shape != (B,):
        raise KDLibError(f"offsets must be (B, 2) and flips (B,), got {tuple(offsets.shape)} and {tuple(flips.shape)}")
    offsets = offsets.to(device=device, dtype=torch.int64)
    if device.type == "cpu" and B and (int(offsets.min()) < 0 or int(offsets.max()) > 2 * padding):
        raise KDLibError(f"crop offsets must lie in 0..{2 * padding}")
    return _crop_flip(images_u8, offsets, flips, padding)


def _crop_flip(images_u8: Tensor, offsets: Tensor, flips: Tensor, padding: int) -> Tensor:
    """:func:`crop_flip` without the checks, which read the offsets on the host: the training step's
    path, where the offsets are drawn in range (and the step may be captured as a CUDA graph)."""
    B, _, H, W = images_u8.shape
    device = images_u8.device
    padded = F.pad(images_u8, (padding, padding, padding, padding))
    # every possible crop as a view (B, C, 2p+1, 2p+1, H, W); one gather copies the chosen ones
    windows = padded.unfold(2, H, 1).unfold(3, W, 1)
    out = windows[torch.arange(B, device=device), :, offsets[:, 0], offsets[:, 1]]
    return torch.where(flips.to(device).view(B, 1, 1, 1), out.flip(3), out)


def view_index(offsets: Tensor, flips: Tensor, padding: int = 4) -> Tensor:
    """Number each (top, left, flip) view in ``0 .. (2*padding+1)**2 * 2 - 1`` (162 views for padding 4)."""
    side = 2 * padding + 1
    return (offsets[:, 0] * side + offsets[:, 1]) * 2 + flips.to(torch.int64)


def normalize(images_u8: Tensor, channels_last: bool = False) -> Tensor:
    """float32 ``(x / 255 - mean) / std`` with the CIFAR-100 statistics, in torchvision's order of operations.

    ``channels_last`` returns a batch in that memory format (faster convolutions on CPUs and tensor
    cores); the uint8 batch is converted first, so the layout change moves bytes, not floats.
    """
    if images_u8.dtype != torch.uint8:
        raise KDLibError(f"normalize expects uint8 pixels, got {images_u8.dtype} (normalising twice?)")
    shape = (1, 3, 1, 1) if images_u8.dim() == 4 else (3, 1, 1)
    mean = torch.tensor(CIFAR100_MEAN, device=images_u8.device).view(shape)
    std = torch.tensor(CIFAR100_STD, device=images_u8.device).view(shape)
    if images_u8.dim() == 4:
        images_u8 = images_u8.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    return images_u8.float().div_(255).sub_(mean).div_(std)
