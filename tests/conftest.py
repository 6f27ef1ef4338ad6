"""Shared fixtures: tiny configs and one tiny teacher trained once per session.

* The whole session writes into temporary folders: ``KDLIB_HOME`` points into pytest's temporary
  directory, so no test touches ``~/.cache/kdlib``.
* PyTorch runs on ``KDLIB_TEST_THREADS`` threads (default 1): the test machines share 2 cores between
  several processes, and OpenMP threads competing for cores run 10x slower than a single thread.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

torch.set_num_threads(int(os.environ.get("KDLIB_TEST_THREADS", "1")))

#: a run of seconds: 100 classes x 4 training / 2 test images, resnet8 -> resnet8, 2 epochs
TINY = dict(dataset="synthetic", train_per_class=4, test_per_class=2, teacher="resnet8", student="resnet8",
            teacher_epochs=2, epochs=2, device="cpu")


@pytest.fixture(scope="session", autouse=True)
def kdlib_home(tmp_path_factory):
    """Every test runs with ``KDLIB_HOME`` in a temporary folder (teachers, caches)."""
    home = tmp_path_factory.mktemp("kdlib_home")
    mp = pytest.MonkeyPatch()
    mp.setenv("KDLIB_HOME", str(home))
    yield home
    mp.undo()


@pytest.fixture(scope="session")
def tiny_teachers_dir(tmp_path_factory):
    """A teachers folder holding the tiny resnet8 teacher of :data:`TINY` (trained once per session)."""
    from kdlib import teachers
    from kdlib.config import make_config
    from kdlib.data import load_dataset

    folder = tmp_path_factory.mktemp("teachers")
    cfg = make_config("smoke", method="kd", teachers_dir=str(folder), **TINY)
    dataset = load_dataset("synthetic", train_per_class=TINY["train_per_class"],
                           test_per_class=TINY["test_per_class"], seed=0)
    teachers.get_teacher(cfg, dataset, "cpu", verbose=False)
    return folder


@pytest.fixture
def tiny_config(tiny_teachers_dir, tmp_path):
    """``tiny_config(**overrides)``: a validated smoke-profile RunConfig of :data:`TINY` size."""
    from kdlib.config import make_config

    def make(**overrides):
        values = {**TINY, "method": "kd", "teachers_dir": str(tiny_teachers_dir), "out": str(tmp_path / "run"),
                  **overrides}
        return make_config(values.pop("profile", "smoke"), **values)

    return make


class KdlibCommand:
    """``python -m kdlib ARGS`` in a subprocess, as a user runs it: its own ``KDLIB_HOME``, one thread."""

    repo = Path(__file__).resolve().parent.parent

    def __init__(self, home: Path):
        self.env = {**os.environ, "KDLIB_HOME": str(home), "OMP_NUM_THREADS": "1", "PYTHONPATH": str(self.repo)}

    def __call__(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "kdlib", *args], cwd=self.repo, env=self.env,
                              capture_output=True, text=True, timeout=timeout)

    def start(self, *args: str) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "kdlib", *args], cwd=self.repo, env=self.env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.fixture
def cli(tmp_path):
    """Run the command line: ``cli("train", ...)`` waits and returns the result, ``cli.start(...)`` a Popen."""
    return KdlibCommand(tmp_path / "home")
