"""kdlib.augment, the optimised strong view against the frozen first batched version, pixel for pixel.

The frozen copy (``augment_reference.py``) builds its sampling grid with ``F.affine_grid``, whose matrix
product runs in the BLAS; the library applies the same float32 products and sums itself, unfused (what the
BLAS here computes; the grid test below checks the library's against float64 arithmetic rounded at each
step, on any machine). Where a BLAS fuses them, the reference is compared with its grid made the same way.
"""
from __future__ import annotations

import types

import pytest
import torch
import torch.nn.functional as F

import augment_reference as reference
from kdlib import augment

B = 64


def _images(seed: int, batch: int = B) -> torch.Tensor:
    """Random pixels, with the cases the statistics treat specially: few-valued images (equalize's step,
    autocontrast's range), one-valued channels and images, black and white ones."""
    x = torch.randint(0, 256, (batch, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))
    x[:6] = x[:6] // 64 * 64
    x[6, 0] = 17
    x[7] = 200
    x[8] = 0
    x[9] = 255
    x[10] = (x[10] // 128) * 255
    return x


def _unfused_affine_grid(theta, size, align_corners=False):
    base = F.affine_grid(torch.eye(2, 3).unsqueeze(0), [1, 1, size[2], size[3]], align_corners=align_corners)
    bx, by = base[..., 0], base[..., 1]
    t = theta.reshape(-1, 6, 1, 1)
    return torch.stack([bx * t[:, 0] + by * t[:, 1] + t[:, 2], bx * t[:, 3] + by * t[:, 4] + t[:, 5]], dim=-1)


@pytest.fixture
def frozen(monkeypatch):
    """The frozen module; its grid made without fused multiply-adds where this machine's BLAS fuses them."""
    theta = torch.randn(16, 2, 3, generator=torch.Generator().manual_seed(0))
    if not torch.equal(F.affine_grid(theta, [16, 3, 32, 32], align_corners=False),
                       _unfused_affine_grid(theta, [16, 3, 32, 32])):
        monkeypatch.setattr(reference, "F", types.SimpleNamespace(affine_grid=_unfused_affine_grid,
                                                                  grid_sample=F.grid_sample))
    return reference


@pytest.mark.parametrize("seed", range(8))
def test_strong_view_equals_the_frozen_batched_version(frozen, seed):
    images = _images(seed)
    expected = frozen.strong_augment(images, torch.Generator().manual_seed(100 + seed))
    got = augment.strong_augment(images, torch.Generator().manual_seed(100 + seed))
    assert torch.equal(got, expected)


def test_rand_augment_with_more_rounds_and_an_odd_batch_equals_the_frozen_version(frozen):
    images = _images(3, batch=37)
    expected = frozen.rand_augment(images, torch.Generator().manual_seed(5), n=4)
    assert torch.equal(augment.rand_augment(images, torch.Generator().manual_seed(5), n=4), expected)


@pytest.mark.parametrize("name", [n for n, _, _ in augment.OPS])
def test_each_operation_equals_the_frozen_version_over_its_range(frozen, name):
    low, high = next((lo, hi) for n, lo, hi in augment.OPS if n == name)
    v = torch.linspace(low, high, B, dtype=torch.float64)  # both ends of the range included
    images = _images(11)
    assert torch.equal(augment.apply_op(name, images, v), frozen.apply_op(name, images, v))


def test_cutout_equals_the_frozen_version(frozen):
    images = _images(12)
    g = torch.Generator().manual_seed(3)
    side, ux, uy = torch.rand(B, generator=g, dtype=torch.float64) * 16, torch.rand(B, generator=g), torch.rand(B, generator=g)
    side[:4] = 0.0
    ux[4], uy[5] = 1.0, 0.0
    assert torch.equal(augment.cutout(images, side, ux, uy), frozen.cutout(images, side, ux, uy))


def test_sampling_grid_is_float32_arithmetic_rounded_at_each_step():
    """Independent of the machine: x a' + y b' rounded to float32 after each product and sum, then + c'."""
    g = torch.Generator().manual_seed(1)
    choice = torch.randint(0, len(augment.OPS), (B, 2), generator=g)
    constants = augment._constants(torch.device("cpu"), 32, 32)
    v = constants["low"][choice] + constants["span"][choice] * torch.rand(B, 2, generator=g, dtype=torch.float64)
    grid = augment._grids(choice, v, constants, 32, 32)
    # the matrices in normalised coordinates, recomputed from PIL's coefficients in float64
    coef = torch.zeros(B, 2, 6, dtype=torch.float64)
    names = [augment.OPS[i][0] for i in choice.reshape(-1).tolist()]
    for k, (name, m) in enumerate(zip(names, v.reshape(-1).tolist())):
        a, b_, c, d, e, f = 1.0, 0.0, 0.0, 0.0, 1.0, 0.0
        if name == "ShearX":
            b_ = m
        elif name == "ShearY":
            d = m
        elif name == "TranslateX":
            c = m * 32
        elif name == "TranslateY":
            f = m * 32
        elif name == "Rotate":
            r = -torch.deg2rad(torch.tensor(m, dtype=torch.float64))
            ca, sa = float(torch.cos(r)), float(torch.sin(r))
            a, b_, c, d, e, f = ca, sa, 16 - ca * 16 - sa * 16, -sa, ca, 16 + sa * 16 - ca * 16
        coef.view(-1, 6)[k] = torch.tensor([a, b_, c, d, e, f], dtype=torch.float64)
    row0 = torch.stack([coef[..., 0], coef[..., 1], coef[..., 0] + coef[..., 1] + 2 * coef[..., 2] / 32 - 1], -1)
    row1 = torch.stack([coef[..., 3], coef[..., 4], coef[..., 3] + coef[..., 4] + 2 * coef[..., 5] / 32 - 1], -1)
    theta = torch.stack([row0, row1], -2).float().double()  # (B, 2, 2, 3), rounded to float32 once
    # affine_grid's pixel centres (float32 values near (2 i + 1) / 32 - 1), read from its identity grid
    centres = F.affine_grid(torch.eye(2, 3).unsqueeze(0), [1, 1, 32, 32], align_corners=False).double()
    assert torch.allclose(centres[0, 0, :, 0], (torch.arange(32, dtype=torch.float64) * 2 + 1) / 32 - 1, atol=1e-6)
    f32 = lambda t: t.float().double()  # noqa: E731  one float32 rounding
    xs, ys = centres[0, 0, :, 0].view(1, 1, 1, 32), centres[0, :, 0, 1].view(1, 1, 32, 1)
    for axis in range(2):
        t = theta[:, :, axis, :, None, None]
        expected = f32(f32(f32(xs * t[:, :, 0]) + f32(ys * t[:, :, 1])) + t[:, :, 2])
        assert torch.equal(grid[..., axis].double(), expected)


def test_constants_hold_no_host_copy_and_are_reused():
    """The per-device constants are made once per device and size (a captured graph keeps using them)."""
    a = augment._constants(torch.device("cpu"), 32, 32)
    assert augment._constants(torch.device("cpu"), 32, 32) is a
    assert a["fill"].view(-1).tolist() == list(augment.CUTOUT_FILL)
    assert a["interior"].sum() == 30 * 30
