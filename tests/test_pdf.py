"""``make pdf``: the book as one PDF, built by Jupyter Book's LaTeX builder from the executed chapters.

Built from the same notebooks test_book.py executed at tiny size (conftest's ``tiny_chapters``). Needs
TeX (Debian packages in README); skipped with the missing packages printed where TeX is absent. CI does
not install TeX and skips the build (about 3 minutes of LaTeX) unless ``KDLIB_TEST_PDF=1``.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess

import pytest

from kdlib import bookbuild
from kdlib.errors import KDLibError


def test_missing_tex_is_named_with_the_apt_get_command(monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    assert "latexmk" in bookbuild.missing_pdf_tools() and "texlive-xetex" in bookbuild.missing_pdf_tools()
    with pytest.raises(KDLibError, match=r"missing .*latexmk.*apt-get install .*texlive-xetex"):
        bookbuild.check_pdf_tools()


def words(text: str) -> str:
    return " ".join(re.findall(r"[a-z0-9]+", text.lower().replace("\u2019", "'")))


@pytest.mark.slow
def test_pdf_has_every_chapter_with_figures_and_equations(tiny_chapters, tmp_path):
    if os.environ.get("CI") and not os.environ.get("KDLIB_TEST_PDF"):
        # CI does not install TeX; where the machine has it anyway, three minutes of LaTeX stay optional
        reason = "CI: the PDF is built only with KDLIB_TEST_PDF=1"
        print(f"SKIP: {reason}")
        pytest.skip(reason)
    missing = bookbuild.missing_pdf_tools()
    if missing or not shutil.which("pdftotext") or not shutil.which("pdfimages"):
        reason = f"TeX or poppler-utils missing ({', '.join(missing) or 'pdftotext'}): the PDF is not built here"
        print(f"SKIP: {reason}")
        pytest.skip(reason)
    root = tiny_chapters.root
    tiny_chapters.book()
    titles = [next(line[2:].strip() for line in bookbuild.source_of(root, name).read_text().splitlines()
                   if line.startswith("# ")) for name in bookbuild.toc_files(root)]
    pdf = bookbuild.build_pdf(root, tiny_chapters.staging, out=tmp_path, quiet=True)
    text = subprocess.run(["pdftotext", "-layout", str(pdf), "-"], capture_output=True, text=True).stdout
    flat = words(text)
    for title in titles:  # LaTeX sets ' as a typographic quote: compare the words
        assert words(title) in flat, f"chapter {title!r} is not in the PDF"
    assert "# Parameters" not in text  # papermill's injected cell is removed, as on the web pages
    # every figure of the executed chapters (shown directly or glued into the text) is in the PDF
    images = subprocess.run(["pdfimages", "-list", str(pdf)], capture_output=True, text=True).stdout
    n_images = len(images.splitlines()) - 2
    figures = sum(any(key.endswith("image/png") for key in output.get("data", {}))
                  for path in tiny_chapters.staging.glob("book/*.ipynb")
                  for cell in json.loads(path.read_text())["cells"]
                  for output in cell.get("outputs", []))
    assert n_images >= figures > 0
    # equations went to TeX as math (not as text) and were typeset with the math fonts
    tex = (pdf.parent / "book.tex").read_text()
    kd_loss = tex.index(r"\mathcal{L} = \lambda_{CE}\,\mathrm{CE}\big(p^s(1), y\big)")
    assert tex.rfind(r"\begin{equation*}", 0, kd_loss) > tex.rfind(r"\end{equation*}", 0, kd_loss)
    assert tex.count(r"\begin{equation*}") >= 10 and tex.count(r"\(") >= 100
    fonts = subprocess.run(["pdffonts", str(pdf)], capture_output=True, text=True).stdout
    assert "CMMI" in fonts and "CMEX" in fonts, "no TeX math font in the PDF"
