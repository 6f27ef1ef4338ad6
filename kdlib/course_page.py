"""The tables of the course page (``book/course.md``), written at build time from what the build measured.

``book/course.md`` includes ``_course_tables.md``, which :func:`write_tables` writes into the staged book
just before the HTML is built: the code exercises of every chapter (from :mod:`kdlib.exercises`, so the
page cannot drift from the checks), and how long each chapter took to execute *in this build* (papermill's
own record in each executed notebook), next to an estimate for the ``course`` profile scaled from those
times by the README's measured per-epoch costs.
"""
from __future__ import annotations

import datetime as _dt
import os
import platform
from pathlib import Path
from typing import Dict, List, Optional

TABLES = "_course_tables.md"
#: the README's course-profile estimate (measured on a CIFAR-100 fixture in the official layout and scaled
#: per image): a make book PROFILE=course takes about 10.5 CPU hours, 5 to 6 hours on a 2-core laptop
COURSE_BOOK_HOURS = (5.0, 6.0)


def _duration(path: Path) -> Optional[tuple]:
    import nbformat

    try:
        meta = nbformat.read(path, as_version=4).metadata["papermill"]
        return float(meta["duration"]), dict(meta.get("parameters", {}))
    except (OSError, KeyError, ValueError, TypeError):
        return None


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def exercise_rows(chapters: List[str]) -> List[str]:
    from kdlib import exercises

    rows = ["| chapter | exercise | what it practises | points |", "|---|---|---|---:|"]
    for chapter in chapters:
        for ex in exercises.for_chapter(chapter):
            rows.append(f"| {{doc}}`{chapter}` | {ex.title} (`{ex.signature}`) | {ex.practises} | "
                        f"{len(ex.parts)} |")
    return rows


def time_rows(staging: Path, chapters: List[str]) -> List[str]:
    found: Dict[str, tuple] = {}
    for chapter in chapters:
        got = _duration(staging / "book" / f"{chapter}.ipynb")
        if got is not None:
            found[chapter] = got
    if not found:
        return ["No chapter of this build has been executed yet: the times appear once `make book` has run."]
    total = sum(seconds for seconds, _ in found.values())
    profiles = sorted({str(p.get("profile", "?")) for _, p in found.values()})
    others = sorted({k for _, p in found.values() for k in p if k != "profile"})
    label = (f"Measured in the build you are reading ({_dt.date.today().isoformat()}; {os.cpu_count()} cores, "
             f"{_cpu()}; profile {', '.join(profiles)}"
             + (f"; parameters other than the defaults: {', '.join(others)}" if others else "") + ").")
    lo, hi = COURSE_BOOK_HOURS
    rows = [label, "",
            "| chapter | executed in this build | `course` profile on a 2-core laptop (estimate) |",
            "|---|---:|---:|"]
    for chapter, (seconds, _) in found.items():
        share = seconds / total if total else 0.0
        rows.append(f"| {{doc}}`{chapter}` | {seconds / 60:.1f} min | {share * lo * 60:.0f}–{share * hi * 60:.0f} min |")
    rows.append(f"| all | {total / 60:.1f} min | {lo:g}–{hi:g} h |")
    return rows


def write_tables(staging: Path, chapters: List[str]) -> Path:
    """Write ``_course_tables.md`` beside the staged ``course.md``; returns its path."""
    text = "\n".join(["### The code exercises", "", *exercise_rows(chapters), "",
                      "### How long each chapter takes", "", *time_rows(staging, chapters), ""])
    target = staging / "book" / TABLES
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(text)
    return target
