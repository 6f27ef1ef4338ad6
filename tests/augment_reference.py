# FROZEN reference for tests/test_augment.py and benchmarks/augment_speed.py: kdlib/augment.py as it was
# when MLKD's strong view was first batched and made capture-safe (commit f66b5a8), verbatim. The library's
# faster version must give the same views pixel for pixel for the same generator state. Do not edit.
"""MLKD's strong augmentation on uint8 tensors: random crop + flip, RandAugment(2, 10) and Cutout.

The facts follow the MLKD authors' data pipeline (the FixMatch-style ``RandAugment`` of their
``mdistiller/dataset/cifar100.py``, identical in the LS repository): after ``RandomCrop(32, padding=4)``
and ``RandomHorizontalFlip``, two operations are drawn with replacement from 14, each with a magnitude
drawn uniformly from its range (the ``m = 10`` argument is unused by that code), then a Cutout square of
side ``U(0, 0.5) * W`` filled with (125, 123, 114). Operations follow PIL's definitions (nearest-neighbour
affine maps with black fill, ``ImageEnhance`` factors, solarize at ``x >= threshold``); the enhancement
operations compute what ``torchvision``'s tensor kernels compute, pixel for pixel (pixel equality with
PIL is not claimed for them).

The whole batch goes through every operation at once, each image with its own choice and magnitude held
in tensors: each round computes the 14 candidates for every image (the five geometric ones as one
gather, one affine matrix per image) and keeps each image's own with ``torch.where``; Cutout is a mask.
No Python branch on a value, no host read, no shape that depends on data: the view can be cut inside a
captured CUDA graph, and it costs the same for every batch.

Every random number comes from the ``torch.Generator`` given, so a run's views are reproducible.
Input and output: uint8 (B, 3, H, W) on any device.
"""
from __future__ import annotations

from typing import Dict, List, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from kdlib.data import random_crop_flip
from kdlib.errors import KDLibError

CUTOUT_FILL = (125, 123, 114)
#: the 14 operations and magnitude ranges of the authors' ``augment_list`` (name, low, high)
OPS: List[Tuple[str, float, float]] = [
    ("AutoContrast", 0.0, 1.0), ("Brightness", 0.05, 0.95), ("Color", 0.05, 0.95),
    ("Contrast", 0.05, 0.95), ("Equalize", 0.0, 1.0), ("Identity", 0.0, 1.0), ("Posterize", 4.0, 8.0),
    ("Rotate", -30.0, 30.0), ("Sharpness", 0.05, 0.95), ("ShearX", -0.3, 0.3), ("ShearY", -0.3, 0.3),
    ("Solarize", 0.0, 256.0), ("TranslateX", -0.3, 0.3), ("TranslateY", -0.3, 0.3),
]
GEOMETRIC = ("Rotate", "ShearX", "ShearY", "TranslateX", "TranslateY")


# -- geometric operations: one nearest-neighbour affine gather ------------------------------------------
def _affine_nearest(images: Tensor, coef: Tensor, constants: Dict[str, Tensor]) -> Tensor:
    """PIL's ``Image.transform(AFFINE, (a, b, c, d, e, f))`` with nearest sampling, one matrix per image
    (``coef`` (B, 6)): output pixel (x, y) takes input pixel floor(a x' + b y' + c, d x' + e y' + f) at the
    pixel centre x' = x + 0.5; black outside the image. As ``grid_sample``'s nearest sampling in
    normalised coordinates (it reads pixel round(s - 1/2) = floor(s) at s = the source coordinate)."""
    b, ch, h, w = images.shape
    scaled = coef.to(device=images.device, dtype=torch.float64).view(b, 2, 3) * constants["normalise"]
    theta = torch.cat([scaled[..., :2], scaled.sum(-1, keepdim=True) - 1], dim=-1).float()
    grid = F.affine_grid(theta, [b, ch, h, w], align_corners=False)
    return F.grid_sample(images, grid, mode="nearest", padding_mode="zeros", align_corners=False)


def _affine_coef(name: str, v: Tensor, h: int, w: int) -> Tensor:
    """Per-image PIL affine coefficients (B, 6) of the geometric operations for magnitudes ``v`` (B,)."""
    one, zero = torch.ones_like(v), torch.zeros_like(v)
    if name == "ShearX":
        return torch.stack([one, v, zero, zero, one, zero], 1)
    if name == "ShearY":
        return torch.stack([one, zero, zero, v, one, zero], 1)
    if name == "TranslateX":
        return torch.stack([one, zero, v * w, zero, one, zero], 1)
    if name == "TranslateY":
        return torch.stack([one, zero, zero, zero, one, v * h], 1)
    # Rotate, as PIL's img.rotate(v): input = M (output - centre) + centre, M = [[cos, sin], [-sin, cos]]
    # with the angle -v degrees (counter-clockwise rotation, nearest, black fill)
    a = -torch.deg2rad(v)
    ca, sa = torch.cos(a), torch.sin(a)
    cx, cy = w / 2.0, h / 2.0
    return torch.stack([ca, sa, cx - ca * cx - sa * cy, -sa, ca, cy + sa * cx - ca * cy], 1)


