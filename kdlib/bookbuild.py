"""``python -m kdlib book``: execute the chapters with papermill, then build the HTML book (or the PDF).

The chapters are MyST markdown notebooks in ``book/`` (stored without outputs). For each chapter listed
in ``_toc.yml`` this module converts it with jupytext, executes it with papermill (the profile and any
``-p name value`` go into the chapter's ``parameters`` cell) into ``_build/executed/``, then runs
``jupyter-book build`` on those executed copies with execution switched off, so nothing runs twice.
A cell error stops the build with the chapter's name. Runs and teachers are shared by all chapters
through ``KDLIB_HOME`` (the engine resumes or skips what is already finished).

Papermill writes the parameters it was given into a cell of its own ("injected-parameters"); that cell
is tagged ``remove-cell`` so readers do not see it twice: the values are in each chapter's label line.
``--pdf`` builds ``_build/latex/book.pdf`` with Jupyter Book's LaTeX builder from the executed copies,
re-executing only the chapters whose executed copy is missing, older than its source or was run with
other parameters.

Chapters run side by side. The first chapter (the benchmark, which trains the shared teacher) and the
last (the comparison, which reads every other chapter's runs) execute alone, with every core; the ones
in between execute ``--jobs`` at a time (default: one per core), each in its own process with one torch
thread and its runs trained one by one (``KDLIB_RUN_WORKERS=1``), so one chapter's analyses overlap
another's training. Runs two chapters share are trained once (each run has a lock, see
:mod:`kdlib.experiments`). The longest chapters start first: by the time the last build took, else by
the ``kdlib: build_seconds:`` estimate in the chapter's front matter. ``--jobs 1`` executes the chapters
one after the other.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import yaml

from kdlib.errors import KDLibError

STAGING = Path("_build") / "executed"
SOLUTION_TAGS = {"solution", "remove-in-student"}
# a MyST block `:::{dropdown} Solution ... :::` (or admonition) holds an exercise's answer
SOLUTION_BLOCK = re.compile(r"^:::+\{(?:dropdown|admonition)\} *Solution.*?^:::+ *$", re.M | re.S)
# a code exercise's answer (nbgrader's markers): student copies get nbgrader's stub instead
SOLUTION_REGION = re.compile(r"^([ \t]*)### BEGIN SOLUTION\n.*?^[ \t]*### END SOLUTION[ \t]*$", re.M | re.S)
STUB = "# YOUR CODE HERE\nraise NotImplementedError()"


def stub_solutions(source: str) -> str:
    """Each ``### BEGIN SOLUTION`` ... ``### END SOLUTION`` region replaced with the stub, indented as it was."""
    return SOLUTION_REGION.sub(lambda m: "\n".join(m.group(1) + line for line in STUB.splitlines()), source)


def toc_files(root: Path) -> List[str]:
    """Document names (``book/kd``) in the order of ``_toc.yml``."""
    toc = yaml.safe_load((root / "_toc.yml").read_text())
    names: List[str] = [toc["root"]]

    def walk(entries):
        for entry in entries or []:
            if "file" in entry:
                names.append(entry["file"])
            walk(entry.get("sections"))
            walk(entry.get("chapters"))

    walk(toc.get("chapters"))
    for part in toc.get("parts", []):
        walk(part.get("chapters"))
    return names


def source_of(root: Path, name: str) -> Path:
    for suffix in (".md", ".ipynb"):
        if (root / f"{name}{suffix}").exists():
            return root / f"{name}{suffix}"
    raise KDLibError(f"_toc.yml lists {name!r} but neither {name}.md nor {name}.ipynb exists")


def is_notebook(path: Path) -> bool:
    if path.suffix == ".ipynb":
        return True
    head = path.read_text().split("\n---", 1)[0]
    return path.read_text().startswith("---") and "kernelspec" in head


def read_notebook(path: Path):
    import jupytext

    return jupytext.read(path)


INJECTED_TAG = "injected-parameters"  # papermill's tag on the cell it adds


