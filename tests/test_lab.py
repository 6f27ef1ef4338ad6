"""The chapters in JupyterLab (`make lab`): lab copies read as the book reads, checked in a real JupyterLab.

Fast checks on the copies themselves (no glue, doc or literalinclude directive left, every inline value
filled in from the executed chapter, student copies without solutions and outputs), then the reader's path:
JupyterLab started headless on the lab copies, the KD chapter opened in Chromium (Debian's chromium and
chromedriver, driven by selenium as in test_pages.py; skipped with the reason where they are missing),
the rendered page searched for raw MyST roles and directives, and the exercises' cells run from the page
with the keyboard until every check cell shows its verdict.
"""
from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from kdlib import course

ROOT = Path(__file__).resolve().parent.parent
RAW_ROLE = re.compile(r"\{(?:glue(?::\w+)?|doc|eval|literalinclude|code-cell|numref|ref)\}`?|```")
CHAPTER = "kd"


@pytest.fixture(scope="module")
def lab_dir(tiny_chapters, tmp_path_factory):
    """The lab copies of every chapter, KD's from its executed copy (the session's tiny KD chapter)."""
    tiny_chapters.executed(CHAPTER)
    out = tmp_path_factory.mktemp("lab")
    course.write_lab_copies(ROOT, out, staging=tiny_chapters.staging)
    return out


def _markdown(nb):
    return [c for c in nb.cells if c.cell_type == "markdown"]


@pytest.mark.slow  # the tiny KD chapter executed
@pytest.mark.xdist_group("lab")
def test_lab_copy_has_no_book_only_syntax_and_every_value_filled_in(lab_dir):
    import nbformat

    nb = nbformat.read(lab_dir / f"{CHAPTER}.ipynb", as_version=4)
    text = "\n".join(c.source for c in _markdown(nb))
    for raw in ("{glue:text}", "{glue:figure}", "{doc}", "{literalinclude}"):
        assert raw not in text, f"{raw} left in the lab copy"
    evals = re.findall(r"\{eval\}`([^`]+)`", text)
    filled = {e["expression"]: e["result"] for c in _markdown(nb) for e in c.metadata.get("user_expressions", [])}
    assert evals and set(evals) <= set(filled), "an inline value has no pre-computed result"
    assert all(r["status"] == "ok" for r in filled.values())
    label = next(r for e, r in filled.items() if "'label'" in e)["data"]["text/plain"]
    assert "smoke profile" in label and not label.startswith("'[")
    figures = [r for e, r in filled.items() if "'fig_" in e]
    assert figures and all("image/png" in r["data"] for r in figures)
    assert "def kd_loss(student_logits: Tensor, teacher_logits: Tensor" in text  # literalinclude inlined
    assert "[Benchmark" in text or "(benchmark.ipynb)" in text  # {doc} became a link to the notebook
    hidden = [c for c in nb.cells if "hide-input" in c.metadata.get("tags", [])]
    assert hidden and all(c.metadata["jupyter"]["source_hidden"] for c in hidden)


def test_lab_values_are_what_the_kernel_glued():
    """The {eval} expression reads the value a chapter glued in this kernel, formatted as glue:text does."""
    from kdlib import experiments as ex
    from kdlib.glued import GLUED

    GLUED.pop("x_demo", None)
    expression = course.EVAL_TEXT.format(key="x_demo", fmt=".2f")
    assert "run the cells above" in eval(expression)
    ex.glue("x_demo", 0.12345)
    assert eval(expression) == "0.12"
    assert course.format_value({"text/plain": "0.12345"}, ".2f") == "0.12"
    assert course.format_value({"text/plain": "'a sentence'"}, "") == "a sentence"


@pytest.mark.slow  # the tiny KD chapter executed
@pytest.mark.xdist_group("lab")
def test_a_changed_lab_copy_is_kept(lab_dir, tiny_chapters, capsys):
    import nbformat

    path = lab_dir / "dkd.ipynb"
    nb = nbformat.read(path, as_version=4)
    nb.cells[0].source += "\n\nmy notes"
    nbformat.write(nb, path)
    course.write_lab_copies(ROOT, lab_dir, staging=tiny_chapters.staging)
    assert "my notes" in path.read_text() and "kept" in capsys.readouterr().out


def test_student_copies_have_stubs_and_no_outputs_or_solutions(tmp_path):
    import nbformat

    course.write_lab_copies(ROOT, tmp_path, student=True, staging=tmp_path / "nothing-executed")
    nb = nbformat.read(tmp_path / f"{CHAPTER}.ipynb", as_version=4)
    text = json.dumps(nb)
    assert "BEGIN SOLUTION" not in text and ":::{dropdown} Solution" not in text
    assert not any(c.get("outputs") for c in nb.cells if c.cell_type == "code")
    solutions = [c for c in nb.cells if "exercise" in c.metadata.get("tags", [])]
    assert solutions and all("raise NotImplementedError()" in c.source for c in solutions)