# -- the per-device constants (made by fills on the device, never copied from host data) ----------------
#: the pointwise operations: each maps a channel's values through a table of 256 entries (given the image);
#: Brightness is Contrast's blend with 0 instead of the mean gray level, so they share a table
POINTWISE = ("Identity", ("Brightness", "Contrast"), "AutoContrast", "Equalize", "Posterize", "Solarize")
_CONSTANTS: Dict[Tuple[str, int, int], Dict[str, Tensor]] = {}


def _constants(device: torch.device, h: int, w: int) -> Dict[str, Tensor]:
    """Per-operation tables indexed by the drawn operation (lookup table, magnitude range,
    affine direction) and the pixel grid, made once per device and image size with device-side fills, so
    that a step that builds them holds no copy of host data (and a captured CUDA graph keeps using them)."""
    key = (str(device), h, w)
    if key not in _CONSTANTS:
        n = len(OPS)
        table = {"table": torch.zeros(n, dtype=torch.int64, device=device),
                 "low": torch.zeros(n, dtype=torch.float64, device=device),
                 "span": torch.zeros(n, dtype=torch.float64, device=device),
                 "direction": torch.zeros(n, 6, dtype=torch.float64, device=device)}
        axis = {"ShearX": (1, 1.0), "ShearY": (3, 1.0), "TranslateX": (2, float(w)), "TranslateY": (5, float(h))}
        for op, (name, low, high) in enumerate(OPS):
            table["table"][op] = next((t for t, names in enumerate(POINTWISE) if name in names), 0)
            table["low"][op], table["span"][op] = low, high - low
            if name in axis:
                table["direction"][op, axis[name][0]] = axis[name][1]
        table["values"] = torch.arange(256, device=device).view(1, 1, 256)
        # pixel coordinates to grid_sample's normalised ones: row r of the matrix times (W, H, 2) / size_r
        table["normalise"] = torch.ones(1, 2, 3, dtype=torch.float64, device=device)
        table["normalise"][0, 0, 1], table["normalise"][0, 0, 2] = h / w, 2.0 / w
        table["normalise"][0, 1, 0], table["normalise"][0, 1, 2] = w / h, 2.0 / h
        _CONSTANTS[key] = table
    return _CONSTANTS[key]


def _op_index(name: str) -> int:
    return next(i for i, (n, _, _) in enumerate(OPS) if n == name)


# -- the operations, batched, one operation and magnitude per image ----------------------------------------
def _per_image(v: Tensor) -> Tensor:
    return v.view(-1, 1, 1, 1)


def _fused_add(a: Tensor, b: Tensor, alpha: Tensor) -> Tensor:
    """float32 ``a + alpha * b`` with a per-image ``alpha``, rounded once as torch's ``a.add_(b, alpha=...)``
    rounds it (the fused multiply-add of its vectorised kernel): ``addcmul``'s kernel fuses the same way,
    which tests check pixel for pixel against torchvision."""
    return torch.addcmul(a, b, alpha)


def _to_pixels(values: Tensor) -> Tensor:
    """float32 results to pixel values, as a conversion to uint8 truncates them (kept in float32)."""
    return values.clamp_(0, 255).floor_()


def _gray(images: Tensor) -> Tensor:
    """torchvision's grayscale of uint8 pixel values (as float32), float32 (B, 1, H, W), floored."""
    r, g, b = images.unbind(dim=-3)
    return r.mul(0.2989).add_(g, alpha=0.587).add_(b, alpha=0.114).unsqueeze(-3).floor_()


