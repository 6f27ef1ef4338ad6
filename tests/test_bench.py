"""`python -m kdlib bench`: the reference pipeline sees the same augmentation as the fast path, and the
command runs and reports every required figure. Correctness only: no test looks at a speed."""
from __future__ import annotations

import math
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from kdlib import bench, methods
from kdlib.data import crop_flip, normalize, random_crop_flip
from kdlib.engine import epoch_generator

REPO = Path(__file__).resolve().parent.parent


def _images(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g)


def _reference_params(seed):
    """The parameters the reference transform draws after ``torch.manual_seed(seed)``: torchvision's
    ``RandomCrop.get_params`` draws top then left with ``torch.randint``, then ``RandomHorizontalFlip``
    draws ``torch.rand(1) < 0.5``."""
    torch.manual_seed(seed)
    top = int(torch.randint(0, 9, size=(1,)).item())
    left = int(torch.randint(0, 9, size=(1,)).item())
    return top, left, bool(torch.rand(1) < 0.5)


def test_fast_path_view_equals_the_reference_transform_exactly():
    images = _images(300)
    transform = bench.reference_transform()
    seen = set()
    for b in range(images.shape[0]):
        top, left, flip = _reference_params(1000 + b)
        torch.manual_seed(1000 + b)  # the reference transform draws exactly these parameters
        want = transform(Image.fromarray(images[b].permute(1, 2, 0).numpy()))
        got = normalize(crop_flip(images[b:b + 1], torch.tensor([[top, left]]), torch.tensor([flip])))[0]
        assert torch.equal(got, want), (b, top, left, flip)
        seen.add((top, left, flip))
    assert len(seen) > 100  # many different views were compared


def test_reference_dataset_reads_hwc_like_torchvision():
    images = _images(4)
    data = bench.ReferenceCIFAR(images.permute(0, 2, 3, 1).contiguous().numpy(), np.arange(4), None)
    img, target = data[2]
    assert isinstance(img, Image.Image) and target == 2
    assert torch.equal(torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1), images[2])


def test_fast_path_augmentation_distribution_matches_the_reference():
    """Offsets uniform over 0..8 per axis, flips with p = 0.5, for the engine's generators and the reference."""
    n = 9000
    images = _images(n)
    _, offsets, flips = random_crop_flip(images, epoch_generator(0, 1, 2))
    ref = torch.tensor([_reference_params(s)[:2] + (int(_reference_params(s)[2]),) for s in range(3000)])
    for name, off, fl in (("kdlib", offsets, flips.float()), ("reference", ref[:, :2], ref[:, 2].float())):
        m = off.shape[0]
        for axis in range(2):
            counts = torch.bincount(off[:, axis], minlength=9)
            assert counts.shape == (9,), name
            expected = m / 9
            chi2 = float(((counts - expected) ** 2 / expected).sum())
            assert chi2 < 40, (name, axis, counts.tolist())  # 8 d.o.f.: P(chi2 > 40) < 1e-5
        assert abs(float(fl.mean()) - 0.5) < 5 * 0.5 / m ** 0.5, name
    # and the marginals of the two agree with each other
    for axis in range(2):
        p = torch.bincount(offsets[:, axis], minlength=9) / n
        q = torch.bincount(ref[:, axis], minlength=9) / ref.shape[0]
        assert (p - q).abs().max() < 0.03


def test_method_overheads_cover_every_method():
    result = bench.method_overheads(torch.device("cpu"), iters=2, repeats=1)
    assert set(result["method_loss_overhead"]) == set(methods.names())
    assert all(v > 0 for v in result["method_loss_overhead"].values())
    assert "dlkd" in result["method_setup_tiny"] and result["method_loss_us"]["ce"] > 0


def test_bench_quick_json_runs(tmp_path):
    env = {**os.environ, "KDLIB_HOME": str(tmp_path), "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    cmd = [sys.executable, "-m", "kdlib", "bench", "--quick", "--json", "--steps", "3", "--repeats", "1",
           "--warmup", "1", "--fill-images", "1", "--threads", "1", "--pair", "resnet8:resnet8"]
    res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    lines = [line for line in res.stdout.splitlines() if line.strip()]
    result = json.loads(lines[-1])
    for key in bench.REQUIRED_KEYS:
        assert key in result, key
    for key in ("reference_img_s", "kdlib_img_s", "speedup", "cache_fill_seconds", "kdlib_live_teacher_img_s",
                "kdlib_cache_cold_img_s", "cache_breakeven_runs", "batch_size", "threads"):
        assert result[key] > 0, key
    assert result["device"] == "cpu" and result["pair"] == "resnet8:resnet8" and result["batch_size"] == 64
    assert result["cache_hits_during_timing"] == 1.0  # the warm cache served every timed view
    assert set(result["method_loss_overhead"]) == set(methods.names())
    assert result["torch"] == torch.__version__ and result["date"]
    assert not any(tmp_path.iterdir()), "the bench left files in KDLIB_HOME"


def test_bench_refuses_bad_arguments(capsys):
    from kdlib.cli import main

    assert main(["bench", "--pair", "resnet8"]) == 2
    assert "TEACHER:STUDENT" in capsys.readouterr().err
    assert main(["bench", "--pair", "resnet8:nonet"]) == 2
    assert main(["bench", "--steps", "0"]) == 2


def test_method_step_seconds_times_every_method_with_the_live_teacher():
    """Equal conditions: every method's step calls the live teacher (no cache), MLKD once more for its
    second view; vanilla never. Values are positive times, one per label (no threshold on their size)."""
    from kdlib import models
    from kdlib.bench import method_step_seconds
    from kdlib.data import load_dataset

    data = load_dataset("synthetic", train_per_class=2, test_per_class=1)
    teacher = models.create("resnet8", num_classes=100).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    calls = []
    teacher.register_forward_hook(lambda module, inputs, output: calls.append(inputs[0].shape[0]))
    specs = {"vanilla": "vanilla", "KD": "kd", "KD T=2": ("kd", {"temperature": 2.0}), "MLKD": "mlkd"}
    counts = {}
    for label, spec in specs.items():
        calls.clear()
        times = method_step_seconds({label: spec}, teacher, "resnet8", data, torch.device("cpu"), steps=2, repeats=2)
        assert list(times) == [label] and times[label] > 0 and math.isfinite(times[label])
        counts[label] = len(calls)
    steps = 1 + 2 * 2  # one warm-up step, then two rounds of two
    assert counts == {"vanilla": 0, "KD": steps, "KD T=2": steps, "MLKD": 2 * steps}
