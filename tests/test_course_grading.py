"""The instructor's path, end to end: `make course` builds the nbgrader course from the chapters, and
nbgrader's own autograde step grades three submissions per assignment.

* the instructor's solutions: full marks;
* the untouched release: zero, without a crash (every cell runs; the checks print, the tests fail);
* a submission with one planted mistake: partial marks, and the check's sentence in nbgrader's feedback.

The assignments are light (random logits, no training), so the whole grading takes seconds per notebook.
"""
from __future__ import annotations

import html
import json
import re
import shutil
from pathlib import Path

import pytest

from kdlib import course, exercises

ROOT = Path(__file__).resolve().parent.parent

def planted(chapter: str):
    """The planted mistake of a chapter's assignment, whatever the instructor's solution says: lines added
    under the solution of one exercise that wrap it (``(exercise, source to append, the check's sentence)``).

    The first exercise with a temperature is divided by T², which is right at T = 1 (the ``T = 1`` part
    still scores); a chapter without one gets its first exercise doubled (its other exercise scores)."""
    chosen = [e for e in exercises.for_chapter(chapter) if "temperature" in e.args] or exercises.for_chapter(chapter)
    ex = chosen[0]
    args = ", ".join(ex.args)
    factor = "/ temperature**2" if "temperature" in ex.args else "* 2"
    source = (f"\n\n_right_{ex.name} = {ex.name}\n\n\ndef {ex.name}({args}):\n"
              f"    return _right_{ex.name}({args}) {factor}\n")

    def wrong(**kw):  # the same mistake on kdlib's own answer: the sentence the check says
        value = ex.reference(**kw)
        return value / kw["temperature"] ** 2 if "temperature" in ex.args else value * 2

    return ex.name, source, exercises.check(ex.name, wrong).message


STUDENTS = ("instructor", "untouched", "planted")


def grade_chapters(folder: Path, chapters: list) -> dict:
    """Build the assignments of ``chapters`` in the course folder ``folder``, autograde the three
    submissions of each with nbgrader and write the feedback; returns ``{chapter: {student: score, "max": m}}``.
    Runs in a process of its own (see the fixture)."""
    import nbformat
    from nbgrader.api import Gradebook

    released = course.build_course(ROOT, folder, chapters)
    api = course.nbgrader_api(folder)
    for chapter, release in released.items():
        source = folder / "source" / chapter / f"{chapter}.ipynb"
        wrong = nbformat.read(source, as_version=4)
        name, lines, _ = planted(chapter)
        (hit,) = [c for c in wrong.cells if c.get("metadata", {}).get("nbgrader", {}).get("grade_id") == f"{name}-solution"]
        hit.source += lines
        submissions = {"instructor": nbformat.read(source, as_version=4),
                       "untouched": nbformat.read(release, as_version=4), "planted": wrong}
        for student, nb in submissions.items():
            target = folder / "submitted" / student / chapter / f"{chapter}.ipynb"
            target.parent.mkdir(parents=True, exist_ok=True)
            nbformat.write(nb, target)
            course._checked(api.autograde(chapter, student, force=True, create=True), f"autograde {chapter}")
            if student != "instructor":
                course._checked(api.generate_feedback(chapter, student, force=True), f"feedback {chapter}")
    with Gradebook(f"sqlite:///{folder / 'gradebook.db'}") as gb:
        return {chapter: {"max": gb.find_assignment(chapter).max_score,
                          **{s: gb.find_submission(chapter, s).score for s in STUDENTS}} for chapter in released}


@pytest.fixture(scope="module")
def graded(tmp_path_factory):
    """Every assignment graded; alone, the chapters split between two processes, each with its own course
    folder and gradebook (a kernel per submission mostly imports torch: two cores halve the wait). Beside
    another xdist worker (``KDLIB_RUN_WORKERS=1``, tests/conftest.py) one process grades them all: the
    other core is taken."""
    import multiprocessing
    import os
    from concurrent.futures import ProcessPoolExecutor

    chapters = list(course.chapters_with_exercises(ROOT))
    halves = [chapters] if os.environ.get("KDLIB_RUN_WORKERS") == "1" else [chapters[0::2], chapters[1::2]]
    folders = [tmp_path_factory.mktemp(f"course{i}") for i in range(len(halves))]
    with ProcessPoolExecutor(len(halves), mp_context=multiprocessing.get_context("spawn")) as pool:
        jobs = [pool.submit(grade_chapters, folder, half) for folder, half in zip(folders, halves) if half]
        scores = {k: v for job in jobs for k, v in job.result().items()}
    where = {chapter: folder for folder, half in zip(folders, halves) for chapter in half}
    return where, scores


def test_every_chapter_with_exercises_is_an_assignment_with_a_planted_mistake():
    chapters = set(course.chapters_with_exercises(ROOT))
    assert {e.chapter for e in exercises.EXERCISES.values()} == chapters, "an exercise is not in its chapter"
    for chapter in chapters:
        name, lines, sentence = planted(chapter)
        assert f"def {name}(" in lines and not sentence.startswith("Values agree"), (chapter, sentence)


@pytest.mark.slow
@pytest.mark.xdist_group("course_grading")
def test_release_has_no_solutions_and_no_hidden_tests(graded):
    where, _ = graded
    for chapter, folder in where.items():
        release = (folder / "release" / chapter / f"{chapter}.ipynb").read_text()
        source = (folder / "source" / chapter / f"{chapter}.ipynb").read_text()
        assert "BEGIN SOLUTION" not in release and "raise NotImplementedError()" in release
        assert "exercises.grade(" not in release, f"{chapter}: a hidden test leaked into the release"
        assert "exercises.grade(" in source and "BEGIN HIDDEN TESTS" in source


@pytest.mark.slow
@pytest.mark.xdist_group("course_grading")
def test_autograde_full_zero_and_partial_marks_with_the_sentence(graded):
    where, scores = graded
    assert set(scores) == set(course.chapters_with_exercises(ROOT))
    for chapter, folder in where.items():
        got = scores[chapter]
        assert got["max"] >= 2, chapter
        assert got["instructor"] == got["max"], (chapter, got)
        assert got["untouched"] == 0, (chapter, got)
        assert 0 < got["planted"] < got["max"], (chapter, got)
        feedback = folder / "feedback" / "planted" / chapter / f"{chapter}.html"
        text = html.unescape(re.sub(r"<[^>]+>", "", feedback.read_text()))
        assert planted(chapter)[2] in text, f"{chapter}: the check's sentence is not in the feedback"
        untouched = folder / "feedback" / "untouched" / chapter / f"{chapter}.html"
        assert "Not done yet" in html.unescape(re.sub(r"<[^>]+>", "", untouched.read_text()))
        # the untouched notebook ran to the end: every check cell printed its verdict, none crashed
        autograded = json.loads((folder / "autograded" / "untouched" / chapter / f"{chapter}.ipynb").read_text())
        checks = [c for c in autograded["cells"]
                  if c["metadata"].get("nbgrader", {}).get("grade_id", "").endswith("-check")]
        assert checks and all(c["outputs"] and not any(o["output_type"] == "error" for o in c["outputs"])
                              for c in checks)


def test_the_course_command_refuses_an_unknown_chapter(tmp_path):
    from kdlib.errors import KDLibError

    with pytest.raises(KDLibError, match="no code exercises in chapter 'index'"):
        course.build_course(ROOT, tmp_path, ["index"])
    shutil.rmtree(tmp_path, ignore_errors=True)
