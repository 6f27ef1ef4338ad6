"""The book: every chapter is in the table of contents, is stored clean, and executes under papermill.

The execution test runs each chapter in a tiny setting (one epoch on a few synthetic images per class)
through the same function `make book` uses, so a chapter that breaks fails CI. The executed notebooks are
kept for the session (conftest's ``tiny_chapters``): test_pages.py builds the HTML book from them.
"""
import json
from pathlib import Path

import pytest

from conftest import TINY_CHAPTER as TINY
from kdlib import bookbuild

ROOT = Path(__file__).resolve().parent.parent


def chapter_sources():
    """The files _toc.yml lists that exist (a missing one fails test_toc_lists_every_chapter_file)."""
    found = []
    for name in bookbuild.toc_files(ROOT):
        try:
            found.append(bookbuild.source_of(ROOT, name))
        except Exception:
            pass
    return found


def notebook_chapters():
    return [p for p in chapter_sources() if bookbuild.is_notebook(p)]


def test_toc_lists_every_chapter_file():
    for name in bookbuild.toc_files(ROOT):
        bookbuild.source_of(ROOT, name)  # raises if _toc.yml lists a file that does not exist
    listed = {p.resolve() for p in chapter_sources()}
    on_disk = {p.resolve() for p in (ROOT / "book").glob("*") if p.suffix in (".md", ".ipynb")}
    assert on_disk - listed == set(), "chapters missing from _toc.yml"
    assert listed - on_disk == set()


def test_every_method_has_a_chapter():
    from kdlib import methods

    # a chapter named after the method, or one that includes the method's source file
    names = {p.stem for p in chapter_sources()}
    included = {m for m in methods.names() for p in chapter_sources()
                if f"../kdlib/methods/{m}.py" in p.read_text()}
    assert {m for m in methods.names() if m != "vanilla"} <= names | included


def test_chapters_are_stored_without_outputs():
    for path in chapter_sources():
        if path.suffix == ".ipynb":
            nb = json.loads(path.read_text())
            assert not any(c.get("outputs") for c in nb["cells"]), path


def test_notebook_chapters_have_a_parameters_cell():
    for path in notebook_chapters():
        nb = bookbuild.read_notebook(path)
        tagged = [c for c in nb.cells if "parameters" in c.get("metadata", {}).get("tags", [])]
        assert len(tagged) == 1, f"{path.name} needs exactly one cell tagged `parameters`"
        for name in TINY:
            assert f"{name} =" in tagged[0].source, f"{path.name}'s parameters cell lacks {name!r}"


def test_student_copies_drop_solutions_and_outputs(tmp_path):
    written = bookbuild.student_copies(ROOT, tmp_path)
    assert len(written) == len(notebook_chapters())
    for path in written:
        text = path.read_text()
        assert ":::{dropdown} Solution" not in text
        nb = json.loads(text)
        assert not any(c.get("outputs") for c in nb["cells"])
        assert not any("solution" in c["metadata"].get("tags", []) for c in nb["cells"])
        assert "BEGIN SOLUTION" not in text, "a code exercise's solution leaked into a student copy"


@pytest.mark.slow
@pytest.mark.parametrize("chapter", [p.stem for p in notebook_chapters()])
def test_chapter_executes(chapter, tiny_chapters):
    out = tiny_chapters.executed(chapter)
    print(f"{chapter}: executed in {tiny_chapters.seconds[chapter]:.1f} s")
    nb = json.loads(out.read_text())
    assert any(c.get("outputs") for c in nb["cells"] if c["cell_type"] == "code")
    # papermill's own copy of the parameters is hidden in the book; the chapter's parameters cell is not
    injected = [c for c in nb["cells"] if "injected-parameters" in c["metadata"].get("tags", [])]
    assert len(injected) == 1 and "remove-cell" in injected[0]["metadata"]["tags"]
    assert nb["metadata"]["papermill"]["parameters"] == TINY
    shown = [c for c in nb["cells"] if "parameters" in c["metadata"].get("tags", [])]
    assert len(shown) == 1 and "remove-cell" not in shown[0]["metadata"]["tags"]