def hide_injected_parameters(path: Path) -> int:
    """Tag papermill's injected-parameters cell(s) of an executed notebook ``remove-cell``; returns how many."""
    import nbformat

    nb = nbformat.read(path, as_version=4)
    hidden = 0
    for cell in nb.cells:
        tags = cell.get("metadata", {}).get("tags", [])
        if INJECTED_TAG in tags:
            if "remove-cell" not in tags:
                cell.metadata["tags"] = [*tags, "remove-cell"]
            hidden += 1
    nbformat.write(nb, path)
    return hidden


def executed_parameters(path: Path) -> Optional[Dict]:
    """The parameters papermill executed ``path`` with (None if it is not a papermill output)."""
    import nbformat

    try:
        return dict(nbformat.read(path, as_version=4).metadata["papermill"]["parameters"])
    except (OSError, KeyError, ValueError, TypeError):
        return None


def execute_chapter(src: Path, dst: Path, parameters: Dict, cwd: Path, collect: Optional[Path] = None) -> float:
    """Execute one chapter into ``dst`` (ipynb); returns the seconds it took.

    ``collect``: the book's executor path (:func:`run_book_on_executor`): the chapter's kernel records the
    runs it lacks in that file instead of training them, and a cell that fails does not stop the chapter
    (unless the kernel waits for those runs to be trained, ``KDLIB_COLLECT_WAIT``).
    """
    import nbformat
    import papermill

    from kdlib.runs import COLLECT_ENV, WAIT_ENV

    dst.parent.mkdir(parents=True, exist_ok=True)
    unexecuted = dst.with_suffix(".input.ipynb")
    nbformat.write(read_notebook(src), unexecuted)
    start = time.perf_counter()
    before = os.environ.pop(COLLECT_ENV, None)
    if collect is not None:  # the kernel inherits this process's environment
        os.environ[COLLECT_ENV] = str(collect)
    try:
        papermill.execute_notebook(
            str(unexecuted), str(dst), parameters=parameters, kernel_name="python3",
            progress_bar=False, cwd=str(cwd), allow_errors=collect is not None and not os.environ.get(WAIT_ENV),
        )
    except papermill.PapermillExecutionError as exc:
        if collect is not None and not os.environ.get(WAIT_ENV):
            return time.perf_counter() - start
        raise KDLibError(f"chapter {src.name} failed in cell {exc.exec_count}: {exc.ename}: {exc.evalue}")
    finally:
        os.environ.pop(COLLECT_ENV, None)
        if before is not None:
            os.environ[COLLECT_ENV] = before
        unexecuted.unlink(missing_ok=True)
    errors = [o for c in nbformat.read(dst, as_version=4).cells for o in c.get("outputs", [])
              if o.get("output_type") == "error"]
    if errors:
        raise KDLibError(f"chapter {src.name} has error output: {errors[0].get('ename')}")
    hide_injected_parameters(dst)
    label_parameters(dst, parameters, src.stem)
    return time.perf_counter() - start


PARAMETERS_TAG = "kdlib-parameters"  # the note that says which parameters a page was executed with


def label_parameters(path: Path, parameters: Dict, chapter: str) -> bool:
    """Put a note under the title of an executed chapter that ran with parameters other than the
    profile's defaults, so the page says so (and how to rebuild or keep it); True when it did."""
    import nbformat

    others = {k: v for k, v in parameters.items() if k != "profile"}
    nb = nbformat.read(path, as_version=4)
    nb.cells = [c for c in nb.cells if PARAMETERS_TAG not in c.get("metadata", {}).get("tags", [])]
    if others:
        shown = ", ".join(f"`{k} = {v!r}`" for k, v in others.items())
        option = " ".join(f"-p {k} '{yaml.safe_dump(v, default_flow_style=True).strip().removesuffix('...').strip()}'"
                          for k, v in others.items())
        note = nbformat.v4.new_markdown_cell(
            f":::{{note}} Executed with other parameters\n"
            f"This page was executed with {shown} (profile `{parameters.get('profile', 'smoke')}`), not the "
            f"book's defaults: `make chapter CHAPTER={chapter} PARAMS=\"{option}\"`. `make book` executes it again "
            f"with the defaults unless told to keep it: `make book KEEP={chapter}`.\n:::",
            metadata={"tags": [PARAMETERS_TAG]})
        at = next((i + 1 for i, c in enumerate(nb.cells) if c.cell_type == "markdown"
                   and c.source.lstrip().startswith("# ")), 0)
        nb.cells.insert(at, note)
    nbformat.write(nb, path)
    return bool(others)


