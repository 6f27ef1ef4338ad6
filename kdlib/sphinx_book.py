"""A Sphinx extension for the book's HTML pages: offline, and readable at the theme's width.

* Jupyter Book always loads ``sphinx_thebe``, even with thebe switched off, and with Sphinx 7.4 its
  configuration script lands twice on every page (``const THEBE_JS_URL`` declared twice: a console error
  on every page) and names a script on a CDN. The book is read offline and has no live code, so thebe's
  scripts and stylesheet are dropped from every page.
* Text output (each chapter's label line, the engine's log) wraps at the text column instead of running
  off to the right of a scroll box, where the end of the label (epochs, seeds) was hidden.

Listed in ``_config.yml`` under ``sphinx.extra_extensions``.
"""
from __future__ import annotations

from pathlib import Path

CSS_FILE = "kdlib-book.css"
CSS = """\
/* kdlib.sphinx_book: text output wraps at the column (the label line names dataset, profile, epochs, seeds) */
div.cell_output div.output pre,
div.cell_output div.output.stream pre,
div.cell_output div.output.text_plain pre {
  white-space: pre-wrap;
  overflow-wrap: anywhere;
}
"""


def _is_thebe(asset) -> bool:
    name = str(getattr(asset, "filename", None) or asset)
    body = str(getattr(asset, "attributes", {}).get("body", ""))
    return "thebe" in name.lower() or "THEBE_JS_URL" in body


def drop_thebe(app, pagename, templatename, context, doctree) -> None:
    for key in ("script_files", "css_files"):
        if key in context:
            context[key] = [asset for asset in context[key] if not _is_thebe(asset)]


def write_css(app, exception) -> None:
    if exception is None and app.builder.format == "html":
        static = Path(app.outdir) / "_static"
        static.mkdir(parents=True, exist_ok=True)
        (static / CSS_FILE).write_text(CSS)


def setup(app):
    app.connect("html-page-context", drop_thebe)
    app.add_css_file(CSS_FILE)
    app.connect("build-finished", write_css)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
