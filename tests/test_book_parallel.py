"""`kdlib book` executes the chapters between the first and the last side by side, longest first, each
with one torch thread and its runs trained in its own process; a failing chapter stops the build by name.

Checked on a throw-away book of five small notebooks that record the environment they ran in.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import nbformat
import pytest

from kdlib import bookbuild
from kdlib.errors import KDLibError

CHAPTER = """---
jupytext:
  text_representation:
    extension: .md
    format_name: myst
    format_version: 0.13
kernelspec:
  display_name: Python 3
  language: python
  name: python3
{front}---

# {name}

```{{code-cell}} ipython3
:tags: [parameters]
profile = "smoke"
```

```{{code-cell}} ipython3
import json, os, time
{body}
print(json.dumps({{"name": "{name}", "omp": os.environ.get("OMP_NUM_THREADS"),
                  "workers": os.environ.get("KDLIB_RUN_WORKERS"), "profile": profile,
                  "start": time.time()}}))
```
"""


def make_book(root: Path, chapters: dict) -> None:
    """chapters: name -> (front matter lines, code run before the record is printed)."""
    (root / "book").mkdir(parents=True)
    toc = {"format": "jb-book", "root": "book/index", "chapters": [{"file": f"book/{n}"} for n in chapters]}
    (root / "_toc.yml").write_text(json.dumps(toc))
    (root / "_config.yml").write_text("title: t\n")
    (root / "kdlib").mkdir()  # stage() copies the library's source beside the chapters
    (root / "book" / "index.md").write_text("# index\n")
    for name, (front, body) in chapters.items():
        (root / "book" / f"{name}.md").write_text(CHAPTER.format(name=name, front=front, body=body))


def args(root: Path, **changes) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    bookbuild.add_arguments(parser)
    namespace = parser.parse_args(["--root", str(root), "--no-html", "-p", "profile", "smoke"])
    for key, value in changes.items():
        setattr(namespace, key, value)
    return namespace


def record(root: Path, name: str) -> dict:
    nb = nbformat.read(root / bookbuild.STAGING / "book" / f"{name}.ipynb", as_version=4)
    text = "".join(o.get("text", "") for c in nb.cells for o in c.get("outputs", []) if o.get("name") == "stdout")
    return json.loads(text.strip().splitlines()[-1])


@pytest.mark.slow
def test_middle_chapters_run_side_by_side_longest_first(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("KDLIB_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("KDLIB_RUN_WORKERS", raising=False)
    make_book(tmp_path, {
        "first": ("", ""),
        "short": ("kdlib:\n  build_seconds: 10\n", "time.sleep(1)"),
        "long": ("kdlib:\n  build_seconds: 300\n", "time.sleep(4)"),
        "middle": ("kdlib:\n  build_seconds: 60\n", "time.sleep(1)"),
        "last": ("", ""),
    })
    assert bookbuild.run(args(tmp_path, jobs=2)) == 0
    out = capsys.readouterr().out
    assert "executing 3 chapters, 2 at a time with 1 thread each: book/long, book/middle, book/short" in out
    rec = {n: record(tmp_path, n) for n in ("first", "short", "long", "middle", "last")}
    for name in ("short", "long", "middle"):  # one thread each, runs trained one by one in the chapter
        assert (rec[name]["omp"], rec[name]["workers"]) == ("1", "1")
        assert rec[name]["profile"] == "smoke"
    for name in ("first", "last"):  # alone, with the build's own settings
        assert (rec[name]["omp"], rec[name]["workers"]) == (None, None)
    # side by side: "middle" started while "long" (4 s) still ran; the last chapter after all of them
    assert rec["middle"]["start"] < rec["long"]["start"] + 4
    assert rec["last"]["start"] > max(rec[n]["start"] for n in ("short", "long", "middle"))
    assert rec["first"]["start"] < min(rec[n]["start"] for n in ("short", "long", "middle"))


@pytest.mark.slow
def test_one_job_runs_the_chapters_in_order_in_this_process(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("KDLIB_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    make_book(tmp_path, {n: ("", "") for n in ("a", "b", "c", "d")})
    assert bookbuild.run(args(tmp_path, jobs=1)) == 0
    starts = [record(tmp_path, n)["start"] for n in ("a", "b", "c", "d")]
    assert starts == sorted(starts) and all(record(tmp_path, n)["omp"] is None for n in "abcd")
    assert "side by side" not in capsys.readouterr().out


@pytest.mark.slow
def test_a_failing_side_by_side_chapter_stops_the_build_by_name(tmp_path, monkeypatch):
    monkeypatch.setenv("KDLIB_HOME", str(tmp_path / "home"))
    make_book(tmp_path, {"first": ("", ""), "ok": ("", ""), "broken": ("", "raise ValueError('no data here')"),
                         "last": ("", "")})
    with pytest.raises(KDLibError, match=r"chapter book/broken failed[\s\S]*no data here"):
        bookbuild.run(args(tmp_path, jobs=2))
    assert not (tmp_path / bookbuild.STAGING / "book" / "last.ipynb").exists()  # never started


def test_jobs_must_be_positive(tmp_path):
    make_book(tmp_path, {"a": ("", "")})
    with pytest.raises(KDLibError, match="--jobs must be at least 1"):
        bookbuild.run(args(tmp_path, jobs=0))


def test_expected_seconds_prefers_the_last_build(tmp_path):
    make_book(tmp_path, {"a": ("kdlib:\n  build_seconds: 42\n", "")})
    src, dst = tmp_path / "book" / "a.md", tmp_path / "a.ipynb"
    assert bookbuild.expected_seconds(src, dst) == 42  # no earlier build: the front matter's estimate
    nb = nbformat.v4.new_notebook()
    nb.metadata["papermill"] = {"duration": 7.5}
    nbformat.write(nb, dst)
    assert bookbuild.expected_seconds(src, dst) == 7.5
    make_book(tmp_path / "other", {"b": ("", "")})
    assert bookbuild.expected_seconds(tmp_path / "other" / "book" / "b.md", tmp_path / "none.ipynb") == 0
