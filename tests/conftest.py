"""Shared fixtures: tiny configs and one tiny teacher trained once per session; how tests run side by side.

* The whole session writes into temporary folders: ``KDLIB_HOME`` points into pytest's temporary
  directory, so no test touches ``~/.cache/kdlib``.
* PyTorch runs on ``KDLIB_TEST_THREADS`` threads (default 1): the test machines share 2 cores between
  several processes, and OpenMP threads competing for cores run 10x slower than a single thread.
* ``make test`` runs two pytest-xdist workers. The costly session fixtures (the tiny teacher, the executed
  chapters) live in a folder both workers share and are made once; tests that use a module-scoped
  fixture, or carry an ``xdist_group`` mark, stay on one worker, and so do the tests of the executed book
  and of the Slurm cluster (:data:`BOOK_GROUP`; CONTRIBUTING.md, "parallel-safe").
* ``KDLIB_TEST_TIMES=file.json`` writes each test's wall and CPU seconds, to see where the time goes.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

torch.set_num_threads(int(os.environ.get("KDLIB_TEST_THREADS", "1")))

#: a run of seconds: 100 classes x 4 training / 2 test images, resnet8 -> resnet8, 2 epochs
TINY = dict(dataset="synthetic", train_per_class=4, test_per_class=2, teacher="resnet8", student="resnet8",
            teacher_epochs=2, epochs=2, device="cpu")


@pytest.fixture(scope="session", autouse=True)
def kdlib_home(tmp_path_factory):
    """Every test runs with ``KDLIB_HOME`` in a temporary folder (teachers, caches); side by side, with
    ``KDLIB_RUN_WORKERS=1``."""
    home = tmp_path_factory.mktemp("kdlib_home")
    mp = pytest.MonkeyPatch()
    mp.setenv("KDLIB_HOME", str(home))
    if os.environ.get("PYTEST_XDIST_WORKER") and "KDLIB_RUN_WORKERS" not in os.environ:
        # each worker already has a core: `run_all` (and a chapter's kernel) trains its runs one by one,
        # as `make book` does in its side-by-side chapters. A pool of two more processes per call cost
        # a tiny chapter 37 s of CPU against 19 s (measured); test_run_pool.py tests the pool itself.
        mp.setenv("KDLIB_RUN_WORKERS", "1")
    yield home
    mp.undo()


def shared_folder(tmp_path_factory, name: str) -> Path:
    """A folder of this pytest session that every xdist worker shares (the session's own without xdist).

    What is made in it must be safe to make from two processes at once: kdlib's teachers and runs are
    (their files appear by atomic rename under a file lock).
    """
    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent  # the controller's folder, parent of every worker's own
    folder = base / name
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@pytest.fixture(scope="session")
def tiny_teachers_dir(tmp_path_factory):
    """A teachers folder holding the tiny resnet8 teacher of :data:`TINY`, trained once per session (the
    first worker to ask trains it, the other waits on the teacher's lock and loads it)."""
    from kdlib import teachers
    from kdlib.config import make_config
    from kdlib.data import load_dataset

    folder = shared_folder(tmp_path_factory, "teachers")
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


class ChapterFailed(Exception):
    """A chapter that failed to execute, as another worker of the session recorded it."""


class ExecutedChapters:
    """The book's chapters executed once per session by papermill, as ``make book`` executes them.

    ``executed(chapter)`` executes a chapter the first time it is asked for (``bookbuild.execute_chapter``,
    the function ``make book`` uses) into a staged copy of the book and returns the executed notebook; a
    chapter that failed raises its error again without running a second time. test_book.py executes every
    chapter through this; test_pages.py then builds the HTML book from the same executed notebooks.

    The staged book lives in a folder every xdist worker shares (:func:`shared_folder`): a chapter is
    executed by the first worker to ask, under a lock, and its outcome is written next to it, so the
    other worker waits for it and reads it instead of executing it again. Chapters run side by side as in
    ``make book`` (runs and teachers have their own locks).
    """

    def __init__(self, staging: Path, home: Path, parameters: dict, data_root: Path | None = None):
        from kdlib import bookbuild
        from kdlib.io import file_lock

        self.root = Path(__file__).resolve().parent.parent
        self.staging, self.home, self.parameters, self.data_root = staging, home, dict(parameters), data_root
        self.results: dict = {}
        self.seconds: dict = {}
        self.outcomes = self.staging.parent / f"{self.staging.name}.outcomes"
        self.staging.mkdir(parents=True, exist_ok=True)
        with file_lock(self.outcomes / "stage.lock"):
            if not (self.outcomes / "staged").exists():
                bookbuild.stage(self.root, self.staging)
                (self.outcomes / "staged").touch()

    def _environment(self) -> "pytest.MonkeyPatch":
        """The chapters' environment, set (``undo()`` it): this session's home, one thread, no display."""
        env = {"KDLIB_HOME": str(self.home), "MPLBACKEND": "Agg",
               # the kernel is a process of its own: one thread, as the test process (see above)
               "OMP_NUM_THREADS": os.environ.get("KDLIB_TEST_THREADS", "1"),
               "MPLCONFIGDIR": str(self.home / "matplotlib")}
        if self.data_root is not None:
            env["KDLIB_DATA"] = str(self.data_root)
        mp = pytest.MonkeyPatch()
        for name, value in env.items():
            mp.setenv(name, value)
        return mp

    def on_slurm(self) -> None:
        """Execute the whole book as ``kdlib book --executor slurm`` does: every chapter's runs trained by
        Slurm jobs (one CPU each, eight runs per task), then the chapters, which train nothing.
        ``self.slurm`` keeps what happened for test_book_slurm.py; the chapters' results serve the rest."""
        import argparse

        from kdlib import bookbuild

        parser = argparse.ArgumentParser()
        bookbuild.add_arguments(parser)
        argv = ["--root", str(self.root), "--no-html", "--executor", "slurm", "--slurm-gpus", "0", "--slurm-cpus", "1",
                "--slurm-time", "10", "--slurm-runs-per-task", "8", "--staging", str(self.staging)]
        for name, value in self.parameters.items():
            argv += ["--profile", value] if name == "profile" else ["-p", name, json.dumps(value)]
        from kdlib.engine.rundir import RunLock

        done = self.staging.parent / "slurm.json"  # test processes side by side (xdist) share one build
        with RunLock(self.staging.parent, wait=True):
            if not done.is_file():
                mp = self._environment()
                start = time.perf_counter()
                try:
                    status = bookbuild.run(parser.parse_args(argv))
                finally:
                    mp.undo()
                done.write_text(json.dumps({"status": status, "seconds": time.perf_counter() - start}))
        self.slurm = json.loads(done.read_text())
        status = self.slurm["status"]
        for name in bookbuild.toc_files(self.root):
            if bookbuild.is_notebook(bookbuild.source_of(self.root, name)):
                dst = self.staging / f"{name}.ipynb"
                error = bookbuild.chapter_error(dst)
                self.results[Path(name).name] = RuntimeError(f"{name}: {error}") if status or error else dst
                self.seconds[Path(name).name] = float("nan")

    def executed(self, chapter: str) -> Path:
        from kdlib import bookbuild
        from kdlib.io import atomic_write_json, file_lock

        if chapter not in self.results:
            src = bookbuild.source_of(self.root, f"book/{chapter}")
            dst = self.staging / "book" / f"{chapter}.ipynb"
            outcome = self.outcomes / f"{chapter}.json"
            with file_lock(self.outcomes / f"{chapter}.lock"):
                if outcome.exists():  # executed by the other worker
                    record = json.loads(outcome.read_text())
                    self.seconds[chapter] = record["seconds"]
                    self.results[chapter] = dst if record["error"] is None else ChapterFailed(record["error"])
                else:
                    started = time.perf_counter()
                    result = self.results[chapter] = self._execute(src, dst)
                    self.seconds[chapter] = time.perf_counter() - started
                    atomic_write_json(outcome, {"seconds": self.seconds[chapter], "error": None if result is dst
                                                else f"{type(result).__name__}: {result}"})
        result = self.results[chapter]
        if isinstance(result, Exception):
            raise result
        return result

    def _execute(self, src: Path, dst: Path):
        from kdlib import bookbuild

        mp = self._environment()
        try:
            bookbuild.execute_chapter(src, dst, dict(self.parameters), cwd=dst.parent)
            return dst
        except Exception as exc:  # kept, so a second caller sees the same failure without re-running
            return exc
        finally:
            mp.undo()

    def book(self) -> list:
        """Every chapter of _toc.yml in the staged book, executed; returns the failures (``chapter: error``).

        A chapter that fails to execute (its own test in test_book.py reports it) is staged without
        outputs, so the HTML and the PDF can still be built and checked page by page.
        """
        import nbformat

        from kdlib import bookbuild
        from kdlib.io import file_lock

        failed = []
        for name in bookbuild.toc_files(self.root):
            src = bookbuild.source_of(self.root, name)
            if not bookbuild.is_notebook(src):
                continue
            try:
                self.executed(Path(name).name)
            except Exception as exc:
                failed.append(f"{name}: {exc}")
                with file_lock(self.outcomes / f"{Path(name).name}.lock"):  # another worker may read it
                    nbformat.write(bookbuild.read_notebook(src), self.staging / f"{name}.ipynb")
        if failed:
            print("staged without outputs (the chapter failed to execute):", *failed, sep="\n  ")
        return failed


#: a few seconds per chapter: the parameters every chapter's `parameters` cell must accept
TINY_CHAPTER = {"profile": "smoke", "epochs": 1, "teacher_epochs": 1, "train_per_class": 4, "test_per_class": 2,
                "seeds": [0], "tiny": True}


def slurm_cluster_reason() -> str:
    """Why there is no Slurm cluster to test on ("" when ``sinfo`` answers). Where Slurm is installed and
    this is root, the one-node cluster of tests/slurm/cluster.sh is started (``.ci/run`` starts it first)."""
    import shutil

    def answers() -> bool:
        try:
            return shutil.which("sinfo") is not None and subprocess.run(
                ["sinfo", "-h"], capture_output=True, timeout=30).returncode == 0
        except (OSError, subprocess.TimeoutExpired):
            return False

    if answers():
        return ""
    if shutil.which("slurmctld") and os.geteuid() == 0:
        # under a lock: test processes side by side (xdist) all ask
        subprocess.run(["flock", "/var/tmp/kdlib-slurm-start.lock", str(KdlibCommand.repo / "tests/slurm/cluster.sh"),
                        "start"], capture_output=True, timeout=300)
        if answers():
            return ""
    return "no Slurm cluster answers `sinfo` (start one with: sudo tests/slurm/cluster.sh start)"


@pytest.fixture(scope="session")
def tiny_chapters(tmp_path_factory, request):
    """Every chapter executed in the smoke profile at tiny size, once per session (see ExecutedChapters).

    When the session includes test_book_slurm.py and a Slurm cluster answers, the whole book is executed
    the cluster way (:meth:`ExecutedChapters.on_slurm`) and every chapter test checks those pages: the
    runs move from the chapters' kernels to Slurm jobs (same numbers: one thread either way)."""
    on_slurm = any(item.path.name == "test_book_slurm.py" for item in request.session.items) \
        and not slurm_cluster_reason()
    base = shared_folder(tmp_path_factory, "tiny_book_slurm" if on_slurm else "tiny_book")
    chapters = ExecutedChapters(base / "staging", base / "home", TINY_CHAPTER)
    chapters.slurm = None
    if on_slurm:
        chapters.on_slurm()
    return chapters


# -- side by side (pytest-xdist, `make test` runs two workers) ------------------------------------------
def pytest_itemcollected(item):
    """Keep on one worker what must be (marks added here, before xdist reads them in modifyitems).

    * A test with an ``xdist_group`` mark runs on the worker of its group, after the group's other tests:
      mark tests that use one machine-wide resource (the Slurm cluster, a fixed port or path) alike.
    * A test that uses a module-scoped fixture is put in the group of its module, so that the fixture
      is built once (tests of a module without one spread over both workers).
    """
    if item.get_closest_marker("xdist_group"):
        return
    info = getattr(item, "_fixtureinfo", None)
    definitions = info.name2fixturedefs if info is not None else {}
    if any(d.scope == "module" for name in item.fixturenames for d in definitions.get(name, ())):
        item.add_marker(pytest.mark.xdist_group(item.module.__name__))


#: the tests of the executed tiny book and of the Slurm cluster: one group, on one worker. Where a cluster
#: answers, the book is built by Slurm jobs on the cluster's CPUs for minutes; split over both workers, the
#: second would wait for it idle, while in one group the other worker goes on with the rest of the suite
BOOK_GROUP = "tiny_book"


def pytest_collection_modifyitems(config, items):
    """Under xdist, ``slow`` tests come first (the order is otherwise kept), so that no long test starts
    last while the other worker idles; the worker then tells the scheduler the groups (see below): those
    of ``xdist_group`` marks, and :data:`BOOK_GROUP` for every test of the executed book or the cluster."""
    groups_file = getattr(config, "workerinput", {}).get("kdlib_groups")
    if groups_file is None:
        return
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)
    from kdlib.io import atomic_write_json

    groups = {}
    for item in items:
        names = sorted({str(m.args[0] if m.args else m.kwargs.get("name", "default"))
                        for m in item.iter_markers("xdist_group")})
        if "tiny_chapters" in item.fixturenames or "slurm" in names:
            groups[item.nodeid] = BOOK_GROUP
        elif names:
            groups[item.nodeid] = "_".join(names)
    atomic_write_json(groups_file, groups)  # before the worker reports its collection: no race


# pytest-xdist's own ``loadgroup`` appends the group to each test's node id, which pytest 9 no longer lets
# a plugin change: the marks would be ignored and every test scheduled alone. So the workers write the
# groups to a file the controller names, and this scheduler (xdist's scope scheduler, with the groups as
# scopes) reads it once every worker has collected.
@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node):
    # the controller's temporary folder (pytest has no public accessor for it on the config)
    node.workerinput["kdlib_groups"] = str(node.config._tmp_path_factory.getbasetemp() / "xdist_groups.json")


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    if config.getvalue("dist") != "loadgroup":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class GroupScheduling(LoadScopeScheduling):
        groups = None

        def _split_scope(self, nodeid):
            if self.groups is None:
                path = config._tmp_path_factory.getbasetemp() / "xdist_groups.json"
                self.groups = json.loads(path.read_text())
            return self.groups.get(nodeid, nodeid)

    return GroupScheduling(config, log)


