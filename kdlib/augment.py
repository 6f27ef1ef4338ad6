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
in tensors: each round computes the candidates for every image (the five geometric operations as one
nearest resampling, one affine map per image; the seven pointwise ones as one table lookup; Color and
Sharpness as one blend) and keeps each image's own with 0/1 weights; Cutout is a mask. Pixel values stay
whole numbers held in float32, so every selection is exact. No Python branch on a value, no host read, no
shape that depends on data: the view can be cut inside a captured CUDA graph, and it costs the same for
every batch.

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


# -- geometric operations: one nearest-neighbour resampling ---------------------------------------------
def _rotate_coef(v: Tensor, h: int, w: int) -> Tensor:
    """PIL's ``img.rotate(v)`` as affine coefficients (..., 6): input = M (output - centre) + centre,
    M = [[cos, sin], [-sin, cos]] with the angle -v degrees (counter-clockwise rotation)."""
    a = -torch.deg2rad(v)
    ca, sa = torch.cos(a), torch.sin(a)
    cx, cy = w / 2.0, h / 2.0
    return torch.stack([ca, sa, cx - ca * cx - sa * cy, -sa, ca, cy + sa * cx - ca * cy], -1)


def _grids(choice: Tensor, v: Tensor, constants: Dict[str, Tensor], h: int, w: int) -> Tensor:
    """Every round's sampling grid per image at once, float32 (B, n, H, W, 2), for ``grid_sample``.

    PIL's ``Image.transform(AFFINE, (a, b, c, d, e, f))`` with nearest sampling takes, for output pixel
    (x, y), input pixel floor(a x' + b y' + c, d x' + e y' + f) at the pixel centre x' = x + 0.5 (black
    outside): ``grid_sample``'s nearest sampling in normalised coordinates reads pixel round(s - 1/2) =
    floor(s) at the source coordinate s. The coefficients of the drawn geometric operation (float64; the
    identity for images that drew another one) are scaled row by row by (W, H, 2) / size, their offset moved
    to the centre, rounded to float32, and applied to the pixel centres as ``affine_grid`` applies them:
    (x a' + y b') + c', each product and sum rounded to float32 (no fused multiply-add, so the grid is the
    same on every machine)."""
    linear = constants["identity"] + v.unsqueeze(-1) * constants["direction"][choice]
    coef = torch.where((choice == _op_index("Rotate")).unsqueeze(-1), _rotate_coef(v, h, w), linear)
    scaled = coef.view(*choice.shape, 2, 3) * constants["normalise"]
    theta = torch.cat([scaled[..., :2], scaled.sum(-1, keepdim=True) - 1], dim=-1).float()
    # one coordinate after the other in memory, (2, B, n, H, W), seen as (B, n, H, W, 2): grid_sample reads
    # any strides, and interleaving the two coordinates costs more than everything else here
    x_term, y_term, offset = theta.view(*choice.shape, 2, 3).movedim(-2, 0)[..., None, None].unbind(-3)
    grid = (constants["grid_x"] * x_term + constants["grid_y"] * y_term).add_(offset)
    return grid.movedim(0, -1)


def _affine_nearest(images: Tensor, grid: Tensor) -> Tensor:
    """The geometric operations, one grid per image (:func:`_grids`); black outside the image."""
    return F.grid_sample(images, grid, mode="nearest", padding_mode="zeros", align_corners=False)


# -- the per-device constants (made by fills on the device, never copied from host data) ----------------
#: the pointwise operations: each maps a channel's values through a table of 256 entries (given the image);
#: Brightness is Contrast's blend with 0 instead of the mean gray level, so they share a table
POINTWISE = ("Identity", ("Brightness", "Contrast"), "AutoContrast", "Equalize", "Posterize", "Solarize")
#: those whose table is the same for the three channels
ONE_TABLE_PER_IMAGE = ("Identity", ("Brightness", "Contrast"), "Posterize", "Solarize")
_CONSTANTS: Dict[Tuple[str, int, int], Dict[str, Tensor]] = {}