def _lookup_tables(images: Tensor, gray: Tensor, index: Tensor, choice: Tensor, v: Tensor,
                   constants: Dict[str, Tensor]) -> Tensor:
    """Per image and channel (B, C, 256): the table of the pointwise operation the image drew (the identity
    for the others) with magnitude ``v``. Each entry is the operation's own arithmetic (torchvision's
    kernels, PIL's posterize and solarize) applied to the value, after the image's statistics (mean gray
    level, channel range, histogram): a lookup equals the operation."""
    b, c = images.shape[0], images.shape[1]
    values = constants["values"]
    level, factor, rest = values.float(), v.float().view(-1, 1, 1), (1.0 - v).float().view(-1, 1, 1)
    low, high = images.amin(dim=(-2, -1)).unsqueeze(-1), images.amax(dim=(-2, -1)).unsqueeze(-1)
    flat = high == low  # autocontrast leaves a channel of one value alone
    scale = torch.where(flat, torch.ones_like(high), (high - low).mul_(1.0 / 255))
    histogram = torch.zeros((b, c, 256), dtype=torch.int32, device=images.device)
    histogram.scatter_add_(2, index, torch.ones_like(histogram[..., :1]).expand_as(index))
    mean = gray.mean(dim=(-3, -2, -1)).view(-1, 1, 1) * (choice == _op_index("Contrast")).view(-1, 1, 1)
    bits = v.long().clamp(min=1).view(-1, 1, 1)  # posterize keeps the top max(1, int(v)) bits
    tables = [
        level,
        _to_pixels(_fused_add(level * factor, mean, rest)),  # Brightness (mean 0), Contrast
        _to_pixels((level - torch.where(flat, torch.zeros_like(low), low)).div_(scale)),  # AutoContrast
        _equalize_tables(histogram, high.long(), index.shape[-1], values).float(),
        (values & torch.bitwise_left_shift(torch.full_like(bits, 255), 8 - bits)).float(),  # Posterize
        torch.where(level >= factor, 255 - level, level),  # Solarize: PIL inverts pixels >= threshold
    ]
    which = constants["table"].index_select(0, choice)
    return torch.stack([t.expand(b, c, 256) for t in tables])[which, torch.arange(b, device=images.device)]


