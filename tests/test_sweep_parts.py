"""Parts of the sweep that need no cluster: the Slurm option checks against a fake ``sinfo``, the resume
command, the thread count shared by every executor."""
from __future__ import annotations

import argparse
import os
import shlex

import pytest

from kdlib import sweep
from kdlib.errors import KDLibError
from kdlib.runs.slurm import check_options as check_slurm_options


@pytest.fixture
def fake_cluster(tmp_path, monkeypatch):
    """sbatch and sinfo in one folder; ``sinfo -o %P|%c|%G|%l`` prints the given lines."""
    def make(lines):
        bin_dir = tmp_path / "bin"
        bin_dir.mkdir(exist_ok=True)
        (bin_dir / "sbatch").write_text("#!/bin/sh\nexit 1\n")
        (bin_dir / "sinfo").write_text("#!/bin/sh\ncat <<'END'\n" + "\n".join(lines) + "\nEND\n")
        for tool in ("sbatch", "sinfo"):
            (bin_dir / tool).chmod(0o755)
        monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return make


def spec(**slurm):
    return sweep.SlurmOptions(**slurm)


def test_slurm_options_checked_against_sinfo(fake_cluster):
    fake_cluster(["cpu*|64|(null)|1-00:00:00", "gpu|32|gpu:a100:4(S:0-1)|2-00:00:00", "gpu|32|gpu:2|2-00:00:00"])
    check_slurm_options(spec(partition="gpu", gpus=4, cpus=32, time_min=48 * 60))  # fits the largest node
    check_slurm_options(spec(gpus=0, cpus=64, time_min=24 * 60))  # the default partition, cpu
    refusals = [
        (dict(gpus=1), "--slurm-gpus 1: partition cpu has no GPUs (no gres/gpu on its nodes); use --slurm-gpus 0 "
                       "or a partition with GPUs (gpu)"),
        (dict(partition="gpu", gpus=8), "--slurm-gpus 8: the nodes of partition gpu have at most 4 GPUs"),
        (dict(partition="fast", gpus=0), "--slurm-partition fast: no such partition on this cluster; choose one "
                                         "of cpu, gpu"),
        (dict(partition="gpu", cpus=33), "--slurm-cpus 33: the nodes of partition gpu have at most 32 CPUs"),
        (dict(gpus=0, time_min=24 * 60 + 1), "--slurm-time 1441 (minutes): partition cpu allows at most 1440"),
    ]
    for options, message in refusals:
        with pytest.raises(KDLibError) as caught:
            check_slurm_options(spec(**options))
        assert str(caught.value).startswith(message) and "\n" not in str(caught.value)


def test_no_default_partition_and_no_sinfo(fake_cluster, tmp_path, monkeypatch):
    fake_cluster(["a|4|(null)|infinite", "b|4|(null)|infinite"])
    with pytest.raises(KDLibError, match="no default partition: choose one with --slurm-partition"):
        check_slurm_options(spec(gpus=0))
    check_slurm_options(spec(partition="b", gpus=0, time_min=10 ** 6))  # infinite: any time
    (tmp_path / "bin" / "sinfo").unlink()  # a lone sbatch: nobody to ask, nothing refused
    check_slurm_options(spec(partition="nope", gpus=3))


def test_resume_command_describes_the_same_grid():
    grid = sweep.GridSpec(methods=["kd", "dkd"], pairs=[("resnet56", "resnet20")], seeds=[0, 2], profile="course",
                          dataset="synthetic", epochs=3, overrides=["lr=0.1", "dkd.beta=2"], out="/data/my sweep",
                          teacher_checkpoints={"resnet56": "/ckpt/r56.pth"}, executor="slurm", threads=3,
                          slurm=sweep.SlurmOptions(partition="gpu", gpus=2, time_min=90)).normalised()
    parser = argparse.ArgumentParser()
    sweep.add_arguments(parser)
    words = shlex.split(grid.command())
    assert words[:4] == ["python", "-m", "kdlib", "sweep"]
    assert sweep.spec_from_args(parser.parse_args(words[4:])) == grid


def test_thread_count_depends_on_the_grid_not_the_executor():
    cores = os.cpu_count() or 1
    counts = {e: sweep.GridSpec(methods=["kd"], executor=e, slurm=sweep.SlurmOptions(cpus=2)).normalised().run_threads()
              for e in sweep.EXECUTORS}
    assert set(counts.values()) == {max(1, min(2, cores))}
    assert sweep.GridSpec(methods=["kd"], workers=cores * 2).normalised().run_threads() == 1
    assert sweep.GridSpec(methods=["kd"], threads=7, executor="local").normalised().run_threads() == 7
