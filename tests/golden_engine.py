"""Golden histories of tiny CPU runs, one set per machine kind, compared by ``tests/test_golden_engine.py``.

Record the set of the machine kind you are on (only when a change of the numbers is intended, and say why
in the commit; :func:`main` says what becomes of the other kinds' sets)::

    PYTHONPATH=. python tests/golden_engine.py

Each run: synthetic data (100 classes x 2 train / 1 test image), resnet8 -> resnet8, a 2-epoch teacher
trained by the engine, 2 student epochs, milestones [1] (so the learning rate changes), batch 64 (the
last batch is partial), ``teacher_cache=off`` and ``lazy`` alternating over the methods, one thread.

**Machine kinds.** A CPU run is bit-reproducible on one machine, not across CPUs: with the same torch and
the same ATen capability (``AVX512``), oneDNN and MKL still pick kernels by CPU vendor and model, so an
Intel CPU with AMX and an AMD Zen 4 differ in the last bits. A set is recorded with its machine's
:func:`machine_kind` (torch, threads, CPU vendor/family/model/name, the kernel-steering CPU flags, ATen's
capability, oneDNN's ISA, kernel-overriding environment variables) and is *exact* on a machine whose kind
has every value the record names: there the run must be bit-identical. The first set, recorded on an
Intel CPU with AMX before kinds were recorded, names only what is known of its machine (torch, threads,
capability, vendor, AMX); running this script on such a machine replaces it with a fully named set.

**Tolerance** (:func:`differences_beyond_tolerance`), for every set that is not exact on this machine.
Measured spread of the same six runs against the AMD Zen 4 set (2026-12-04; relative differences, the
largest over the six methods and both epochs; "count values": accuracies, per-class accuracies, CWKD's
class statistics and hard classes, the teacher's accuracy):

==================================================  ===========  =================  =========================
against the Zen 4 (family 25, model 17) set          losses       AEKT's r facts     count values, students
==================================================  ===========  =================  =========================
the Intel-with-AMX set                               1.0e-6       identical          identical; 5 of 6 differ
``ONEDNN_MAX_CPU_ISA=AVX2``                          1.3e-6       3.9e-5             identical; 6 of 6 differ
``ATEN_CPU_CAPABILITY=avx2``                         7.7e-6       7.4e-5             identical; 6 of 6 differ
``ATEN_CPU_CAPABILITY=default`` (no vector code)     1.2e-5       2.0e-4             identical; 6 of 6 differ
all three libraries held to AVX2                     2.7e-6       7.8e-7             identical; 6 of 6 differ
2 threads instead of 1                               8.5e-6       2.2e-4             identical; 6 of 6 differ
``ONEDNN_MAX_CPU_ISA=AVX512_CORE``, ``MKL_CBWR=      0            0                  bit-identical
AVX512``, ``MKL_ENABLE_INSTRUCTIONS=AVX2``
==================================================  ===========  =================  =========================

Bounds: the losses within ``LOSS_RTOL`` = 1e-4 (8x the widest spread measured, 100x the Intel-AMD one),
other real-valued method facts within ``FACT_RTOL`` = 1e-3 (4.5x), the learning rate exact. A count value
may be off by one image (one flipped prediction): none moved in any run above, but a near tie of two
logits can flip on a CPU not measured, and the losses carry the comparison. What the bounds still see
(``tests/test_golden_engine.py``): KD without its T^2 moves the training loss by 3 % and the test loss by
2e-4 to 4e-4; a KD weight 1 % too high moves the training loss by 3.2e-4. Both fail on every machine.
"""
from __future__ import annotations

import hashlib
import json
import math
import re
import shutil
import sys
import tempfile
from pathlib import Path

import torch

GOLDEN_DIR = Path(__file__).resolve().parent / "data" / "golden_engine"
METHODS = ("vanilla", "kd", "dkd", "cwkd", "dlkd", "aekt")
THREADS = 1  # the test machines share 2 cores between processes: one thread is the fast, stable choice
#: which views of the run are compared
KEYS = ("epoch", "lr", "train_loss", "train_acc", "test_acc", "test_acc5", "test_loss", "per_class_acc", "method")
TRAIN_IMAGES, TEST_IMAGES = 200, 100  # 100 classes x 2 / x 1
LOSS_RTOL = 1e-4
FACT_RTOL = 1e-3


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


