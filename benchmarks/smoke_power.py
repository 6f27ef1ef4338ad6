"""How many seeds, epochs and images the smoke profile needs to decide KD against vanilla: measured.

For each candidate recipe (student epochs, training images per class) this trains the vanilla and the KD
student for several seeds (one thread per run, two runs side by side, as the book trains them), records
each run's CPU seconds, then evaluates every finished student on one large synthetic test set (the same
generator and class design as the book's, more images per class) and sub-samples it to emulate smaller
test sets. From the per-image correctness it reports, per recipe and test-set size: the mean KD - vanilla
difference, the standard deviation of the paired (same-seed) differences, the seeds a paired t-test
needs for 80 % power at the 5 % level, and the CPU minutes that costs.

    KDLIB_HOME=_build/power .venv/bin/python benchmarks/smoke_power.py --out _build/power/power.json
    .venv/bin/python benchmarks/smoke_power.py --out _build/power/power.json --report

Numbers, and the choice made from them, are in benchmarks/RESULTS.md ("Power of the smoke profile").
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent


def train(method, epochs, train_per_class, seed, out, test_per_class=20):
    """Start one run in its own process with one thread; returns the Popen."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "kdlib", "train", "--method", method, "--profile", "smoke", "--epochs",
           str(epochs), "--seed", str(seed), "--out", str(out), "--set", f"train_per_class={train_per_class}",
           "--set", f"test_per_class={test_per_class}", "--quiet", "--no-progress", "--device", "cpu"]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def run_pairwise(jobs, parallel=2):
    """Run ``jobs`` ([(key, argv-tuple)]) ``parallel`` at a time; CPU seconds of each (children's rusage)."""
    cpu, pending, running = {}, list(jobs), {}
    while pending or running:
        while pending and len(running) < parallel:
            key, args = pending.pop(0)
            if (Path(args[4]) / "student.pt").is_file():
                continue
            running[train(*args).pid] = (key, time.perf_counter())
        if not running:
            break
        pid, status, usage = os.wait4(-1, 0)
        if pid not in running:
            continue
        key, start = running.pop(pid)
        if status != 0:
            raise SystemExit(f"run {key} failed (status {status})")
        cpu[key] = {"cpu_s": usage.ru_utime + usage.ru_stime, "wall_s": time.perf_counter() - start}
        print(key, cpu[key], flush=True)
    return cpu


def correctness(run_dir, images, labels):
    import torch

    from kdlib import experiments as ex

    torch.set_num_threads(1)
    model = ex.student_model(run_dir)
    return (ex.logits(model, images).argmax(1) == labels).numpy()


def report(path, cost_log=None):
    """Per recipe and test-set size: KD - vanilla, the spread of the paired differences, the seeds a paired
    t-test needs for 80 % power, the detectable difference with 3 and 4 seeds, and the information per
    unit of training work, (difference / spread)^2 / (epochs x images per class)."""
    from kdlib import stats

    data = json.loads(Path(path).read_text())
    y = np.array(data["test_labels"])
    big = int(data["big_test_per_class"])
    by_class = [np.flatnonzero(y == c) for c in range(int(y.max()) + 1)]
    rng = np.random.default_rng(0)
    for recipe, runs in data["recipes"].items():
        epochs, n = (int(v) for v in recipe.split("x"))
        runs = {k: np.array(v, dtype=bool) for k, v in runs.items()}
        seeds = sorted(int(k.split("-s")[1]) for k in runs if k.startswith("kd-"))
        print(f"recipe {epochs} epochs x {n} train/class, seeds {seeds}")
        for m in (20, 50, 100, big):
            means, sds = [], []
            for _ in range(20 if m < big else 1):
                idx = (np.concatenate([rng.choice(ix, m, replace=False) for ix in by_class]) if m < big
                       else np.arange(len(y)))
                d = np.array([100 * (runs[f"kd-s{s}"][idx].mean() - runs[f"vanilla-s{s}"][idx].mean()) for s in seeds])
                means.append(d.mean())
                sds.append(d.std(ddof=1))
            diff, sd = float(np.mean(means)), float(np.sqrt(np.mean(np.square(sds))))
            print(f"  {m:4d} test/class: KD - vanilla {diff:+.2f}, sd of paired differences {sd:.2f}, "
                  f"seeds for 80 % power {stats.seeds_needed(sd, abs(diff))}, detectable with 3 / 4 seeds "
                  f"{stats.detectable_difference(sd, 3):.2f} / {stats.detectable_difference(sd, 4):.2f}, "
                  f"information per unit of work {(diff / sd) ** 2 / (epochs * n):.4f}")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="_build/power/power.json")
    p.add_argument("--recipes", default="6x40,4x40,4x30", help="EPOCHSxTRAIN_PER_CLASS, comma separated")
    p.add_argument("--seeds", default="6,4,4", help="seeds per recipe, comma separated")
    p.add_argument("--big-test", type=int, default=200, help="test images per class of the evaluation set")
    p.add_argument("--report", action="store_true", help="only print the analysis of an existing --out file")
    a = p.parse_args()
    if a.report:
        return report(a.out)
    home = Path(os.environ.get("KDLIB_HOME", ROOT / "_build" / "power"))
    recipes = [tuple(int(v) for v in r.split("x")) for r in a.recipes.split(",")]
    seeds = [int(v) for v in a.seeds.split(",")]
    cost, runs = {}, {}
    for (epochs, n), n_seeds in zip(recipes, seeds):
        base = home / "power_runs" / f"e{epochs}_n{n}"
        # the teacher (trained once per data size, by the first KD run, alone and timed as part of it)
        first = (f"kd e{epochs} n{n} s0", ("kd", epochs, n, 0, base / "kd-s0"))
        cost.update(run_pairwise([first], parallel=1))
        jobs = [(f"{m} e{epochs} n{n} s{s}", (m, epochs, n, s, base / f"{m}-s{s}"))
                for s, m in itertools.product(range(n_seeds), ("vanilla", "kd"))]
        cost.update(run_pairwise(jobs, parallel=2))
        runs[(epochs, n)] = {(m, s): base / f"{m}-s{s}" for s, m in itertools.product(range(n_seeds), ("vanilla", "kd"))}

    from kdlib.data import load_dataset

    big = load_dataset("synthetic", train_per_class=1, test_per_class=a.big_test, seed=0)
    t0 = time.process_time()
    result = {"recipes": {}, "cost": cost, "big_test_per_class": a.big_test}
    for (epochs, n), dirs in runs.items():
        correct = {key: correctness(path, big.test_images, big.test_labels) for key, path in dirs.items()}
        result["recipes"][f"{epochs}x{n}"] = {f"{m}-s{s}": c.astype(np.uint8).tolist() for (m, s), c in correct.items()}
    result["eval_cpu_s_per_image"] = (time.process_time() - t0) / (sum(len(d) for d in runs.values()) * len(big.test_labels))
    result["test_labels"] = big.test_labels.tolist()
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result))
    print("wrote", a.out)
    report(a.out)


if __name__ == "__main__":
    main()