def _constants(device: torch.device, h: int, w: int) -> Dict[str, Tensor]:
    """Per-operation tables indexed by the drawn operation (lookup table, magnitude range, affine
    direction, which candidates it takes) and the pixel grid, made once per device and image size with
    device-side fills, so that a step that builds them holds no copy of host data (and a captured CUDA
    graph keeps using them)."""
    key = (str(device), h, w)
    if key not in _CONSTANTS:
        n = len(OPS)
        zeros = lambda *shape, dtype=torch.float32: torch.zeros(shape, dtype=dtype, device=device)  # noqa: E731
        table = {"image_table": zeros(n, dtype=torch.int64), "autocontrast": zeros(n), "equalize": zeros(n),
                 "blend": zeros(n), "sharpness": zeros(n), "contrast": zeros(n),
                 "low": zeros(n, dtype=torch.float64), "span": zeros(n, dtype=torch.float64),
                 "direction": zeros(n, 6, dtype=torch.float64), "identity": zeros(6, dtype=torch.float64),
                 "fill": zeros(1, len(CUTOUT_FILL), 1, 1)}
        axis = {"ShearX": (1, 1.0), "ShearY": (3, 1.0), "TranslateX": (2, float(w)), "TranslateY": (5, float(h))}
        for op, (name, low, high) in enumerate(OPS):
            table["image_table"][op] = next((t for t, names in enumerate(ONE_TABLE_PER_IMAGE) if name in names), 0)
            table["low"][op], table["span"][op] = low, high - low
            for flag, names in (("autocontrast", ("AutoContrast",)), ("equalize", ("Equalize",)),
                                ("blend", ("Color", "Sharpness")), ("sharpness", ("Sharpness",)),
                                ("contrast", ("Contrast",))):
                table[flag][op] = float(name in names)
            if name in axis:
                table["direction"][op, axis[name][0]] = axis[name][1]
        table["identity"][0] = table["identity"][4] = 1.0
        for channel, value in enumerate(CUTOUT_FILL):
            table["fill"][:, channel] = value
        table["values"] = torch.arange(256, device=device).view(1, 1, 256)
        table["levels"] = table["values"].float()
        table["interior"] = torch.zeros(1, 1, h, w, device=device)
        table["interior"][..., 1:-1, 1:-1] = 1.0
        table["columns"] = torch.arange(w, device=device, dtype=torch.float64).view(1, 1, w)
        table["rows"] = torch.arange(h, device=device, dtype=torch.float64).view(1, h, 1)
        # pixel coordinates to grid_sample's normalised ones: row r of the matrix times (W, H, 2) / size_r
        table["normalise"] = torch.ones(2, 3, dtype=torch.float64, device=device)
        table["normalise"][0, 1], table["normalise"][0, 2] = h / w, 2.0 / w
        table["normalise"][1, 0], table["normalise"][1, 2] = w / h, 2.0 / h
        # the normalised pixel centres, as affine_grid makes them (its grid for the identity matrix)
        centres = F.affine_grid(torch.eye(2, 3, device=device).unsqueeze(0), [1, 1, h, w], align_corners=False)
        table["grid_x"] = centres[0, 0, :, 0].contiguous().view(1, w)  # (H, W) after broadcasting
        table["grid_y"] = centres[0, :, 0, 1].contiguous().view(h, 1)
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


def _pick(first: Tensor, second: Tensor, take_second: Tensor) -> Tensor:
    """``second`` where ``take_second`` is 1, ``first`` where it is 0 (float32 weights, broadcast per image or
    pixel). Exact for whole numbers below 2**24 (both of lerp's formulas multiply the difference by 0 or 1),
    which every candidate here is; several times faster than ``torch.where`` with a broadcast mask on CPUs."""
    return torch.lerp(first, second, take_second)


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
    values, level = constants["values"], constants["levels"]
    factor, rest = v.float().view(-1, 1, 1), (1.0 - v).float().view(-1, 1, 1)
    low, high = images.amin(dim=(-2, -1)).unsqueeze(-1), images.amax(dim=(-2, -1)).unsqueeze(-1)
    flat = high == low  # autocontrast leaves a channel of one value alone
    histogram = torch.zeros((b, c, 256), dtype=torch.int32, device=images.device)
    # (contiguous ones: twice as fast as an expanded one on CPUs)
    histogram.scatter_add_(2, index, torch.ones(index.shape, dtype=torch.int32, device=index.device))
    mean = gray.mean(dim=(-3, -2, -1)).view(-1, 1, 1) * constants["contrast"][choice].view(-1, 1, 1)
    bits = v.long().clamp(min=1).view(-1, 1, 1)  # posterize keeps the top max(1, int(v)) bits
    # the tables that are the same for the three channels first, then the two of one table per channel
    per_image = torch.stack([
        level.expand(b, 1, 256),
        _to_pixels(_fused_add(level * factor, mean, rest)),  # Brightness (mean 0), Contrast
        (values & torch.bitwise_left_shift(torch.full_like(bits, 255), 8 - bits)).float(),  # Posterize
        torch.where(level >= factor, 255 - level, level),  # Solarize: PIL inverts pixels >= threshold
    ])[constants["image_table"][choice], torch.arange(b, device=images.device)]
    autocontrast = _to_pixels((level - low * ~flat).div_(torch.where(flat, 1.0, (high - low).mul_(1.0 / 255))))
    equalize = _equalize_tables(histogram, high.long(), index.shape[-1], level)
    return _pick(_pick(per_image, autocontrast, constants["autocontrast"][choice].view(-1, 1, 1)),
                 equalize, constants["equalize"][choice].view(-1, 1, 1))


