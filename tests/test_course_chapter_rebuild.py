"""Re-executing a chapter shows the result: `make chapter` rebuilds the HTML with the page labelled by the
parameters it ran with, and `make book KEEP=<chapter>` keeps that execution instead of redoing it.

Checked on a throw-away book of small notebooks (test_book_parallel.py's), the HTML build replaced by a
recorder (test_pages.py builds the real HTML and checks every page in a browser).
"""
from __future__ import annotations

import nbformat
import pytest

from kdlib import bookbuild
from kdlib.errors import KDLibError
from test_book_parallel import args, make_book


@pytest.fixture
def book(tmp_path, monkeypatch):
    make_book(tmp_path, {"a": ("", ""), "b": ("", "")})
    built = []
    monkeypatch.setattr(bookbuild, "build_html", lambda root, staging, out=None, quiet=False: built.append(
        sorted(p.name for p in (staging / "book").glob("*.ipynb"))) or staging / "index.html")
    return tmp_path, built


def executed(root, name):
    return nbformat.read(root / bookbuild.STAGING / "book" / f"{name}.ipynb", as_version=4)


def notes(nb):
    return [c.source for c in nb.cells if bookbuild.PARAMETERS_TAG in c.metadata.get("tags", [])]


@pytest.mark.slow
def test_make_chapter_rebuilds_the_html_with_the_parameters_on_the_page(book):
    root, built = book
    assert bookbuild.run(args(root, only=["b"], no_html=False, parameter=[["profile", "smoke"],
                                                                          ["seeds", "[0, 1, 2]"]], jobs=1)) == 0
    assert built == [["a.ipynb", "b.ipynb"]], "the HTML book must be built again, every page staged"
    nb = executed(root, "b")
    (note,) = notes(nb)
    assert "`seeds = [0, 1, 2]`" in note and "make chapter CHAPTER=b PARAMS=\"-p seeds '[0, 1, 2]'\"" in note
    assert "make book KEEP=b" in note
    assert nb.cells[0].source.startswith("# b") and nb.cells[1].source == note  # right under the title
    assert not notes(executed(root, "a")), "a chapter not executed yet is staged from its source"
    assert nb.metadata.papermill.parameters["seeds"] == [0, 1, 2]


@pytest.mark.slow
def test_make_book_keeps_a_chapter_when_asked_and_redoes_it_otherwise(book, capsys):
    root, built = book
    bookbuild.run(args(root, only=["b"], no_html=False, parameter=[["profile", "smoke"], ["seeds", "[7]"]], jobs=1))
    bookbuild.run(args(root, keep=["b"], no_html=False, jobs=1))
    assert "book/b: kept as executed with" in capsys.readouterr().out
    assert executed(root, "b").metadata.papermill.parameters["seeds"] == [7] and notes(executed(root, "b"))
    assert not notes(executed(root, "a"))  # executed with the defaults: no note
    bookbuild.run(args(root, keep=["all"], no_html=False, jobs=1))
    assert executed(root, "b").metadata.papermill.parameters["seeds"] == [7]
    bookbuild.run(args(root, no_html=False, jobs=1))  # not asked: executed again with the defaults
    assert "seeds" not in executed(root, "b").metadata.papermill.parameters and not notes(executed(root, "b"))


def test_keep_refuses_an_unknown_chapter(book):
    root, _ = book
    with pytest.raises(KDLibError, match="--keep: unknown chapter 'book/zz'"):
        bookbuild.run(args(root, keep=["zz"], jobs=1))