# -- machine kinds --------------------------------------------------------------------------------------
def machine_kind() -> dict:
    """What decides, besides the code, whether this machine's CPU run can be bit-identical to a record."""
    from kdlib.engine.device import machine_info

    info = machine_info()
    return {"torch": torch.__version__.split("+")[0], "threads": THREADS,
            "cpu_vendor": info["cpu_vendor"], "cpu_family": info["cpu_family"], "cpu_model": info["cpu_model"],
            "cpu": info["cpu"], "amx": any(flag.startswith("amx") for flag in info["cpu_flags"]),
            "cpu_flags": info["cpu_flags"], "cpu_capability": info["cpu_capability"],
            "onednn_isa": info["onednn_isa"], "kernel_env": info["kernel_env"]}


def kind_name(kind: dict) -> str:
    """A folder name for a set: vendor-family-model and a digest of the whole kind (e.g. forced kernels)."""
    digest = hashlib.sha256(json.dumps(kind, sort_keys=True).encode()).hexdigest()[:8]
    name = "-".join(str(kind.get(k)) for k in ("cpu_vendor", "cpu_family", "cpu_model"))
    return re.sub(r"[^A-Za-z0-9_.-]", "_", f"{name}-{digest}")


def matches(recorded_with: dict, kind: dict) -> bool:
    """Whether a set recorded with ``recorded_with`` is exact on a machine of ``kind``: every value named."""
    return all(kind.get(key) == value for key, value in recorded_with.items())


def golden_sets(root: Path = GOLDEN_DIR) -> dict:
    """``{set name: {method: record}}`` for every recorded machine kind."""
    sets = {}
    for folder in sorted(p for p in Path(root).iterdir() if p.is_dir()):
        sets[folder.name] = {m: json.loads((folder / f"{m}.json").read_text()) for m in METHODS
                             if (folder / f"{m}.json").exists()}
    return sets


def exact_set(sets: dict, kind: dict):
    """The name of the set that is exact on a machine of ``kind`` (``None`` if none is).

    A set whose records say ``"exact": false`` predates a change of the code that moved the bits (see
    :func:`main`): it is compared within the tolerance only, also on its own kind.
    """
    exact = [name for name, records in sets.items() if records
             and next(iter(records.values())).get("exact", True)
             and matches(next(iter(records.values()))["recorded_with"], kind)]
    if len(exact) > 1:
        raise ValueError(f"more than one golden set matches this machine: {exact}")
    return exact[0] if exact else None


# -- comparisons ----------------------------------------------------------------------------------------
def bit_differences(fresh: dict, golden: dict) -> list:
    """Every value of ``fresh`` that is not bit-identical to ``golden`` (JSON floats: equal is exact)."""
    found = [key for key in ("history", "final_test_acc", "final_per_class_acc", "teacher_test_acc",
                             "student_sha256") if fresh[key] != golden[key]]
    return [f"{key}: {fresh[key]!r} != {golden[key]!r}" if key != "history" else "history differs"
            for key in found]


def _close(a, b, rtol: float) -> bool:
    return isinstance(a, (int, float)) and isinstance(b, (int, float)) and math.isclose(a, b, rel_tol=rtol)


def _one_image(path: str) -> float:
    """What one image is worth, in percent, in the accuracy at ``path``."""
    return 100.0 / (TRAIN_IMAGES if "train" in path else TEST_IMAGES)


