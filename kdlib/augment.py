"""MLKD's strong augmentation on uint8 tensors: random crop + flip, RandAugment(2, 10) and Cutout.

The facts follow the MLKD authors' data pipeline (the FixMatch-style ``RandAugment`` of their
``mdistiller/dataset/cifar100.py``, identical in the LS repository): after ``RandomCrop(32, padding=4)``
and ``RandomHorizontalFlip``, two operations are drawn with replacement from 14, each with a magnitude
drawn uniformly from its range (the ``m = 10`` argument is unused by that code), then a Cutout square of
side ``U(0, 0.5) * W`` filled with (125, 123, 114). Operations follow PIL's definitions (nearest-neighbour
affine maps with black fill, ``ImageEnhance`` factors, solarize at ``x >= threshold``); the enhancement
operations go through ``torchvision``'s tensor kernels (pixel equality with PIL is not claimed for them).

Every random number comes from the ``torch.Generator`` given, so a run's views are reproducible.
Input and output: uint8 (B, 3, H, W) on any device; the per-image work runs on the images' device.
"""
from __future__ import annotations

import math
from typing import Callable, List, Tuple

import torch
import torchvision.transforms.v2.functional as TF
from torch import Tensor

from kdlib.data import random_crop_flip
from kdlib.errors import KDLibError

CUTOUT_FILL = (125, 123, 114)


def _affine_nearest(images: Tensor, coef: Tensor) -> Tensor:
    """PIL's ``Image.transform(AFFINE, (a, b, c, d, e, f))`` with nearest sampling, one matrix per image
    (``coef`` (B, 6)): output pixel (x, y) takes input (a x' + b y' + c, d x' + e y' + f) at the pixel
    centre x' = x + 0.5, floored; black outside the image."""
    b, ch, h, w = images.shape
    coef = coef.to(device=images.device, dtype=torch.float64).view(b, 6, 1, 1)
    ys, xs = torch.meshgrid(torch.arange(h, device=images.device, dtype=torch.float64) + 0.5,
                            torch.arange(w, device=images.device, dtype=torch.float64) + 0.5, indexing="ij")
    sx = torch.floor(coef[:, 0] * xs + coef[:, 1] * ys + coef[:, 2]).long()  # (B, H, W)
    sy = torch.floor(coef[:, 3] * xs + coef[:, 4] * ys + coef[:, 5]).long()
    inside = ((sx >= 0) & (sx < w) & (sy >= 0) & (sy < h)).unsqueeze(1)
    flat = (sy.clamp(0, h - 1) * w + sx.clamp(0, w - 1)).view(b, 1, h * w).expand(b, ch, h * w)
    out = images.reshape(b, ch, h * w).gather(2, flat).view(b, ch, h, w)
    return out * inside.to(images.dtype)


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


def _per_image(fn, images: Tensor, factor: Tensor) -> Tensor:
    """``fn(image, factor)`` image by image (torchvision's enhancement kernels take one scalar factor)."""
    return torch.stack([fn(images[i], float(factor[i])) for i in range(images.shape[0])])


def _apply(name: str, x: Tensor, v: Tensor) -> Tensor:
    """Operation ``name`` on the images ``x`` (B, 3, H, W) uint8 with per-image magnitudes ``v`` (B,)."""
    if name == "Identity":
        return x
    if name == "AutoContrast":
        return TF.autocontrast(x)
    if name == "Equalize":
        return TF.equalize(x)
    if name in ENHANCE:  # PIL's ImageEnhance factors, through torchvision's tensor kernels
        return _per_image(ENHANCE[name], x, v)
    if name == "Posterize":  # keep the top int(v) bits
        bits = v.long().clamp(min=1).to(x.device)
        mask = ((255 << (8 - bits)) & 255).to(torch.uint8).view(-1, 1, 1, 1)
        return x & mask
    if name == "Solarize":  # PIL: invert every pixel >= threshold
        return torch.where(x.float() >= v.to(x.device, torch.float32).view(-1, 1, 1, 1), 255 - x, x)
    return _affine_nearest(x, _affine_coef(name, v, x.shape[2], x.shape[3]))


ENHANCE = {"Brightness": TF.adjust_brightness, "Color": TF.adjust_saturation, "Contrast": TF.adjust_contrast,
           "Sharpness": TF.adjust_sharpness}
