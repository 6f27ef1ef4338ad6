"""The strong augmentation's speed on a CPU, A/B interleaved in one process.

Times ``strong_augment`` on 64-image CIFAR-size batches for three implementations, called in turn so that
the machine's load hits them alike: the earlier per-operation-subset version (torchvision per image for
the enhancements; not capture-safe; read from the git history), the first batched capture-safe version
(frozen in ``tests/augment_reference.py``) and the library's current one. Prints the median CPU time and
wall time per batch for each thread count, and the ratios. Run from the repository root:

    python benchmarks/augment_speed.py [--reps 40] [--threads 1 2] [--step-ratio]

``--step-ratio`` also times one whole training step of MLKD and of KD (``kdlib.bench.method_step_seconds``:
the engine's step, the live teacher for both, the smoke profile's resnet20 -> resnet8 on synthetic data,
the methods in turn) and prints MLKD / KD.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys
import time
import types

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
#: the last commit whose kdlib/augment.py applied each operation to the subset of images that drew it
PER_IMAGE_COMMIT = "c89f290"


def _module_from_source(name: str, source: str) -> types.ModuleType:
    module = types.ModuleType(name)
    exec(compile(source, f"<{name}>", "exec"), module.__dict__)
    return module


def implementations() -> dict:
    found = {}
    try:
        source = subprocess.run(["git", "show", f"{PER_IMAGE_COMMIT}:kdlib/augment.py"], cwd=ROOT, check=True,
                                capture_output=True, text=True).stdout
        found["per-image (old)"] = _module_from_source("augment_per_image", source).strong_augment
    except (OSError, subprocess.CalledProcessError):
        print(f"(the per-image version {PER_IMAGE_COMMIT} is not in this clone's history: not timed)")
    spec = importlib.util.spec_from_file_location("augment_reference", os.path.join(ROOT, "tests", "augment_reference.py"))
    reference = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(reference)
    found["batched (first)"] = reference.strong_augment
    from kdlib import augment
    found["batched (now)"] = augment.strong_augment
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=40)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--step-ratio", dest="step_ratio", action="store_true")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per repeat of --step-ratio")
    parser.add_argument("--repeats", type=int, default=5, help="repeats of --step-ratio (median)")
    args = parser.parse_args()
    fns = implementations()
    images = torch.randint(0, 256, (args.batch, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    outputs = {name: fn(images, torch.Generator().manual_seed(1)) for name, fn in fns.items()}
    first = next(iter(outputs.values()))
    print("same views for the same generator:", all(torch.equal(first, o) for o in outputs.values()))
    print(f"load average before: {os.getloadavg()}")
    for threads in args.threads:
        torch.set_num_threads(threads)
        cpu = {name: [] for name in fns}
        wall = {name: [] for name in fns}
        generator = torch.Generator().manual_seed(2)
        for _ in range(5):
            for fn in fns.values():
                fn(images, generator)
        for _ in range(args.reps):
            for name, fn in fns.items():
                c, w = time.process_time(), time.perf_counter()
                fn(images, generator)
                cpu[name].append(time.process_time() - c)
                wall[name].append(time.perf_counter() - w)
        median = lambda xs: sorted(xs)[len(xs) // 2] * 1e3  # noqa: E731
        base = {kind: median(d[next(iter(fns))]) for kind, d in (("cpu", cpu), ("wall", wall))}
        for name in fns:
            c, w = median(cpu[name]), median(wall[name])
            print(f"threads {threads}  {name:16s} cpu {c:7.2f} ms (min {min(cpu[name]) * 1e3:6.2f})  wall {w:7.2f} ms  "
                  f"speed vs {next(iter(fns))}: cpu {base['cpu'] / c:5.2f}x  wall {base['wall'] / w:5.2f}x")
    print(f"load average after: {os.getloadavg()}")
    if args.step_ratio:
        step_ratio(args)


def step_ratio(args: argparse.Namespace) -> None:
    from kdlib import bench, models
    from kdlib.data import make_synthetic

    torch.set_num_threads(args.threads[-1])
    per_class = -(-(args.steps * args.repeats + 2) * args.batch // 100)
    dataset = make_synthetic(train_per_class=per_class, test_per_class=1, seed=0)
    teacher = models.create("resnet20", num_classes=dataset.num_classes).eval()
    print(f"step times, {torch.get_num_threads()} threads, load average before: {os.getloadavg()}")
    seconds = bench.method_step_seconds({"kd": "kd", "mlkd": "mlkd"}, teacher, "resnet8", dataset,
                                        torch.device("cpu"), batch_size=args.batch, steps=args.steps,
                                        repeats=args.repeats)
    print(f"KD {seconds['kd'] * 1e3:.1f} ms/step, MLKD {seconds['mlkd'] * 1e3:.1f} ms/step, "
          f"MLKD / KD = {seconds['mlkd'] / seconds['kd']:.2f}x; load average after: {os.getloadavg()}")


if __name__ == "__main__":
    sys.exit(main())