def _equalize_tables(histogram: Tensor, high: Tensor, pixels: int, values: Tensor) -> Tensor:
    """torchvision's (PIL's) histogram-equalisation table per image and channel: entry ``k`` is
    ``(#pixels below k + step // 2) // step`` with ``step = #pixels below the channel's maximum // 255``;
    the identity where ``step`` is 0 (a channel of one value)."""
    step = torch.div(pixels - histogram.gather(-1, high), 255, rounding_mode="floor")
    below = histogram.cumsum(dim=-1) - histogram
    table = torch.div(below + step // 2, step.clamp(min=1), rounding_mode="floor").clamp_(0, 255)
    return torch.where(step != 0, table, values)


def _blend(images: Tensor, gray: Tensor, choice: Tensor, v: Tensor) -> Tensor:
    """Color and Sharpness in one blend ``a + other * (1 - f)`` (torchvision's arithmetic): Color with
    ``a = x f`` and ``other`` the grayscale, Sharpness with ``a = x`` and ``other`` the interior's 3x3
    smoothing (1s around a 5, / 13, rounded) minus ``x``, 0 on the border (which it keeps)."""
    x, rest = images, _per_image((1.0 - v).float())
    sharp = _per_image(choice == _op_index("Sharpness"))
    inner = x[..., 1:-1, 1:-1]
    # 13 x the smoothing: sums of whole numbers, exact in float32 (shifted sums: faster than a depthwise
    # convolution on CPUs); a sum of integers / 13 is never within 0.03 of a half, so no float rounding can
    # move the rounded value
    rows = x[..., :-2, :] + x[..., 1:-1, :] + x[..., 2:, :]
    smoothed = torch.round((rows[..., :-2] + rows[..., 1:-1] + rows[..., 2:] + 4 * inner) / 13)
    other = torch.where(sharp, F.pad(smoothed - inner, (1, 1, 1, 1)), gray)
    a = x * torch.where(sharp, torch.ones_like(rest), _per_image(v.float()))
    return _to_pixels(_fused_add(a, other, rest))


def _affine(images: Tensor, choice: Tensor, v: Tensor, constants: Dict[str, Tensor]) -> Tensor:
    """The geometric operations as one nearest-neighbour gather, each image with its own matrix (the
    identity for images that drew another operation)."""
    h, w = images.shape[2], images.shape[3]
    identity = torch.zeros_like(v).unsqueeze(1) + torch.eye(2, 3, dtype=v.dtype, device=v.device).view(1, 6)
    linear = identity + v.unsqueeze(1) * constants["direction"].index_select(0, choice)
    coef = torch.where((choice == _op_index("Rotate")).unsqueeze(1), _affine_coef("Rotate", v, h, w), linear)
    return _affine_nearest(images, coef, constants)


def _apply_drawn(images: Tensor, choice: Tensor, v: Tensor) -> Tensor:
    """Each image (float32 holding uint8 values) through the operation it drew (``choice`` (B,) into
    :data:`OPS`) with magnitude ``v`` (B,), the whole batch at once: one affine resampling (the identity
    matrix for images that drew no geometric operation), one table lookup (the identity table for those
    that drew no pointwise operation), and the blend of Color and Sharpness kept where they were drawn."""
    b, c, h, w = images.shape
    constants = _constants(images.device, h, w)
    moved = _affine(images, choice, v, constants)  # equal to ``images`` where no geometric operation was drawn
    gray = _gray(moved)
    index = moved.reshape(b, c, h * w).long()
    looked_up = _lookup_tables(moved, gray, index, choice, v, constants).gather(2, index).view(b, c, h, w)
    blend = (choice == _op_index("Color")) | (choice == _op_index("Sharpness"))
    return torch.where(_per_image(blend), _blend(moved, gray, choice, v), looked_up)


def apply_op(name: str, images_u8: Tensor, magnitudes: Tensor) -> Tensor:
    """One RandAugment operation on a batch, one magnitude per image (public for tests and the book)."""
    if name not in [n for n, _, _ in OPS]:
        raise KDLibError(f"unknown RandAugment operation {name!r}; valid: {', '.join(n for n, _, _ in OPS)}")
    v = magnitudes.reshape(-1).to(device=images_u8.device, dtype=torch.float64)
    choice = torch.full_like(v, _op_index(name), dtype=torch.int64)
    return _apply_drawn(images_u8.float(), choice, v).to(torch.uint8)


def _one_round(images: Tensor, choice: Tensor, u: Tensor) -> Tensor:
    """RandAugment's round: the drawn operation with magnitude ``low + (high - low) * u`` per image."""
    constants = _constants(images.device, images.shape[2], images.shape[3])
    v = constants["low"].index_select(0, choice) + constants["span"].index_select(0, choice) * u
    return _apply_drawn(images, choice, v)


def cutout(images: Tensor, side: Tensor, u_x: Tensor, u_y: Tensor) -> Tensor:
    """The authors' ``CutoutAbs`` per image: centre drawn as ``np.random.uniform(W)``, i.e. uniform in
    (1, W] (a quirk of calling it with one argument), corner ``int(max(0, centre - side / 2))``, far corner
    ``min(W, corner + side)``; the PIL rectangle includes both ends; fill (125, 123, 114)."""
    b, c, h, w = images.shape
    dev = images.device
    side, u_x, u_y = (t.to(device=dev, dtype=torch.float64).reshape(-1) for t in (side, u_x, u_y))
    x0 = ((w + (1.0 - w) * u_x) - side / 2.0).clamp(min=0).floor()
    y0 = ((h + (1.0 - h) * u_y) - side / 2.0).clamp(min=0).floor()
    x1, y1 = (x0 + side).clamp(max=w), (y0 + side).clamp(max=h)
    xs = torch.arange(w, device=dev, dtype=torch.float64).view(1, 1, w)
    ys = torch.arange(h, device=dev, dtype=torch.float64).view(1, h, 1)
    box = ((xs >= x0.view(-1, 1, 1)) & (xs <= x1.view(-1, 1, 1)) & (ys >= y0.view(-1, 1, 1))
           & (ys <= y1.view(-1, 1, 1)) & (side.view(-1, 1, 1) > 0)).unsqueeze(1)
    fill = torch.empty((1, c, 1, 1), dtype=images.dtype, device=dev)
    for channel, value in enumerate(CUTOUT_FILL):
        fill[:, channel] = value  # a fill on the device, not a copy of host data
    return torch.where(box, fill, images)


def rand_augment(images_u8: Tensor, generator: torch.Generator, n: int = 2) -> Tensor:
    """RandAugment(n) + Cutout per image, as the authors' ``RandAugment.__call__``: ``n`` operations
    drawn with replacement, magnitudes uniform in each operation's range, then Cutout."""
    b = images_u8.shape[0]
    dev = generator.device
    choice = torch.randint(0, len(OPS), (b, n), generator=generator, device=dev).to(images_u8.device)
    mags = torch.rand(b, n, generator=generator, device=dev, dtype=torch.float64).to(images_u8.device)
    cut = torch.rand(b, 3, generator=generator, device=dev, dtype=torch.float64).to(images_u8.device)
    out = images_u8.float()  # pixel values stay whole numbers: one conversion in, one out
    for k in range(n):
        out = _one_round(out, choice[:, k], mags[:, k])
    return cutout(out.to(torch.uint8), cut[:, 0] * 0.5 * images_u8.shape[3], cut[:, 1], cut[:, 2])


def strong_augment(images_u8: Tensor, generator: torch.Generator) -> Tensor:
    """MLKD's strong view of un-augmented uint8 images: crop + flip, RandAugment(2, 10), Cutout."""
    if images_u8.dtype != torch.uint8 or images_u8.dim() != 4 or images_u8.shape[1] != 3:
        raise KDLibError(f"strong_augment expects uint8 images (B, 3, H, W), got {images_u8.dtype} "
                         f"{tuple(images_u8.shape)}")
    views, _, _ = random_crop_flip(images_u8, generator)
    return rand_augment(views, generator)


__all__ = ["OPS", "CUTOUT_FILL", "apply_op", "cutout", "rand_augment", "strong_augment"]