def test_injected_parameters_cell_is_tagged_remove_cell(tmp_path):
    import nbformat

    nb = nbformat.v4.new_notebook(cells=[
        nbformat.v4.new_code_cell("profile = 'smoke'", metadata={"tags": ["parameters"]}),
        nbformat.v4.new_code_cell("# Parameters\nprofile = 'course'", metadata={"tags": ["injected-parameters"]}),
        nbformat.v4.new_code_cell("print(profile)")])
    path = tmp_path / "nb.ipynb"
    nbformat.write(nb, path)
    assert bookbuild.hide_injected_parameters(path) == 1
    tags = [c.metadata.get("tags", []) for c in nbformat.read(path, as_version=4).cells]
    assert tags == [["parameters"], ["injected-parameters", "remove-cell"], []]
    assert bookbuild.hide_injected_parameters(path) == 1  # idempotent: no second remove-cell tag
    assert nbformat.read(path, as_version=4).cells[1].metadata.tags == ["injected-parameters", "remove-cell"]


# -- what the executed chapters show ------------------------------------------------------------------------
def glued(notebook: dict, name: str):
    """The value a chapter glued under ``name`` (its text/plain repr evaluated), or None."""
    import ast

    for cell in notebook["cells"]:
        for out in cell.get("outputs", []):
            if out.get("metadata", {}).get("scrapbook", {}).get("name") == name:
                # shown glue stores text/plain, hidden glue (display=False) papermill's record of it
                text = next((v for k, v in out["data"].items() if k.endswith("text/plain")), "")
                text = "".join(text) if isinstance(text, list) else text
                return ast.literal_eval(text)
    return None


def comparisons(notebooks: dict) -> dict:
    """``{comparison key: {chapter: record}}`` from every chapter's glued verdict records."""
    found: dict = {}
    for chapter, nb in notebooks.items():
        for record in json.loads(glued(nb, "verdict_records") or "[]"):
            found.setdefault(record["key"], {})[chapter] = record
    return found


def test_the_consistency_check_sees_a_difference():
    one = {"cells": [{"outputs": [{"metadata": {"scrapbook": {"name": "verdict_records"}}, "data": {"text/plain": repr(
        json.dumps([{"key": "k", "diff": 1.0, "ci_low": 0.5, "ci_high": 1.5, "verdict": "above"}]))}}]}]}
    other = json.loads(json.dumps(one).replace('"ci_low\\": 0.5', '"ci_low\\": 0.4'))
    found = comparisons({"a": one, "b": other})
    assert len({json.dumps({k: v for k, v in r.items() if k != "name"}, sort_keys=True)
                for r in found["k"].values()}) == 2


def assert_same_comparisons(notebooks: dict) -> int:
    """Every comparison that several chapters make reads the same in each: interval, df and verdict."""
    shared = 0
    for key, by_chapter in comparisons(notebooks).items():
        numbers = {chapter: {k: v for k, v in record.items() if k != "name"} for chapter, record in by_chapter.items()}
        assert len({json.dumps(v, sort_keys=True) for v in numbers.values()}) == 1, (key, numbers)
        shared += len(by_chapter) > 1
    return shared


@pytest.mark.slow
def test_a_comparison_reads_the_same_in_every_chapter(tiny_chapters):
    notebooks = {p.stem: json.loads(tiny_chapters.executed(p.stem).read_text()) for p in notebook_chapters()}
    assert assert_same_comparisons(notebooks) >= 1  # KD - vanilla at least is made by several chapters


@pytest.mark.slow
def test_executed_chapters_log_nothing_and_show_each_figure_once(tiny_chapters):
    """No warning or log line on stderr, and no figure shown by pyplot besides its glue (the MLKD views
    figure appeared twice)."""
    for path in notebook_chapters():
        nb = json.loads(tiny_chapters.executed(path.stem).read_text())
        for cell in nb["cells"]:
            outputs = cell.get("outputs", [])
            assert not [o for o in outputs if o.get("output_type") == "stream" and o.get("name") == "stderr"], path.stem
            images = [o for o in outputs if "image/png" in o.get("data", {})]
            glued_images = [o for o in images if o.get("metadata", {}).get("scrapbook")]
            assert len(images) - len(glued_images) <= (0 if glued_images else 1), path.stem