def stage_unexecuted(root: Path, staging: Path, names: List[str]) -> List[str]:
    """Stage the source of every chapter in ``names`` that has no executed copy yet (its page then shows
    no outputs), so that the HTML book can be built after executing only some chapters; returns them."""
    import nbformat

    staged = []
    for name in names:
        src = source_of(root, name)
        dst = staging / f"{name}.ipynb"
        if is_notebook(src) and not dst.exists():
            dst.parent.mkdir(parents=True, exist_ok=True)
            nbformat.write(read_notebook(src), dst)
            staged.append(name)
    return staged


def kept_chapters(root: Path, staging: Path, keep: List[str], names: List[str]) -> List[str]:
    """The chapters of ``names`` that ``--keep`` asks to keep as they were executed (``all``: every one
    whose executed copy ran with parameters other than the profile's defaults) and that have an executed copy."""
    wanted = set(names) if "all" in keep else {n if "/" in n else f"book/{n}" for n in keep}
    unknown = wanted - set(names)
    if unknown:
        raise KDLibError(f"--keep: unknown chapter {sorted(unknown)[0]!r}; chapters: "
                         + ", ".join(Path(n).name for n in names))
    kept = []
    for name in names:
        executed = executed_parameters(staging / f"{name}.ipynb")
        if name in wanted and executed is not None and ("all" not in keep or set(executed) - {"profile"}):
            kept.append(name)
    return kept


def stage(root: Path, staging: Path) -> None:
    """Put the configuration, the non-executable pages and the library's source beside the executed chapters."""
    config = yaml.safe_load((root / "_config.yml").read_text())
    config.setdefault("execute", {})["execute_notebooks"] = "off"
    (staging / "_config.yml").write_text(yaml.safe_dump(config, sort_keys=False))
    shutil.copy2(root / "_toc.yml", staging / "_toc.yml")
    # chapters include kdlib's own files with {literalinclude} ../kdlib/...: copy them at build time
    shutil.copytree(root / "kdlib", staging / "kdlib", dirs_exist_ok=True,
                    ignore=shutil.ignore_patterns("__pycache__"))
    for path in (root / "book").rglob("*"):
        if path.is_file() and not (path.suffix in (".md", ".ipynb") and is_notebook(path)):
            target = staging / path.relative_to(root)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, target)


def build_html(root: Path, staging: Path, out: Optional[Path] = None, quiet: bool = False) -> Path:
    """``jupyter-book build`` of the staged (executed) chapters into ``out/_build/html``; the index page."""
    out = root if out is None else out
    write_course_tables(root, staging)
    jb = Path(sys.executable).with_name("jupyter-book")
    cmd = [str(jb), "build", str(staging), "--path-output", str(out), "--keep-going"]
    result = subprocess.run(cmd, cwd=root, capture_output=quiet, text=True)
    index = out / "_build" / "html" / "index.html"
    if result.returncode != 0 or not index.exists():
        tail = f": {result.stdout[-2000:]}{result.stderr[-2000:]}" if quiet else ""
        raise KDLibError(f"jupyter-book build failed (exit {result.returncode}){tail}")
    return index


def write_course_tables(root: Path, staging: Path) -> None:
    """The course page's tables (exercises, this build's chapter times), measured from the staged chapters."""
    from kdlib import course_page

    chapters = [Path(n).name for n in toc_files(root) if is_notebook(source_of(root, n))]
    course_page.write_tables(staging, chapters)


#: what ``make pdf`` needs besides Python: program -> the Debian package that brings it
PDF_PROGRAMS = {"latexmk": "latexmk", "xelatex": "texlive-xetex"}
#: LaTeX packages the Sphinx/Jupyter Book LaTeX output loads -> the Debian package that brings them
PDF_STYLES = {"fncychap.sty": "texlive-latex-extra", "tabulary.sty": "texlive-latex-extra",
              "capt-of.sty": "texlive-latex-extra", "needspace.sty": "texlive-latex-extra",
              "wrapfig.sty": "texlive-latex-extra", "framed.sty": "texlive-latex-extra",
              "upquote.sty": "texlive-latex-extra", "fontspec.sty": "texlive-latex-recommended",
              "amsmath.sty": "texlive-latex-base", "xcolor.sty": "texlive-latex-recommended",
              "FreeSerif.otf": "fonts-freefont-otf"}
