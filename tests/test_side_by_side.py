"""How `make test` runs the suite on two pytest-xdist workers (tests/conftest.py): what must share a worker does.

A small suite is written next to a copy of the real conftest and run as `make test` runs it: the tests
of a module with a module-scoped fixture, and those of one ``xdist_group``, must each land on one worker,
a ``shared_folder`` is made once for both workers, and the tests of the executed book (those that use
``tiny_chapters``) share one worker with the Slurm tests (``BOOK_GROUP``).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent

MODULE_FIXTURE = '''
import os, pytest

@pytest.fixture(scope="module")
def costly():
    return os.getpid()

@pytest.mark.parametrize("i", range(6))
def test_uses_it(costly, i, record_property):
    record_property("worker", os.environ["PYTEST_XDIST_WORKER"])
    record_property("fixture_pid", costly)
'''

GROUP = '''
import os, pytest

@pytest.mark.xdist_group("the_cluster")
@pytest.mark.parametrize("i", range(6))
def test_in_the_group(i, record_property):
    record_property("worker", os.environ["PYTEST_XDIST_WORKER"])

@pytest.mark.parametrize("i", range(6))
def test_free(i, record_property):
    record_property("worker", os.environ["PYTEST_XDIST_WORKER"])
'''

BOOK = '''
import os, pytest

@pytest.fixture
def tiny_chapters():  # stands in for conftest's executed book: its name is what groups a test
    return None

@pytest.mark.parametrize("i", range(4))
def test_reads_the_book(tiny_chapters, i, record_property):
    record_property("worker", os.environ["PYTEST_XDIST_WORKER"])

@pytest.mark.xdist_group("slurm")
@pytest.mark.parametrize("i", range(4))
def test_on_the_cluster(i, record_property):
    record_property("worker", os.environ["PYTEST_XDIST_WORKER"])
'''

SHARED = '''
import os
from conftest import shared_folder

def test_shared_folder_is_the_same_on_both_workers(tmp_path_factory, record_property):
    record_property("shared", str(shared_folder(tmp_path_factory, "made_once")))
'''


@pytest.mark.slow
def test_groups_stay_on_one_worker_and_shared_folders_are_shared(tmp_path):
    suite = tmp_path / "suite"
    suite.mkdir()
    shutil.copy(TESTS / "conftest.py", suite / "conftest.py")
    (suite / "test_module_fixture.py").write_text(MODULE_FIXTURE)
    (suite / "test_group.py").write_text(GROUP)
    (suite / "test_book_and_cluster.py").write_text(BOOK)
    (suite / "test_shared_a.py").write_text(SHARED)
    (suite / "test_shared_b.py").write_text(SHARED)
    report = tmp_path / "report.json"
    env = {**os.environ, "PYTHONPATH": str(TESTS.parent)}
    env.pop("PYTEST_XDIST_WORKER", None)
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-n", "2", "--dist", "loadgroup",
         "--no-loadscope-reorder", "--junitxml", str(report.with_suffix(".xml")), "--basetemp",
         str(tmp_path / "tmp"), str(suite)], cwd=suite, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    properties = _properties(report.with_suffix(".xml"))
    by_test = {name: props for name, props in properties.items()}
    module = [p for n, p in by_test.items() if "test_uses_it" in n]
    group = [p for n, p in by_test.items() if "test_in_the_group" in n]
    assert len(module) == 6 and len({p["worker"] for p in module}) == 1, module
    assert len({p["fixture_pid"] for p in module}) == 1  # built once
    assert len(group) == 6 and len({p["worker"] for p in group}) == 1, group
    book = [p for n, p in by_test.items() if "test_reads_the_book" in n or "test_on_the_cluster" in n]
    assert len(book) == 8 and len({p["worker"] for p in book}) == 1, book
    shared = {p["shared"] for n, p in by_test.items() if "shared_folder" in n}
    assert len(shared) == 1, shared


def _properties(junit: Path) -> dict:
    """``{test name: {property: value}}`` from a JUnit XML report."""
    import xml.etree.ElementTree as ET

    found = {}
    for case in ET.parse(junit).getroot().iter("testcase"):
        props = {p.get("name"): p.get("value") for p in case.iter("property")}
        found[f"{case.get('classname')}.{case.get('name')}"] = props
    return found
