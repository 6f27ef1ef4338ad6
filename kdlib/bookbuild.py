"""``python -m kdlib book``: execute the chapters with papermill, then build the HTML book.

The chapters are MyST markdown notebooks in ``book/`` (stored without outputs). For each chapter listed
in ``_toc.yml`` this module converts it with jupytext, executes it with papermill (the profile and any
``-p name value`` go into the chapter's ``parameters`` cell) into ``_build/executed/``, then runs
``jupyter-book build`` on those executed copies with execution switched off, so nothing runs twice.
A cell error stops the build with the chapter's name. Runs and teachers are shared by all chapters
through ``KDLIB_HOME`` (the engine resumes or skips what is already finished).
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
from typing import Dict, List, Optional

import yaml

from kdlib.errors import KDLibError

STAGING = Path("_build") / "executed"
SOLUTION_TAGS = {"solution", "remove-in-student"}
# a MyST block `:::{dropdown} Solution ... :::` (or admonition) holds an exercise's answer
SOLUTION_BLOCK = re.compile(r"^:::+\{(?:dropdown|admonition)\} *Solution.*?^:::+ *$", re.M | re.S)


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


def execute_chapter(src: Path, dst: Path, parameters: Dict, cwd: Path) -> float:
    """Execute one chapter into ``dst`` (ipynb); returns the seconds it took."""
    import nbformat
    import papermill

    dst.parent.mkdir(parents=True, exist_ok=True)
    unexecuted = dst.with_suffix(".input.ipynb")
    nbformat.write(read_notebook(src), unexecuted)
    start = time.perf_counter()
    try:
        papermill.execute_notebook(
            str(unexecuted), str(dst), parameters=parameters, kernel_name="python3",
            progress_bar=False, cwd=str(cwd),
        )
    except papermill.PapermillExecutionError as exc:
        raise KDLibError(f"chapter {src.name} failed in cell {exc.exec_count}: {exc.ename}: {exc.evalue}")
    finally:
        unexecuted.unlink(missing_ok=True)
    errors = [o for c in nbformat.read(dst, as_version=4).cells for o in c.get("outputs", [])
              if o.get("output_type") == "error"]
    if errors:
        raise KDLibError(f"chapter {src.name} has error output: {errors[0].get('ename')}")
    return time.perf_counter() - start


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


def build_html(root: Path, staging: Path) -> Path:
    jb = Path(sys.executable).with_name("jupyter-book")
    cmd = [str(jb), "build", str(staging), "--path-output", str(root), "--keep-going"]
    result = subprocess.run(cmd, cwd=root)
    index = root / "_build" / "html" / "index.html"
    if result.returncode != 0 or not index.exists():
        raise KDLibError(f"jupyter-book build failed (exit {result.returncode})")
    return index


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
        target = out / f"{Path(name).name}.ipynb"
        target.parent.mkdir(parents=True, exist_ok=True)
        nbformat.write(nb, target)
        written.append(target)
    return written


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--profile", default="smoke", help="smoke (offline, CI), course or paper")
    parser.add_argument("--only", action="append", metavar="CHAPTER",
                        help="execute only this chapter (e.g. dkd); repeatable; skips the HTML build")
    parser.add_argument("-p", "--parameter", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"),
                        help="a chapter parameter, as papermill's -p (VALUE is parsed as YAML)")
    parser.add_argument("--no-html", action="store_true", help="execute the chapters, do not build the HTML")
    parser.add_argument("--student-copies", metavar="DIR", help="write chapters without outputs and solutions to DIR")
    parser.add_argument("--root", default=".", help="the repository (holds _toc.yml and book/)")


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
    staging = root / STAGING
    names = toc_files(root)
    if args.only:
        wanted = {n if "/" in n else f"book/{n}" for n in args.only}
        unknown = wanted - set(names)
        if unknown:
            raise KDLibError(f"unknown chapter {sorted(unknown)[0]!r}; chapters: "
                             + ", ".join(Path(n).name for n in names))
        names = [n for n in names if n in wanted]
    staging.mkdir(parents=True, exist_ok=True)
    stage(root, staging)
    total = time.perf_counter()
    for name in names:
        src = source_of(root, name)
        if not is_notebook(src):
            continue
        print(f"executing {name} ({args.profile}) ...", flush=True)
        seconds = execute_chapter(src, staging / f"{name}.ipynb", parameters, cwd=(staging / name).parent)
        print(f"  {name}: {seconds:.0f} s", flush=True)
    print(f"chapters executed in {time.perf_counter() - total:.0f} s")
    if args.only or args.no_html:
        return 0
    index = build_html(root, staging)
    print(f"book: {index}")
    return 0