PDF_DEBIAN_PACKAGES = ("latexmk", "texlive-xetex", "texlive-latex-recommended", "texlive-latex-extra",
                       "texlive-fonts-recommended", "fonts-freefont-otf", "tex-gyre", "lmodern")


def missing_pdf_tools() -> List[str]:
    """The Debian packages ``make pdf`` needs that this machine lacks (empty when it can build the PDF)."""
    missing = [pkg for prog, pkg in PDF_PROGRAMS.items() if shutil.which(prog) is None]
    kpsewhich = shutil.which("kpsewhich")
    for name, pkg in PDF_STYLES.items():
        if pkg in missing:
            continue
        if name.endswith(".otf"):
            found = any(Path(d).rglob(name) for d in ("/usr/share/fonts", "/usr/local/share/fonts")
                        if Path(d).exists())
        else:
            found = kpsewhich is not None and subprocess.run(
                [kpsewhich, name], capture_output=True, text=True).stdout.strip() != ""
        if not found:
            missing.append(pkg)
    return sorted(set(missing))


def check_pdf_tools() -> None:
    missing = missing_pdf_tools()
    if missing:
        raise KDLibError("the PDF needs TeX: missing " + ", ".join(missing) + "; install with: sudo apt-get install "
                         + " ".join(PDF_DEBIAN_PACKAGES))


def build_pdf(root: Path, staging: Path, out: Optional[Path] = None, quiet: bool = False) -> Path:
    """Jupyter Book's LaTeX builder on the staged chapters, then latexmk: ``out/_build/latex/book.pdf``."""
    check_pdf_tools()
    out = root if out is None else out
    jb = Path(sys.executable).with_name("jupyter-book")
    latex = out / "_build" / "latex"
    shutil.rmtree(latex, ignore_errors=True)  # a PDF from an earlier build must not pass for this one
    cmd = [str(jb), "build", str(staging), "--builder", "pdflatex", "--path-output", str(out), "--keep-going"]
    result = subprocess.run(cmd, cwd=root, capture_output=quiet, text=True)
    pdf = latex / "book.pdf"
    if result.returncode != 0 or not pdf.exists():
        log = next(iter(sorted(latex.glob("*.log"))), None)
        hint = f"; see {log}" if log else ""
        tail = f": {result.stdout[-2000:]}{result.stderr[-2000:]}" if quiet else ""
        raise KDLibError(f"the PDF build failed (exit {result.returncode}){hint}{tail}")
    return pdf


def student_copies(root: Path, out: Path) -> List[Path]:
    """Chapters as notebooks without outputs and without solutions, for teaching."""
    import nbformat

    written = []
    for name in toc_files(root):
        src = source_of(root, name)
        if not is_notebook(src):
            continue
        nb = read_notebook(src)
        nb.cells = [c for c in nb.cells if not SOLUTION_TAGS & set(c.get("metadata", {}).get("tags", []))]
        for cell in nb.cells:
            if cell.cell_type == "markdown":
                cell.source = SOLUTION_BLOCK.sub("", cell.source)
            else:
                cell.outputs, cell.execution_count = [], None
                cell.source = stub_solutions(cell.source)
        target = out / f"{Path(name).name}.ipynb"
        target.parent.mkdir(parents=True, exist_ok=True)
        nbformat.write(nb, target)
        written.append(target)
    return written


def is_up_to_date(src: Path, dst: Path, parameters: Dict) -> bool:
    """Whether ``dst`` was executed from the current ``src`` with exactly ``parameters``."""
    return (dst.exists() and dst.stat().st_mtime >= src.stat().st_mtime
            and executed_parameters(dst) == parameters)


