"""``python -m kdlib course``: the book as a course: graded assignments (nbgrader), lab and student copies.

**Assignments** (``make course``). Every chapter with a "Code exercises" section becomes one nbgrader
assignment, built from the chapter itself so the two cannot drift. The section is the run of cells from the
Markdown cell before the one tagged ``exercise-setup`` to the last one tagged ``exercise-check``; in it a
cell tagged ``exercise`` holds a solution between ``### BEGIN SOLUTION`` and ``### END SOLUTION`` and the
``exercise-check`` cell after it calls ``exercises.check("name", name)``. The course folder
(``_build/course``, an nbgrader course directory) receives:

* ``source/<chapter>/<chapter>.ipynb``: the instructor's version, the solutions and, after each check, one
  hidden test cell per grading part of the exercise (``exercises.grade(..., part=..., seed=...)``, 1 point
  each, on cases drawn from a seed the students do not see);
* ``release/<chapter>/<chapter>.ipynb``: what students get (``nbgrader generate_assignment``): each
  solution replaced with ``raise NotImplementedError()``, the hidden tests removed, set-up, checks and
  tests locked;
* ``gradebook.db``: nbgrader's SQLite gradebook (no server), which keeps the hidden tests for grading.

Grading is nbgrader's own: put each submission at ``submitted/<student>/<chapter>/<chapter>.ipynb`` and run
``nbgrader autograde <chapter> --create`` then ``nbgrader generate_feedback <chapter>`` in the course
folder (feedback pages in ``feedback/``); see the README.

**Lab copies** (``make lab``): each chapter as a notebook that reads right in JupyterLab with
jupyterlab-myst: every ``{glue:text}`` role becomes an inline ``{eval}`` expression whose value is already
filled in from the executed chapter (and recomputed when the cell is run again), every glued figure an
``{eval}`` of the figure, ``{doc}`` links become links to the other notebooks, ``{literalinclude}``
directives the code they include. Copies a reader has changed are never overwritten.
**Student copies** (``make student-copies``) are lab copies without outputs and solutions.
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import re
import sys
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from kdlib import bookbuild
from kdlib.errors import KDLibError

SETUP_TAG, SOLUTION_TAG, CHECK_TAG = "exercise-setup", "exercise", "exercise-check"
#: the seeds of the hidden tests: not the visible check's (0), so a function fitted to those cases fails
HIDDEN_SEED = 1000
CHECK_CALL = re.compile(r"""exercises\.check\(\s*["'](\w+)["']\s*,\s*(\w+)""")
STUB = bookbuild.STUB


def _tags(cell) -> List[str]:
    return list(cell.get("metadata", {}).get("tags", []))


def exercise_section(nb) -> List:
    """The chapter's "Code exercises" cells (see the module's docstring); [] when it has none."""
    cells = nb.cells
    setup = [i for i, c in enumerate(cells) if SETUP_TAG in _tags(c)]
    checks = [i for i, c in enumerate(cells) if CHECK_TAG in _tags(c)]
    if not setup or not checks:
        return []
    start = setup[0] - 1 if setup[0] > 0 and cells[setup[0] - 1].cell_type == "markdown" else setup[0]
    return [copy.deepcopy(c) for c in cells[start:checks[-1] + 1]]


def exercise_calls(cells) -> List[Tuple[str, str]]:
    """(exercise, function name) of every check cell, in order."""
    found = []
    for cell in cells:
        if CHECK_TAG in _tags(cell):
            match = CHECK_CALL.search(cell.source)
            if match is None:
                raise KDLibError(f"a cell tagged {CHECK_TAG!r} must call exercises.check(\"name\", function): "
                                 f"{cell.source[:80]!r}")
            found.append((match.group(1), match.group(2)))
    return found


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def _nbgrader(cell, grade_id: str, *, solution=False, grade=False, locked=False, points=None):
    meta = {"grade": grade, "grade_id": grade_id, "locked": locked, "schema_version": 3,
            "solution": solution, "task": False}
    if points is not None:
        meta["points"] = points
    cell.metadata["nbgrader"] = meta
    cell.metadata["tags"] = [t for t in _tags(cell) if t not in (SETUP_TAG, SOLUTION_TAG, CHECK_TAG)]
    if not cell.metadata["tags"]:
        del cell.metadata["tags"]
    return cell


def chapter_title(nb) -> str:
    for cell in nb.cells:
        if cell.cell_type == "markdown":
            match = re.search(r"^# (.+)$", cell.source, re.M)
            if match:
                return match.group(1).strip()
    return "?"


def assignment_notebook(chapter: str, nb):
    """The instructor's nbgrader notebook of one chapter's code exercises (solutions and hidden tests)."""
    import nbformat

    from kdlib import exercises

    cells = exercise_section(nb)
    if not cells:
        raise KDLibError(f"chapter {chapter} has no code exercises (cells tagged {SETUP_TAG!r} and {CHECK_TAG!r})")
    calls = exercise_calls(cells)
    points = sum(len(exercises.get(name).parts) for name, _ in calls)
    title = chapter_title(nb)
    intro = nbformat.v4.new_markdown_cell(
        f"# {title}: code exercises\n\n"
        f"From the chapter *{title}* of the Class-Aware Distillation Book. In each exercise, replace "
        f"`raise NotImplementedError()` with your code and run the check cell below it: it compares your "
        f"function with kdlib's own on random inputs and says what is wrong, if anything. When you hand "
        f"the notebook in, the grader runs hidden tests of its own on cases you have not seen "
        f"({points} points in all).")
    out = [_nbgrader(intro, "intro", locked=True)]
    checked = 0
    for cell in cells:
        tags = _tags(cell)
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
        if SETUP_TAG in tags:
            out.append(_nbgrader(cell, "setup", locked=True))
        elif SOLUTION_TAG in tags:
            if "### BEGIN SOLUTION" not in cell.source:
                raise KDLibError(f"chapter {chapter}: an exercise cell has no ### BEGIN SOLUTION region")
            out.append(_nbgrader(cell, f"{calls[checked][0]}-solution", solution=True))
        elif CHECK_TAG in tags:
            name, function = calls[checked]
            out.append(_nbgrader(cell, f"{name}-check", locked=True))
            for number, part in enumerate(exercises.get(name).parts):
                seed = HIDDEN_SEED + 10 * checked + number
                test = nbformat.v4.new_code_cell(
                    f"# The grader's test of {function} ({part}): hidden cases, 1 point\n"
                    f"### BEGIN HIDDEN TESTS\n"
                    f"exercises.grade({name!r}, {function}, part={part!r}, seed={seed})\n"
                    f"### END HIDDEN TESTS")
                out.append(_nbgrader(test, f"{name}-{_slug(part)}", grade=True, locked=True, points=1))
            checked += 1
        else:
            out.append(cell)
    return nbformat.v4.new_notebook(cells=out, metadata={
        "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
        "language_info": {"name": "python"}})


def chapters_with_exercises(root: Path) -> Dict[str, object]:
    """``{chapter: notebook}`` of the chapters in _toc.yml that have code exercises, in book order."""
    found = {}
    for name in bookbuild.toc_files(root):
        src = bookbuild.source_of(root, name)
        if bookbuild.is_notebook(src):
            nb = bookbuild.read_notebook(src)
            if exercise_section(nb):
                found[Path(name).name] = nb
    return found


NBGRADER_CONFIG = '''# nbgrader configuration of the course built by `make course` (python -m kdlib course)
c = get_config()  # noqa: F821
c.CourseDirectory.course_id = "kdbook"
c.CourseDirectory.root = {root!r}
c.ClearSolutions.code_stub = {{"python": {stub!r}}}
# the exercises are light (random logits, no training): a cell that runs this long is stuck
c.ExecutePreprocessor.timeout = 120
'''


def nbgrader_api(course: Path):
    """nbgrader's own Python API on the course folder (one process for every step: importing nbgrader
    takes seconds, a command per assignment would pay that each time)."""
    from nbgrader.apps import NbGraderAPI
    from nbgrader.coursedir import CourseDirectory
    from traitlets.config import Config, PyFileConfigLoader

    config = Config()
    config.merge(PyFileConfigLoader("nbgrader_config.py", path=str(course)).load_config())
    # nbgrader runs `alembic` and the kernels by name: those of this environment
    bin_dir = str(Path(sys.executable).parent)
    if bin_dir not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"
    return NbGraderAPI(coursedir=CourseDirectory(config=config), config=config)


def _checked(result: dict, what: str) -> dict:
    if not result.get("success"):
        raise KDLibError(f"nbgrader {what} failed: {(result.get('error') or result.get('log') or '')[-2000:]}")
    return result


def build_course(root: Path, course: Path, chapters: Optional[List[str]] = None) -> Dict[str, Path]:
    """Write the nbgrader course folder and release every assignment; ``{chapter: release notebook}``."""
    import nbformat

    found = chapters_with_exercises(root)
    if chapters:
        unknown = sorted(set(chapters) - set(found))
        if unknown:
            raise KDLibError(f"no code exercises in chapter {unknown[0]!r}; chapters with exercises: "
                             + ", ".join(found))
        found = {k: v for k, v in found.items() if k in chapters}
    course.mkdir(parents=True, exist_ok=True)
    (course / "nbgrader_config.py").write_text(NBGRADER_CONFIG.format(root=str(course.resolve()), stub=STUB))
    api = nbgrader_api(course)
    released = {}
    for chapter, nb in found.items():
        source = course / "source" / chapter / f"{chapter}.ipynb"
        source.parent.mkdir(parents=True, exist_ok=True)
        nbformat.write(assignment_notebook(chapter, nb), source)
        _checked(api.generate_assignment(chapter, force=True, create=True), f"generate_assignment {chapter}")
        released[chapter] = course / "release" / chapter / f"{chapter}.ipynb"
        print(f"{chapter}: {released[chapter]}", flush=True)
    return released


# -- lab and student copies ------------------------------------------------------------------------------
GLUE_TEXT = re.compile(r"\{glue:text\}`([A-Za-z0-9_]+)(?::([^`]*))?`")
GLUE_ANY = re.compile(r"\{glue(?::any)?\}`([A-Za-z0-9_]+)`")
DOC_ROLE = re.compile(r"\{doc\}`(?:([^`<]*?)\s*<([^`>]+)>|([^`]+))`")
GLUE_FIGURE = re.compile(r"^(`{3,}|:{3,})\{glue:figure\}\s*([A-Za-z0-9_]+)\s*\n(.*?)^\1\s*$", re.M | re.S)
LITERALINCLUDE = re.compile(r"^(`{3,}|:{3,})\{literalinclude\}\s*(\S+)\s*\n(.*?)^\1\s*$", re.M | re.S)
#: the kernel-side expression an inline {eval} shows for a glued value (kdlib.glued.value)
EVAL_TEXT = "__import__('kdlib.glued').glued.value({key!r}, {fmt!r})"
LAB_STAMP = "kdlib_lab_copy"  # notebook metadata: the hash of what `make lab` wrote (to spot a reader's edits)


def glued_outputs(nb) -> Dict[str, dict]:
    """``{name: mime bundle}`` of every value glued in an executed notebook (myst_nb.glue outputs)."""
    prefix = "application/papermill.record/"
    found = {}
    for cell in nb.cells:
        for output in cell.get("outputs", []):
            name = output.get("metadata", {}).get("scrapbook", {}).get("name")
            if name:
                found[name] = {k[len(prefix):] if k.startswith(prefix) else k: v
                               for k, v in output.get("data", {}).items()}
    return found


def format_value(bundle: dict, fmt: Optional[str]) -> str:
    """The text ``{glue:text}`key:fmt``` shows: the plain-text value, through the format spec if any."""
    text = bundle.get("text/plain", "")
    if isinstance(text, list):
        text = "".join(text)
    if fmt:
        try:
            return format(float(text), fmt)
        except ValueError:
            pass
    return text[1:-1] if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"" else text


def _doc_title(root: Path, target: str) -> str:
    name = Path(target).name
    try:
        return chapter_title(bookbuild.read_notebook(bookbuild.source_of(root, f"book/{name}")))
    except KDLibError:
        return name


def _include(root: Path, chapter_dir: Path, target: str, options: str) -> str:
    """The text a ``{literalinclude}`` shows: the file, or the object named by ``:pyobject:``."""
    path = (chapter_dir / target).resolve()
    if not path.exists():
        return f"(see {target})"
    text = path.read_text()
    pyobject = re.search(r"^:pyobject:\s*(\S+)", options, re.M)
    if pyobject:
        import ast

        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and node.name == pyobject.group(1):
                lines = text.splitlines()
                start = min([d.lineno for d in node.decorator_list] + [node.lineno]) - 1
                text = "\n".join(lines[start:node.end_lineno])
                break
    language = re.search(r"^:language:\s*(\S+)", options, re.M)
    return f"```{language.group(1) if language else 'python'}\n{text.rstrip()}\n```"


def lab_markdown(source: str, root: Path, glued: Dict[str, dict], expressions: List[dict]) -> str:
    """One Markdown cell of a chapter rewritten for JupyterLab (see the module's docstring); each inline
    value gets its pre-computed result appended to ``expressions`` (jupyterlab-myst's cell metadata)."""
    def text_role(match):
        return inline(match.group(1), match.group(2) or "")

    def inline(key, fmt):
        expression = EVAL_TEXT.format(key=key, fmt=fmt)
        if key in glued:
            expressions.append({"expression": expression, "result": {
                "status": "ok", "data": {"text/plain": repr(format_value(glued[key], fmt))}, "metadata": {}}})
        return "{eval}`" + expression + "`"

    def figure(match):
        key, body = match.group(2), match.group(3)
        caption = "\n".join(line for line in body.splitlines() if not line.startswith(":")).strip()
        expression = EVAL_TEXT.format(key=key, fmt="")
        if key in glued:
            data = {k: v for k, v in glued[key].items() if k in ("image/png", "image/svg+xml", "text/plain")}
            expressions.append({"expression": expression, "result": {"status": "ok", "data": data, "metadata": {}}})
        return "{eval}`" + expression + "`\n\n" + (f"*{caption}*" if caption else "")

    def doc(match):
        title, target = (match.group(1), match.group(2)) if match.group(2) else (None, match.group(3))
        name = Path(target.strip()).name
        return f"[{title or _doc_title(root, name)}]({name}.ipynb)"

    source = GLUE_FIGURE.sub(figure, source)
    source = LITERALINCLUDE.sub(lambda m: _include(root, root / "book", m.group(2), m.group(3)), source)
    source = GLUE_TEXT.sub(text_role, source)
    source = GLUE_ANY.sub(lambda m: inline(m.group(1), ""), source)
    return DOC_ROLE.sub(doc, source)


def lab_notebook(root: Path, chapter: str, executed: Optional[Path] = None, student: bool = False):
    """A chapter as a notebook for JupyterLab: from its executed copy when there is one (outputs, values),
    else from its source; ``student=True`` drops outputs and solutions (stubs in the exercises)."""
    import nbformat

    src = bookbuild.source_of(root, f"book/{chapter}")
    nb = (nbformat.read(executed, as_version=4) if executed is not None and executed.exists()
          else bookbuild.read_notebook(src))
    glued = glued_outputs(nb)
    cells = []
    for cell in nb.cells:
        tags = _tags(cell)
        if "remove-cell" in tags and bookbuild.INJECTED_TAG in tags:
            continue  # papermill's copy of the parameters: the parameters cell shows them
        if student and bookbuild.SOLUTION_TAGS & set(tags):
            continue
        if cell.cell_type == "markdown":
            expressions: List[dict] = []
            source = lab_markdown(cell.source, root, glued, expressions)
            if student:
                source = bookbuild.SOLUTION_BLOCK.sub("", source)
            cell.source = source
            cell.metadata.pop("user_expressions", None)
            if expressions and not student:
                cell.metadata["user_expressions"] = expressions
        elif cell.cell_type == "code" and "hide-input" in tags:
            cell.metadata.setdefault("jupyter", {})["source_hidden"] = True  # folded, as in the book
        if cell.cell_type == "code" and student:
            cell.outputs, cell.execution_count = [], None
            if SOLUTION_TAG in tags:
                cell.source = bookbuild.stub_solutions(cell.source)
        cells.append(cell)
    nb.cells = cells
    nb.metadata.pop("papermill", None)
    nb.metadata.pop("jupytext", None)
    return nb


def _digest(nb) -> str:
    body = {k: v for k, v in nb.metadata.items() if k != LAB_STAMP}
    text = json.dumps({"cells": [{"source": c.source, "type": c.cell_type} for c in nb.cells], "meta": body},
                      sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def write_lab_copies(root: Path, out: Path, student: bool = False, staging: Optional[Path] = None) -> List[Path]:
    """Write every chapter's lab copy (or student copy) to ``out``; a copy changed since it was written is kept."""
    import nbformat

    staging = root / bookbuild.STAGING if staging is None else staging
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name in bookbuild.toc_files(root):
        if not bookbuild.is_notebook(bookbuild.source_of(root, name)):
            continue
        chapter = Path(name).name
        target = out / f"{chapter}.ipynb"
        if target.exists():
            old = nbformat.read(target, as_version=4)
            if old.metadata.get(LAB_STAMP) != _digest(old):
                print(f"kept {target}: it was changed since it was written (delete it for a fresh copy)")
                continue
        nb = lab_notebook(root, chapter, staging / "book" / f"{chapter}.ipynb", student=student)
        nb.metadata[LAB_STAMP] = _digest(nb)
        nbformat.write(nb, target)
        written.append(target)
    return written


# -- the command ------------------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="_build/course", help="the nbgrader course folder (default _build/course)")
    parser.add_argument("--only", action="append", metavar="CHAPTER", help="build this chapter's assignment only")
    parser.add_argument("--lab", metavar="DIR", help="write the chapters as JupyterLab notebooks to DIR instead")
    parser.add_argument("--student-copies", metavar="DIR",
                        help="write the chapters without outputs and solutions to DIR instead")
    parser.add_argument("--root", default=".", help="the repository (holds _toc.yml and book/)")


def run(args: argparse.Namespace) -> int:
    root = Path(args.root).resolve()
    if not (root / "_toc.yml").exists():
        raise KDLibError(f"{root} has no _toc.yml; run from the repository's top folder or pass --root")
    if args.lab or args.student_copies:
        out = Path(args.lab or args.student_copies)
        for path in write_lab_copies(root, out, student=bool(args.student_copies)):
            print(f"wrote {path}")
        return 0
    try:
        import nbgrader  # noqa: F401
    except ImportError:
        raise KDLibError("nbgrader is not installed: make setup installs it (pip install -e '.[course]')")
    released = build_course(root, Path(args.out), args.only)
    print(f"course: {len(released)} assignments in {Path(args.out) / 'release'}; instructor's versions in "
          f"{Path(args.out) / 'source'}")
    return 0
