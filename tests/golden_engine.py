"""Golden histories of tiny CPU runs, recorded from the engine and compared bit for bit by
``tests/test_golden_engine.py``: any change to the engine that moves a single bit of a CPU run shows.

Regenerate (only when a change of the numbers is intended, and say why in the commit)::

    PYTHONPATH=. python tests/golden_engine.py

Each run: synthetic data (100 classes x 2 train / 1 test image), resnet8 -> resnet8, a 2-epoch teacher
trained by the engine, 2 student epochs, milestones [1] (so the learning rate changes), batch 64 (the
last batch is partial), ``teacher_cache=off`` and ``lazy`` alternating over the methods, one thread.
"""
from __future__ import annotations

import hashlib
import json
import sys
import tempfile
from pathlib import Path

import torch

GOLDEN_DIR = Path(__file__).resolve().parent / "data" / "golden_engine"
METHODS = ("vanilla", "kd", "dkd", "cwkd", "dlkd", "aekt")
THREADS = 1  # the test machines share 2 cores between processes: one thread is the fast, stable choice
#: which views of the run are compared bit for bit
KEYS = ("epoch", "lr", "train_loss", "train_acc", "test_acc", "test_acc5", "test_loss", "per_class_acc", "method")


def golden_config(method: str, root: Path):
    from kdlib.config import make_config

    from kdlib import methods

    # the records were made with the papers' warm-up of 20 epochs, by epoch, before short runs scaled it
    warmup = {"warmup": 20} if "warmup" in methods.get(method).defaults else {}
    return make_config(
        "smoke", method=method, dataset="synthetic", train_per_class=2, test_per_class=1, teacher="resnet8",
        student="resnet8", teacher_epochs=2, epochs=2, milestones=[1], device="cpu", method_params=warmup,
        amp="none",  # recorded in fp32, before bf16 became the default on CPUs that have it
        teacher_cache="off" if METHODS.index(method) % 2 == 0 else "lazy",
        teachers_dir=str(root / "teachers"), out=str(root / method))


def _state_digest(state) -> str:
    digest = hashlib.sha256()
    for key in sorted(state):
        value = state[key]
        digest.update(key.encode())
        if isinstance(value, torch.Tensor):
            digest.update(value.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def run_golden(method: str, root: Path) -> dict:
    """One golden run in ``root`` (with ``THREADS`` threads, restored after): the record to compare."""
    from kdlib import engine

    threads = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    try:
        metrics = engine.train(golden_config(method, Path(root)), progress=False, verbose=False)
    finally:
        torch.set_num_threads(threads)
    student = torch.load(Path(root) / method / engine.STUDENT, weights_only=True)["model"]
    return {
        "method": method,
        "history": [{k: row[k] for k in KEYS if k in row} for row in metrics["history"]],
        "final_test_acc": metrics["final"]["test_acc"],
        "final_per_class_acc": metrics["final"]["per_class_acc"],
        "teacher_test_acc": (metrics["config"]["teacher"] or {}).get("test_acc"),
        "student_sha256": _state_digest(student),
    }


def recorded_with() -> dict:
    """What a bit-for-bit CPU comparison depends on besides the code."""
    return {"torch": torch.__version__.split("+")[0], "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "threads": THREADS}


def main(argv=None) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        GOLDEN_DIR.mkdir(parents=True, exist_ok=True)
        for method in METHODS:
            record = {"recorded_with": recorded_with(), **run_golden(method, Path(tmp))}
            path = GOLDEN_DIR / f"{method}.json"
            path.write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
            print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