def pytest_terminal_summary(terminalreporter):
    """Say which comparison the golden records got (``record_property("golden", ...)`` in the tests)."""
    lines = [value for report in terminalreporter.stats.get("passed", [])
             for name, value in getattr(report, "user_properties", []) if name == "golden"]
    if lines:
        terminalreporter.write_sep("-", "golden records")
        for line in sorted(lines):
            terminalreporter.write_line(f"golden records: {line}")


# -- where the suite's time goes: KDLIB_TEST_TIMES=file.json writes each test's wall and CPU seconds ----------
_times: dict = {}


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    """CPU seconds (this process and its finished children) next to wall seconds: on a loaded machine
    the wall time says little, the CPU time what the test costs (setup and teardown included)."""
    if not os.environ.get("KDLIB_TEST_TIMES"):
        yield
        return
    import resource

    def cpu():
        return sum(r.ru_utime + r.ru_stime for r in (resource.getrusage(resource.RUSAGE_SELF),
                                                      resource.getrusage(resource.RUSAGE_CHILDREN)))

    wall, used = time.perf_counter(), cpu()
    yield
    _times[item.nodeid] = {"wall": round(time.perf_counter() - wall, 3), "cpu": round(cpu() - used, 3),
                           "worker": os.environ.get("PYTEST_XDIST_WORKER", "main")}


def pytest_sessionfinish(session):
    target = os.environ.get("KDLIB_TEST_TIMES")
    if target and _times:
        worker = os.environ.get("PYTEST_XDIST_WORKER")
        path = Path(target).with_suffix(f".{worker}.json") if worker else Path(target)
        path.write_text(json.dumps(_times, indent=1))