def _equalize_tables(histogram: Tensor, high: Tensor, pixels: int, level: Tensor) -> Tensor:
    """torchvision's (PIL's) histogram-equalisation table per image and channel, float32: entry ``k`` is
    ``(#pixels below k + step // 2) // step`` with ``step = #pixels below the channel's maximum // 255``;
    the identity where ``step`` is 0 (a channel of one value). The floored quotient is taken in float32:
    both operands are whole numbers below 2**24 and a quotient that is not whole is at least 1 / step from
    the next whole number, far more than float32's rounding, so it floors to the integer division's result."""
    step = torch.div(pixels - histogram.gather(-1, high), 255, rounding_mode="floor")
    below = (histogram.cumsum(dim=-1, dtype=torch.int32) - histogram).add_(step // 2).float()
    table = below.div_(step.clamp(min=1).float()).floor_().clamp_(0, 255)
    return _pick(level, table, (step != 0).float())


def _sharpness_detail(images: Tensor, constants: Dict[str, Tensor]) -> Tensor:
    """torchvision's sharpness "degenerate" image minus the image: the 3x3 smoothing (1s around a 5, / 13,
    rounded) minus the pixel in the interior, 0 on the border.

    The sums run over the whole batch as one flat array, shifted by a row (W) and a pixel (1), so every
    operation reads contiguous memory: entry i holds the window whose top-left pixel is i, whose centre is
    i + W + 1; windows that wrap across a row or an image are those of border pixels, set to 0 by the mask.
    The values are whole numbers, exact in float32 in any order; a sum of integers / 13 is never within
    0.03 of a half, so no float rounding (of a product with 1 / 13) can move the rounded value."""
    b, c, h, w = images.shape
    x = images.reshape(-1)
    n, centre = x.shape[0], w + 1
    columns = x[:-2 * w] + x[w:-w] + x[2 * w:]  # the 3 pixels of a column, from the top one
    window = columns[:-2] + columns[1:-1] + columns[2:]  # 3 columns side by side
    detail = window.add_(x[centre:centre + window.shape[0]], alpha=4).mul_(1 / 13).round_()
    detail.sub_(x[centre:centre + window.shape[0]])
    return F.pad(detail, (centre, n - centre - detail.shape[0])).view(b, c, h, w).mul_(constants["interior"])


def _blend(images: Tensor, gray: Tensor, choice: Tensor, v: Tensor, constants: Dict[str, Tensor]) -> Tensor:
    """Color and Sharpness in one blend ``a + other * (1 - f)`` (torchvision's arithmetic): Color with
    ``a = x f`` and ``other`` the grayscale, Sharpness with ``a = x`` and ``other`` the interior's 3x3
    smoothing (1s around a 5, / 13, rounded) minus ``x``, 0 on the border (which it keeps)."""
    x, rest = images, _per_image((1.0 - v).float())
    sharp = _per_image(constants["sharpness"][choice])
    other = _pick(gray, _sharpness_detail(x, constants), sharp)
    a = x * _pick(_per_image(v.float()), torch.ones_like(sharp), sharp)
    return _to_pixels(_fused_add(a, other, rest))


def _apply_drawn(images: Tensor, choice: Tensor, v: Tensor, grid: Tensor, constants: Dict[str, Tensor]) -> Tensor:
    """Each image (float32 holding uint8 values) through the operation it drew (``choice`` (B,) into
    :data:`OPS`) with magnitude ``v`` (B,), the whole batch at once: one affine resampling (``grid``, the
    pixel centres for images that drew no geometric operation), one table lookup (the identity table for
    those that drew no pointwise operation), and the blend of Color and Sharpness kept where they were
    drawn."""
    b, c, h, w = images.shape
    moved = _affine_nearest(images, grid)  # equal to ``images`` where no geometric operation was drawn
    gray = _gray(moved)
    index = moved.view(b, c, h * w).int().long()  # (through int32: twice as fast as float32 -> int64 here)
    looked_up = _lookup_tables(moved, gray, index, choice, v, constants).gather(2, index).view(b, c, h, w)
    return _pick(looked_up, _blend(moved, gray, choice, v, constants), _per_image(constants["blend"][choice]))


def _rounds(images: Tensor, choice: Tensor, v: Tensor) -> Tensor:
    """RandAugment's rounds on float32 images holding uint8 values: round k applies operation
    ``choice[:, k]`` with magnitude ``v[:, k]`` (float64) to each image; the sampling grids of every round
    are computed together."""
    h, w = images.shape[2], images.shape[3]
    constants = _constants(images.device, h, w)
    grids = _grids(choice, v, constants, h, w)
    for k in range(choice.shape[1]):
        images = _apply_drawn(images, choice[:, k], v[:, k], grids[:, k], constants)
    return images


def _to_uint8(images: Tensor) -> Tensor:
    """float32 whole numbers in [0, 255] to uint8 (through int32: several times faster on CPUs, exact)."""
    return images.int().to(torch.uint8)


def apply_op(name: str, images_u8: Tensor, magnitudes: Tensor) -> Tensor:
    """One RandAugment operation on a batch, one magnitude per image (public for tests and the book)."""
    if name not in [n for n, _, _ in OPS]:
        raise KDLibError(f"unknown RandAugment operation {name!r}; valid: {', '.join(n for n, _, _ in OPS)}")
    v = magnitudes.reshape(-1, 1).to(device=images_u8.device, dtype=torch.float64)
    choice = torch.full_like(v, _op_index(name), dtype=torch.int64)
    return _to_uint8(_rounds(images_u8.float(), choice, v))


def _cutout(images: Tensor, side: Tensor, u_x: Tensor, u_y: Tensor) -> Tensor:
    """:func:`cutout` on float32 images holding pixel values."""
    b, c, h, w = images.shape
    constants = _constants(images.device, h, w)
    side, u_x, u_y = (t.to(device=images.device, dtype=torch.float64).reshape(-1, 1, 1) for t in (side, u_x, u_y))
    x0 = ((w + (1.0 - w) * u_x) - side / 2.0).clamp(min=0).floor()
    y0 = ((h + (1.0 - h) * u_y) - side / 2.0).clamp(min=0).floor()
    x1, y1 = (x0 + side).clamp(max=w), (y0 + side).clamp(max=h)
    xs, ys = constants["columns"], constants["rows"]
    # the square as a row interval times a column interval: one full-size product of two small 0/1 masks
    in_columns = ((xs >= x0) & (xs <= x1)).float()
    in_rows = ((ys >= y0) & (ys <= y1) & (side > 0)).float()
    return _pick(images, constants["fill"], (in_rows * in_columns).unsqueeze(1))


def cutout(images: Tensor, side: Tensor, u_x: Tensor, u_y: Tensor) -> Tensor:
    """The authors' ``CutoutAbs`` per image: centre drawn as ``np.random.uniform(W)``, i.e. uniform in
    (1, W] (a quirk of calling it with one argument), corner ``int(max(0, centre - side / 2))``, far corner
    ``min(W, corner + side)``; the PIL rectangle includes both ends; fill (125, 123, 114). uint8 images."""
    return _to_uint8(_cutout(images.float(), side, u_x, u_y))


def rand_augment(images_u8: Tensor, generator: torch.Generator, n: int = 2) -> Tensor:
    """RandAugment(n) + Cutout per image, as the authors' ``RandAugment.__call__``: ``n`` operations
    drawn with replacement, magnitudes uniform in each operation's range, then Cutout."""
    b = images_u8.shape[0]
    dev = generator.device
    choice = torch.randint(0, len(OPS), (b, n), generator=generator, device=dev).to(images_u8.device)
    mags = torch.rand(b, n, generator=generator, device=dev, dtype=torch.float64).to(images_u8.device)
    cut = torch.rand(b, 3, generator=generator, device=dev, dtype=torch.float64).to(images_u8.device)
    constants = _constants(images_u8.device, images_u8.shape[2], images_u8.shape[3])
    v = constants["low"][choice] + constants["span"][choice] * mags
    out = _rounds(images_u8.float(), choice, v)  # pixel values stay whole numbers: one conversion in, one out
    return _to_uint8(_cutout(out, cut[:, 0] * 0.5 * images_u8.shape[3], cut[:, 1], cut[:, 2]))


def strong_augment(images_u8: Tensor, generator: torch.Generator) -> Tensor:
    """MLKD's strong view of un-augmented uint8 images: crop + flip, RandAugment(2, 10), Cutout."""
    if images_u8.dtype != torch.uint8 or images_u8.dim() != 4 or images_u8.shape[1] != 3:
        raise KDLibError(f"strong_augment expects uint8 images (B, 3, H, W), got {images_u8.dtype} "
                         f"{tuple(images_u8.shape)}")
    views, _, _ = random_crop_flip(images_u8, generator)
    return rand_augment(views, generator)


__all__ = ["OPS", "CUTOUT_FILL", "apply_op", "cutout", "rand_augment", "strong_augment"]
