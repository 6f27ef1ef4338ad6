"""Batched crop/flip and normalisation of uint8 image tensors (re-exported by :mod:`kdlib.data`).

Augmentation is batched tensor work, so it runs wherever the images are, CPU or GPU, without PIL or a
DataLoader. ``crop_flip`` is exactly torchvision's ``RandomCrop(32, padding=4)`` followed by
``RandomHorizontalFlip()`` for given parameters: zero padding in pixel space (before normalisation),
crop offsets ``(top, left)`` in ``0..2*padding`` of the padded image, then the flip. The standard space
has 9 x 9 x 2 = 162 views per image; :func:`view_index` numbers them, for exact teacher-logit caches.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from kdlib.errors import KDLibError

__all__ = ["CIFAR100_MEAN", "CIFAR100_STD", "random_crop_flip", "crop_flip", "view_index", "normalize"]

CIFAR100_MEAN = (0.5071, 0.4867, 0.4408)
CIFAR100_STD = (0.2675, 0.2565, 0.2761)


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