def _compare(path: str, a, b, out: list) -> None:
    name = path.rsplit(".", 1)[-1]
    if isinstance(a, dict) and isinstance(b, dict):
        if set(a) != set(b):
            out.append(f"{path}: keys {sorted(a)} != {sorted(b)}")
        for key in sorted(set(a) & set(b)):
            _compare(f"{path}.{key}", a[key], b[key], out)
    elif isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            out.append(f"{path}: {len(a)} values != {len(b)}")
        elif name == "hard_classes":  # one flipped image may swap one class in or out
            if len(set(a) ^ set(b)) > 2:
                out.append(f"{path}: {a} != {b}")
        else:  # per-class values: one flipped image moves one class
            moved = []
            for i, (x, y) in enumerate(zip(a, b)):
                inner = []
                _compare(f"{path}[{i}]", x, y, inner)
                moved += inner
            if len(moved) > 1 or (moved and not all(isinstance(v, (int, float)) for v in a + b)):
                out += moved
    elif name == "lr" or isinstance(a, (bool, str)) or a is None or b is None:
        if a != b:
            out.append(f"{path}: {a!r} != {b!r}")
    elif name.endswith("loss"):
        if not _close(a, b, LOSS_RTOL):
            out.append(f"{path}: {a!r} vs {b!r}, relative difference beyond {LOSS_RTOL}")
    elif "acc" in name:
        if not (isinstance(a, (int, float)) and isinstance(b, (int, float))
                and abs(a - b) <= _one_image(path) + 1e-9):
            out.append(f"{path}: {a!r} vs {b!r}, more than one image apart")
    elif not _close(a, b, FACT_RTOL):
        out.append(f"{path}: {a!r} vs {b!r}, relative difference beyond {FACT_RTOL}")


def differences_beyond_tolerance(fresh: dict, golden: dict) -> list:
    """Every value of ``fresh`` farther from ``golden`` than the machine-to-machine spread allows.

    Compared: per epoch the learning rate (exact), the training and test losses, the accuracies and the
    method's facts, then the final and the teacher's accuracy. The student's digest is not (it differs in
    the last bit on another CPU).
    """
    out = []
    if len(fresh["history"]) != len(golden["history"]):
        return [f"history: {len(fresh['history'])} epochs != {len(golden['history'])}"]
    for epoch, (a, b) in enumerate(zip(fresh["history"], golden["history"]), start=1):
        _compare(f"epoch {epoch}", a, b, out)
    for key in ("final_test_acc", "final_per_class_acc", "teacher_test_acc"):
        _compare(key, fresh[key], golden[key], out)
    return out


def main(argv=None) -> int:
    """Record this machine kind's set (replacing it). If that moved its bits, the code changed the numbers,
    and every other kind's set is either kept as a tolerance reference (``"exact": false``: within the
    tolerance of the new records, but its last bits predate the change) or removed (beyond it: the change
    moved behaviour). Either way, record that kind again on a machine of it."""
    kind = machine_kind()
    sets = golden_sets() if GOLDEN_DIR.exists() else {}
    replaced = exact_set(sets, kind)
    with tempfile.TemporaryDirectory() as tmp:
        records = {method: {"recorded_with": kind, **run_golden(method, Path(tmp))} for method in METHODS}
    moved = replaced is not None and any(bit_differences(records[m], sets[replaced][m]) for m in sets[replaced])
    if replaced is not None:  # replaced as a whole (a partly named set gets the full name)
        shutil.rmtree(GOLDEN_DIR / replaced)
    folder = GOLDEN_DIR / kind_name(kind)
    folder.mkdir(parents=True)
    for method, record in records.items():
        _write(folder / f"{method}.json", record)
    for name, old in sets.items():
        if name == replaced:
            continue
        beyond = [line for m in old for line in differences_beyond_tolerance(records[m], old[m])]
        if not moved:
            if beyond:
                print(f"warning: {name} is beyond the tolerance of this machine's records: {beyond[:3]}")
        elif beyond:
            shutil.rmtree(GOLDEN_DIR / name)
            print(f"removed {name}: beyond the tolerance of the new records ({beyond[0]} ...); record it again "
                  f"on a machine of that kind")
        else:
            for method, record in old.items():
                _write(GOLDEN_DIR / name / f"{method}.json", {**record, "exact": False})
            print(f"kept {name} as a tolerance reference only (its last bits predate this change); record it "
                  f"again on a machine of that kind to make it exact there")
    return 0


def _write(path: Path, record: dict) -> None:
    path.write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