def expected_seconds(src: Path, dst: Path) -> float:
    """How long ``src`` is expected to execute: the last build's time (papermill's record in ``dst``), else
    the estimate in its front matter (``kdlib: build_seconds: N``), else 0."""
    import nbformat

    try:
        return float(nbformat.read(dst, as_version=4).metadata["papermill"]["duration"])
    except (OSError, KeyError, ValueError, TypeError):
        pass
    try:
        return float(read_notebook(src).metadata.get("kdlib", {}).get("build_seconds", 0))
    except (AttributeError, ValueError, TypeError):
        return 0.0


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _execute_in_subprocesses(root: Path, names: List[str], args: argparse.Namespace, jobs: int,
                             extra: Sequence[str] = (), poll=None) -> None:
    """Execute ``names`` (longest first) ``jobs`` at a time, each by ``kdlib book --only`` (with ``extra``
    arguments) in a process of its own with ``cores // jobs`` torch threads; a failure stops the build with
    the chapter's log. ``poll()`` is called twice a second meanwhile."""
    staging = Path(args.staging) if getattr(args, "staging", None) else root / STAGING
    logs = root / "_build" / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    order = sorted(names, key=lambda n: -expected_seconds(source_of(root, n), staging / f"{n}.ipynb"))
    threads = max(1, _cores() // jobs)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "KDLIB_RUN_WORKERS": "1"}
    base = [sys.executable, "-m", "kdlib", "book", "--root", str(root), "--profile", args.profile, "--no-stage"]
    for name, value in args.parameter:
        base += ["-p", name, value]
    pending, running = list(order), {}
    print(f"executing {len(order)} chapters, {jobs} at a time with {threads} thread{'s' if threads > 1 else ''} "
          f"each: {', '.join(order)}", flush=True)
    try:
        while pending or running:
            while pending and len(running) < jobs:
                name = pending.pop(0)
                log = open(logs / f"{Path(name).name}.log", "w")
                proc = subprocess.Popen(base + ["--only", name, *extra], cwd=root, env=env, stdout=log,
                                        stderr=subprocess.STDOUT, text=True)
                running[name] = (proc, log, time.perf_counter())
            time.sleep(0.5)
            if poll is not None:
                poll()
            for name, (proc, log, start) in list(running.items()):
                if proc.poll() is None:
                    continue
                log.close()
                del running[name]
                if proc.returncode != 0:
                    tail = (logs / f"{Path(name).name}.log").read_text().strip().splitlines()[-15:]
                    raise KDLibError(f"chapter {name} failed (log: {logs / Path(name).name}.log):\n"
                                     + "\n".join(tail))
                print(f"  {name}: {time.perf_counter() - start:.0f} s (side by side)", flush=True)
    finally:
        for proc, log, _ in running.values():
            proc.terminate()
            proc.wait()
            log.close()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--profile", default="smoke", help="smoke (offline, CI), course or paper")
    parser.add_argument("--only", action="append", metavar="CHAPTER",
                        help="execute only this chapter (e.g. dkd); repeatable; then builds the HTML book from "
                             "the chapters executed so far (--no-html: not)")
    parser.add_argument("-p", "--parameter", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"),
                        help="a chapter parameter, as papermill's -p (VALUE is parsed as YAML)")
    parser.add_argument("--no-html", action="store_true", help="execute the chapters, do not build the HTML")
    parser.add_argument("--pdf", action="store_true",
                        help="build the book as one PDF (_build/latex/book.pdf) instead of the HTML; reuses "
                             "the executed chapters of the same parameters, executes the others")
    parser.add_argument("--data-root", metavar="DIR",
                        help="the folder holding cifar-100-python/ (sets KDLIB_DATA for the chapters)")
    parser.add_argument("--student-copies", metavar="DIR", help="write chapters without outputs and solutions to DIR")
    parser.add_argument("--root", default=".", help="the repository (holds _toc.yml and book/)")
    parser.add_argument("--jobs", type=int, default=None, metavar="N",
                        help="chapters executed side by side between the first and the last (default: one "
                             "per CPU core; 1: one after the other)")
    parser.add_argument("--keep", action="append", default=[], metavar="CHAPTER",
                        help="keep this chapter as it was last executed (e.g. by `make chapter` with other "
                             "parameters) instead of executing it again; repeatable; `all`: every chapter last "
                             "executed with other parameters")
    parser.add_argument("--no-stage", action="store_true", help=argparse.SUPPRESS)  # a side-by-side chapter
    from kdlib.bookruns import add_book_executor_arguments

    add_book_executor_arguments(parser)


def _execute_here(root: Path, staging: Path, name: str, parameters: Dict, profile: str,
                  collect: Optional[Path] = None) -> None:
    print(f"{'collecting the runs of' if collect else 'executing'} {name} ({profile}) ...", flush=True)
    seconds = execute_chapter(source_of(root, name), staging / f"{name}.ipynb", parameters,
                              cwd=(staging / name).parent, collect=collect)
    print(f"  {name}: {seconds:.0f} s", flush=True)


def run(args: argparse.Namespace) -> int:
    root = Path(args.root).resolve()
    if not (root / "_toc.yml").exists():
        raise KDLibError(f"{root} has no _toc.yml; run from the repository's top folder or pass --root")
    if args.student_copies:
        for path in student_copies(root, Path(args.student_copies)):
            print(f"wrote {path}")
        return 0
    parameters = {"profile": args.profile}
    parameters.update({name: yaml.safe_load(value) for name, value in args.parameter})
    os.environ.setdefault("KDLIB_HOME", str(root / "_build" / "kdlib"))
    if args.data_root:
        os.environ["KDLIB_DATA"] = str(Path(args.data_root).resolve())
    if args.pdf:
        check_pdf_tools()  # before an hour of execution, not after
    staging = Path(args.staging) if args.staging else root / STAGING
    names = toc_files(root)
    if args.only:
        wanted = {n if "/" in n else f"book/{n}" for n in args.only}
        unknown = wanted - set(names)
        if unknown:
            raise KDLibError(f"unknown chapter {sorted(unknown)[0]!r}; chapters: "
                             + ", ".join(Path(n).name for n in names))
        names = [n for n in names if n in wanted]
    if args.jobs is not None and args.jobs < 1:  # before any work
        raise KDLibError(f"--jobs must be at least 1, not {args.jobs}")
    staging.mkdir(parents=True, exist_ok=True)
    if not args.no_stage:
        stage(root, staging)
    if args.collect:  # one chapter of run_book_on_executor, recording the runs it lacks
        if args.wait_runs:
            from kdlib.runs import WAIT_ENV

            os.environ[WAIT_ENV] = "1"
        for name in names:
            _execute_here(root, staging, name, parameters, args.profile, Path(args.collect) / f"{Path(name).name}.jsonl")
        return 0
    total = time.perf_counter()
    kept = kept_chapters(root, staging, args.keep, names) if args.keep else []
    for name in kept:
        print(f"{name}: kept as executed with {executed_parameters(staging / f'{name}.ipynb')}", flush=True)
    todo = []
    for name in [n for n in names if n not in kept]:
        src = source_of(root, name)
        if not is_notebook(src):
            continue
        if args.pdf and is_up_to_date(src, staging / f"{name}.ipynb", parameters):
            print(f"{name}: executed copy is up to date", flush=True)
            continue
        todo.append(name)
    jobs = args.jobs or _cores()
    if args.executor:
        status = run_book_on_executor(root, staging, todo, args, jobs)
        if status or args.plan:
            return status
        todo = []  # every chapter executed, its runs found
    # the first chapter trains the shared teacher and the last reads every run: they run alone
    alone_first, side_by_side, alone_last = (todo[:1], todo[1:-1], todo[-1:]) if jobs > 1 and len(todo) >= 4 \
        else (todo, [], [])
    for name in alone_first:
        _execute_here(root, staging, name, parameters, args.profile)
    if side_by_side:
        _execute_in_subprocesses(root, side_by_side, args, jobs)
    for name in alone_last:
        _execute_here(root, staging, name, parameters, args.profile)
    print(f"chapters executed in {time.perf_counter() - total:.0f} s")
    if args.no_html or args.no_stage:  # --no-stage: one chapter of a whole build, executed side by side
        return 0
    if args.only:  # `make chapter`: build the pages again, this chapter's with the parameters it ran with
        stage_unexecuted(root, staging, toc_files(root))
    if args.pdf:
        print(f"book: {build_pdf(root, staging)}")
        return 0
    index = build_html(root, staging)
    print(f"book: {index}")
    return 0


# -- the whole book's runs on an executor: kdlib book --executor local|slurm|pool ----------------------
def chapter_error(path: Path) -> Optional[str]:
    """The first error an executed notebook shows (``cell N: Type: message``); None without one (or file)."""
    import nbformat

    cells = nbformat.read(path, as_version=4).cells if path.is_file() else []
    errors = [f"cell {c.get('execution_count')}: {o.get('ename')}: {o.get('evalue')}" for c in cells
              for o in c.get("outputs", []) if o.get("output_type") == "error"]
    return errors[0] if errors else ("not executed" if not path.is_file() else None)


def run_book_on_executor(root: Path, staging: Path, names: List[str], args: argparse.Namespace, jobs: int) -> int:
    """The whole book's runs on an executor, then the chapters, which train nothing.

    1. Every chapter executes in collect mode: it records the runs it lacks and goes on past the cells
       that needed them (their errors ignored), so its analyses do not wait for training.
    2. The runs they asked for are trained on ``--executor`` (Slurm: arrays, the teachers' first), with a
       progress bar. ``--plan`` stops here, printing the plan (``$KDLIB_HOME/book-<profile>.json`` holds
       every run's resolved recipe).
    3. The chapters execute for real, finding every record. A run a chapter asks for only now (one that
       depends on a result) is recorded and trained on the executor while the chapter waits.
    Returns 1 when a run failed, naming it and the command that resumes the book (the same command).
    """
    from kdlib import runs
    from kdlib.bookruns import BookRuns

    jobs, folder = min(jobs, max(1, len(names))), staging / "_runs_asked"
    book = BookRuns(args, folder)
    extra = ["--collect", str(folder), "--staging", str(staging)]
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    start = time.perf_counter()
    _execute_in_subprocesses(root, names, args, jobs, extra=extra)
    todo = book.new()
    print(f"collected: {len(todo)} runs to train ({sum(r.role == 'teacher' for r in todo)} teachers) for "
          f"{len(names)} chapters in {time.perf_counter() - start:.0f} s", flush=True)
    first = book.asked()  # every run each chapter reached; those executed again below reach all of theirs
    plan_file = book.home / f"book-{args.profile}.json"
    runs.write_plan(plan_file, todo, {"command": book.command, "chapters": {n: [r.label for r in rs] for n, rs in first.items()}})
    if args.plan:
        runs.print_plan(todo, verbose=args.verbose)
        for name, asked in book.asked().items():
            print(f"{name}: {len(asked)} runs, {sum(not r.finished() for r in asked)} to train")
        print(f"\n{len(todo)} runs to train (chapters may ask for more once these are trained); their resolved "
              f"recipes: {book.home / f'book-{args.profile}.json'}")
        return 0
    book.train(todo, "collected")
    if book.failed:
        return book.report()
    lacked = book.asked(missing=True)  # a chapter that lacked no run and shows no error has executed completely
    names = [n for n in names if lacked.get(Path(n).name) or chapter_error(staging / f"{n}.ipynb")]
    shutil.rmtree(folder)
    folder.mkdir()
    try:
        if names:
            _execute_in_subprocesses(root, names, args, jobs, extra=[*extra, "--wait-runs"], poll=book.poll)
    finally:  # also when a chapter failed: the runs that failed, and how to resume, are named
        if book.thread is not None:
            book.thread.join()
        status = book.report()
    asked = {**first, **book.asked()}
    chapters = {n: [r.label for r in rs] for n, rs in asked.items()}
    runs.write_plan(plan_file, list({str(r.run_dir): r for rs in asked.values() for r in rs}.values()),
                    {"command": book.command, "chapters": chapters})
    print("runs per chapter: " + ", ".join(f"{n} {len(labels)}" for n, labels in sorted(chapters.items())))
    shutil.rmtree(folder)  # nothing of the collection stays beside the executed chapters
    return status