# -- JupyterLab in Chromium ------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def jupyterlab(lab_dir, tmp_path_factory):
    """JupyterLab serving the lab copies on 127.0.0.1 (token auth), with the tests' own settings."""
    settings = tmp_path_factory.mktemp("lab-settings")
    # every cell rendered (no windowing, so the page can be searched whole); no news fetched
    (settings / "@jupyterlab" / "notebook-extension").mkdir(parents=True)
    (settings / "@jupyterlab" / "notebook-extension" / "tracker.jupyterlab-settings").write_text(
        json.dumps({"windowingMode": "none"}))
    (settings / "@jupyterlab" / "apputils-extension").mkdir(parents=True)
    (settings / "@jupyterlab" / "apputils-extension" / "notification.jupyterlab-settings").write_text(
        json.dumps({"fetchNews": "false", "checkForUpdates": False}))
    port, token = _free_port(), "kdlib-test"
    home = tmp_path_factory.mktemp("lab-home")
    env = {**os.environ, "JUPYTERLAB_SETTINGS_DIR": str(settings), "JUPYTER_RUNTIME_DIR": str(home / "runtime"),
           "KDLIB_HOME": str(home / "kdlib"), "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    log = open(home / "jupyterlab.log", "w")
    server = subprocess.Popen(
        [sys.executable, "-m", "jupyterlab", "--no-browser", f"--port={port}", "--ip=127.0.0.1",
         f"--ServerApp.token={token}", f"--ServerApp.root_dir={lab_dir}", "--ServerApp.open_browser=False"]
        + (["--allow-root"] if os.geteuid() == 0 else []),
        env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(240):
            try:
                urllib.request.urlopen(f"{url}/api/status?token={token}", timeout=2)
                break
            except OSError:
                if server.poll() is not None:
                    raise RuntimeError(f"JupyterLab exited: {(home / 'jupyterlab.log').read_text()[-2000:]}")
                time.sleep(0.5)
        else:
            raise RuntimeError("JupyterLab did not answer within 2 minutes")
        yield url, token
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()


@pytest.fixture(scope="module")
def browser():
    from test_pages import CHROMIUM_FLAGS, chromium_driver

    # 127.0.0.1 must resolve: the page is served locally; every other name stays unresolvable
    flags = [f for f in CHROMIUM_FLAGS if not f.startswith("--host-resolver-rules")]
    yield from chromium_driver(flags + ["--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1"], timeout=120)


RENDERED_TEXT_JS = r"""
const cells = Array.from(document.querySelectorAll('.jp-MarkdownCell.jp-mod-rendered'));
return {count: cells.length, text: cells.map(c => c.innerText).join('\n'),
        errors: document.querySelectorAll('.myst-RenderedExpressionError, [data-mime-type="application/vnd.jupyter.stderr"]').length};
"""


def _wait(driver, condition, seconds, what):
    end = time.time() + seconds
    while time.time() < end:
        value = driver.execute_script(condition)
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.slow
@pytest.mark.xdist_group("lab")
def test_chapter_reads_right_in_jupyterlab_and_its_checks_run(jupyterlab, browser, lab_dir):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    url, token = jupyterlab
    driver = browser
    driver.get(f"{url}/lab/tree/{CHAPTER}.ipynb?token={token}")
    _wait(driver, "return document.querySelectorAll('.jp-MarkdownCell.jp-mod-rendered').length > 10", 180,
          "the notebook's rendered Markdown cells")
    time.sleep(2)  # let the MyST renderer finish every cell
    page = driver.execute_script(RENDERED_TEXT_JS)
    raw = RAW_ROLE.search(page["text"])
    assert raw is None, f"raw MyST left on the page: {page['text'][max(raw.start() - 60, 0):raw.end() + 60]!r}"
    assert "glued.value(" not in page["text"], "an inline value shows its expression instead of its value"
    assert page["errors"] == 0
    assert "smoke profile" in page["text"]  # a glued value (the data label) reads as a value

    # run the exercises: from the set-up cell, Shift+Enter through to the last check cell
    cells = driver.find_elements(By.CSS_SELECTOR, ".jp-Notebook .jp-Cell")
    sources = driver.execute_script(
        "return Array.from(document.querySelectorAll('.jp-Notebook .jp-Cell')).map("
        "c => (c.querySelector('.jp-InputArea-editor') || c).innerText)")
    setup = next(i for i, s in enumerate(sources) if "from kdlib import exercises" in s)
    last = max(i for i, s in enumerate(sources) if "exercises.check(" in s)
    driver.execute_script("arguments[0].scrollIntoView()", cells[setup])
    cells[setup].find_element(By.CSS_SELECTOR, ".jp-InputPrompt").click()
    for _ in range(last - setup + 1):
        ActionChains(driver).key_down(Keys.SHIFT).send_keys(Keys.ENTER).key_up(Keys.SHIFT).perform()
        time.sleep(0.3)
    verdicts = _wait(driver, f"""
        const cells = Array.from(document.querySelectorAll('.jp-Notebook .jp-Cell'));
        const checks = cells.slice({setup}, {last + 1}).filter(c => c.innerText.includes('exercises.check('));
        const out = checks.map(c => (c.querySelector('.jp-OutputArea') || {{innerText: ''}}).innerText);
        return out.every(t => t.includes('right') || t.includes('not yet') || t.includes('Error')) ? out : null;
        """, 180, "the check cells' verdicts")
    from kdlib import exercises

    assert len(verdicts) == len(exercises.for_chapter(CHAPTER)) and all("✔ right" in v for v in verdicts), verdicts
