"""The whole book on a Slurm cluster, as ``python -m kdlib book --executor slurm`` runs it: every chapter's
runs are collected, trained by Slurm jobs (the teachers' first), then the chapters execute and train nothing.

Uses the one-node cluster of ``tests/slurm/cluster.sh`` (``.ci/run`` starts it) at the tiny size of the
book tests; the executed chapters are the session's (``conftest.tiny_chapters``), which test_book.py and
test_pages.py check and build into the HTML book. Without a cluster the test is skipped, with the reason.
"""
from __future__ import annotations

import json

import pytest

from conftest import slurm_cluster_reason

REASON = slurm_cluster_reason()
pytestmark = [pytest.mark.slow, pytest.mark.skipif(bool(REASON), reason=REASON),
              pytest.mark.xdist_group("slurm")]  # one cluster: its tests run one after another


def test_every_run_of_the_book_is_trained_by_slurm_and_the_chapters_train_nothing(tiny_chapters):
    assert tiny_chapters.slurm is not None and tiny_chapters.slurm["status"] == 0
    home = tiny_chapters.home
    records = sorted([*home.glob("runs/*/*/metrics.json"), *home.glob("teachers/*/metrics.json")])
    teachers = [r for r in records if r.parent.parent.name == "teachers"]
    assert len(records) > 10 and teachers  # the book's runs, and the teacher they share
    for path in records:  # trained in Slurm jobs only: a chapter's kernel has no SLURM_JOB_ID
        record = json.loads(path.read_text())
        assert record["final"] and all(segment["slurm_job"] for segment in record["segments"]), path
    plan = json.loads((home / "book-smoke.json").read_text())  # the collected plan, resolved recipes included
    assert {entry["role"] for entry in plan["runs"].values()} == {"teacher", "run"}
    assert all(entry["config"]["lr"] is not None for entry in plan["runs"].values())
    for chapter, result in tiny_chapters.results.items():  # every chapter executed, without an error
        assert not isinstance(result, Exception), result
    print(f"\n[one-node Slurm, 2 shared cores] the book, {len(records)} runs: {tiny_chapters.slurm['seconds']:.0f} s")
