"""The course page's tables: every exercise of every chapter, and the chapter times this build measured."""
from __future__ import annotations

from pathlib import Path

import nbformat

from kdlib import bookbuild, course_page, exercises

ROOT = Path(__file__).resolve().parent.parent


def test_course_page_is_in_the_book_and_includes_the_tables():
    assert "book/course" in bookbuild.toc_files(ROOT)
    assert f"{{include}} {course_page.TABLES}" in (ROOT / "book" / "course.md").read_text()


def test_tables_list_every_exercise_and_the_measured_times(tmp_path):
    staging = tmp_path / "staging"
    (staging / "book").mkdir(parents=True)
    for chapter, seconds in (("kd", 60.0), ("dkd", 180.0)):
        nb = nbformat.v4.new_notebook(metadata={"papermill": {"duration": seconds,
                                                              "parameters": {"profile": "smoke"}}})
        nbformat.write(nb, staging / "book" / f"{chapter}.ipynb")
    chapters = ["kd", "dkd", "cwkd", "clkd", "rekd", "aekt", "dlkd", "logit_family"]
    text = course_page.write_tables(staging, chapters).read_text()
    for ex in exercises.EXERCISES.values():
        assert f"`{ex.signature}`" in text and ex.practises in text
    assert "| {doc}`kd` | 1.0 min | 75–90 min |" in text  # a quarter of 5-6 h: an estimate, split by time
    assert "| {doc}`dkd` | 3.0 min | 225–270 min |" in text and "| all | 4.0 min | 5–6 h |" in text
    assert "{doc}`cwkd` | " not in text.split("How long")[1], "a chapter not executed has no time"
    assert "profile smoke" in text


def test_without_executed_chapters_the_page_says_so(tmp_path):
    text = course_page.write_tables(tmp_path, ["kd"]).read_text()
    assert "No chapter of this build has been executed yet" in text