#: the 14 operations and magnitude ranges of the authors' ``augment_list`` (name, low, high)
OPS: List[Tuple[str, float, float]] = [
    ("AutoContrast", 0.0, 1.0), ("Brightness", 0.05, 0.95), ("Color", 0.05, 0.95),
    ("Contrast", 0.05, 0.95), ("Equalize", 0.0, 1.0), ("Identity", 0.0, 1.0), ("Posterize", 4.0, 8.0),
    ("Rotate", -30.0, 30.0), ("Sharpness", 0.05, 0.95), ("ShearX", -0.3, 0.3), ("ShearY", -0.3, 0.3),
    ("Solarize", 0.0, 256.0), ("TranslateX", -0.3, 0.3), ("TranslateY", -0.3, 0.3),
]


def apply_op(name: str, images_u8: Tensor, magnitudes: Tensor) -> Tensor:
    """One RandAugment operation on a batch, one magnitude per image (public for tests and the book)."""
    return _apply(name, images_u8, magnitudes.reshape(-1).double())


def cutout(images: Tensor, side: Tensor, u_x: Tensor, u_y: Tensor) -> Tensor:
    """The authors' ``CutoutAbs`` per image: centre drawn as ``np.random.uniform(W)``, i.e. uniform in
    (1, W] (a quirk of calling it with one argument), corner ``int(max(0, centre - side / 2))``, far corner
    ``min(W, corner + side)``; the PIL rectangle includes both ends; fill (125, 123, 114)."""
    b, _, h, w = images.shape
    dev = images.device
    side, u_x, u_y = (t.to(device=dev, dtype=torch.float64).reshape(-1) for t in (side, u_x, u_y))
    x0 = ((w + (1.0 - w) * u_x) - side / 2.0).clamp(min=0).floor()
    y0 = ((h + (1.0 - h) * u_y) - side / 2.0).clamp(min=0).floor()
    x1, y1 = (x0 + side).clamp(max=w), (y0 + side).clamp(max=h)
    xs = torch.arange(w, device=dev, dtype=torch.float64).view(1, 1, w)
    ys = torch.arange(h, device=dev, dtype=torch.float64).view(1, h, 1)
    box = ((xs >= x0.view(-1, 1, 1)) & (xs <= x1.view(-1, 1, 1)) & (ys >= y0.view(-1, 1, 1))
           & (ys <= y1.view(-1, 1, 1)) & (side.view(-1, 1, 1) > 0)).unsqueeze(1)
    fill = torch.tensor(CUTOUT_FILL, dtype=images.dtype, device=dev).view(1, 3, 1, 1)
    return torch.where(box, fill, images)


def rand_augment(images_u8: Tensor, generator: torch.Generator, n: int = 2) -> Tensor:
    """RandAugment(n) + Cutout per image, as the authors' ``RandAugment.__call__`` (magnitudes uniform
    in each operation's range); batched: each round applies each operation to the images that drew it."""
    b = images_u8.shape[0]
    dev = generator.device
    choice = torch.randint(0, len(OPS), (b, n), generator=generator, device=dev).to(images_u8.device)
    mags = torch.rand(b, n, generator=generator, device=dev, dtype=torch.float64).to(images_u8.device)
    cut = torch.rand(b, 3, generator=generator, device=dev, dtype=torch.float64).to(images_u8.device)
    out = images_u8
    for k in range(n):
        nxt = out.clone()
        for op, (name, lo, hi) in enumerate(OPS):
            sel = (choice[:, k] == op).nonzero().squeeze(1)
            if sel.numel():
                nxt[sel] = _apply(name, out[sel], lo + (hi - lo) * mags[sel, k])
        out = nxt
    return cutout(out, cut[:, 0] * 0.5 * images_u8.shape[3], cut[:, 1], cut[:, 2])


def strong_augment(images_u8: Tensor, generator: torch.Generator) -> Tensor:
    """MLKD's strong view of un-augmented uint8 images: crop + flip, RandAugment(2, 10), Cutout."""
    if images_u8.dtype != torch.uint8 or images_u8.dim() != 4 or images_u8.shape[1] != 3:
        raise KDLibError(f"strong_augment expects uint8 images (B, 3, H, W), got {images_u8.dtype} "
                         f"{tuple(images_u8.shape)}")
    views, _, _ = random_crop_flip(images_u8, generator)
    return rand_augment(views, generator)
