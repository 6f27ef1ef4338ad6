"""The book as a reader gets it: every page of the built HTML opened in headless Chromium, offline.

The HTML is built (``jupyter-book build``, execution off, as ``make book`` does) from the chapters that
test_book.py executed at tiny size (conftest's ``tiny_chapters``: nothing is executed twice). Chromium
opens every page from ``file://`` with every host name unresolvable, as on a laptop without a network,
and for each page the test checks what a reader would see:

* the equations are typeset: every Sphinx math element holds MathJax's output and no raw TeX delimiter
  (``\\(``, ``\\[``, ``$$``) is left in the text outside code;
* every image has loaded (natural width > 0);
* the console has no error;
* every link into the book resolves (the file exists; an ``#anchor`` exists on its page);
* no request leaves the machine (Chromium's network log and the page's resource entries are all file:).

A screenshot of one chapter is kept in ``_build/test-artifacts/`` for a person to look at.

Chromium comes from Debian (``chromium`` + ``chromium-driver``; ``.ci/run`` installs both when missing).
Without them the test is skipped with the reason printed.
"""
from __future__ import annotations

import base64
import json
import re
import shutil
import tempfile
import time
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest

from kdlib import bookbuild

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "_build" / "test-artifacts"
SCREENSHOT_CHAPTER = "kd"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--window-size=1280,1000",
                  # the network as on a laptop in a classroom: no name resolves, so a page that needs
                  # anything from outside fails visibly here instead of quietly fetching it
                  "--host-resolver-rules=MAP * ~NOTFOUND"]

# Text of the page outside code, math output and scripts, and what MathJax left in it.
PAGE_FACTS_JS = r"""
const skip = el => el.closest('pre, code, script, style, mjx-container, .highlight, .MathJax');
const walker = document.createTreeWalker(document.body, NodeFilter.SHOW_TEXT);
let text = [];
for (let n = walker.nextNode(); n; n = walker.nextNode()) {
  const el = n.parentElement;
  if (el && !skip(el) && el.getClientRects().length) text.push(n.textContent);
}
const maths = Array.from(document.querySelectorAll('span.math, div.math'));
const images = Array.from(document.images).map(i => ({src: i.currentSrc || i.src, complete: i.complete,
                                                      width: i.naturalWidth}));
return {
  text: text.join(' '),
  maths: maths.length,
  untypeset: maths.filter(m => !m.querySelector('mjx-container')).map(m => m.textContent.slice(0, 80)),
  mjx: document.querySelectorAll('mjx-container').length,
  images: images,
  links: Array.from(document.querySelectorAll('a[href]')).map(a => a.href),
  ids: Array.from(document.querySelectorAll('[id]')).map(e => e.id)
       .concat(Array.from(document.querySelectorAll('a[name]')).map(a => a.name)),
  resources: performance.getEntriesByType('resource').map(e => e.name),
};
"""
# Wait until MathJax (if the page loads it) has typeset the page; true when it did.
MATHJAX_DONE_JS = r"""
const done = arguments[arguments.length - 1];
const wait = (t) => {
  if (!document.querySelector('script[src*="mathjax"]')) { done(false); }  // a page without equations
  else if (window.MathJax && MathJax.startup && MathJax.startup.promise) {
    MathJax.startup.promise.then(() => done(true), (e) => done('MathJax failed: ' + e));
  } else if (t > 100) { done(false); } else { setTimeout(() => wait(t + 1), 50); }
};
if (document.readyState === 'complete') wait(0); else window.addEventListener('load', () => wait(0));
"""
RAW_TEX = re.compile(r"\\\(|\\\)|\\\[|\\\]|\$\$|\\(?:frac|mathrm|mathcal|sum|begin|left|right)\b")


def find_chromium():
    """(chromium, chromedriver) paths, or (None, reason)."""
    browser = next((shutil.which(n) for n in ("chromium", "chromium-browser") if shutil.which(n)), None)
    driver = shutil.which("chromedriver") or ("/usr/bin/chromedriver"
                                              if Path("/usr/bin/chromedriver").exists() else None)
    if browser is None or driver is None:
        missing = [n for n, p in (("chromium", browser), ("chromium-driver", driver)) if p is None]
        return None, f"headless Chromium not found (apt-get install {' '.join(missing)}; .ci/run does)"
    return (browser, driver), ""


@pytest.fixture(scope="module")
def html_book(tiny_chapters, tmp_path_factory):
    """The HTML book built from the chapters executed at tiny size; returns the html folder."""
    tiny_chapters.book()
    out = tmp_path_factory.mktemp("html")
    index = bookbuild.build_html(tiny_chapters.root, tiny_chapters.staging, out=out, quiet=True)
    return index.parent


def chromium_driver(flags=CHROMIUM_FLAGS, timeout: float = 60, logging: bool = False):
    """Headless Chromium driven by selenium with its own profile folder, as a generator for a fixture
    (yields the driver, then quits it); skips the test with the reason where Chromium is missing."""
    found, reason = find_chromium()
    if found is None:
        print(f"SKIP: {reason}")
        pytest.skip(reason)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    chromium, chromedriver = found
    profile = Path(tempfile.mkdtemp(prefix="kdlib-chromium-"))
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in list(flags) + [f"--user-data-dir={profile}"]:
        options.add_argument(flag)
    if logging:
        options.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
    driver = webdriver.Chrome(service=Service(executable_path=chromedriver), options=options)
    driver.set_page_load_timeout(timeout)
    driver.set_script_timeout(timeout)
    yield driver
    driver.quit()
    shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture(scope="module")
def browser():
    yield from chromium_driver(logging=True)


def page_files(html: Path):
    """Every page of the book: the HTML files outside Sphinx's asset folders."""
    return sorted(p for p in html.rglob("*.html")
                  if not any(part.startswith("_") for part in p.relative_to(html).parts[:-1]))


def network_requests(driver):
    """URLs the page asked the network stack for (Chromium's performance log, drained)."""
    urls = []
    for entry in driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message.get("method") == "Network.requestWillBeSent":
            urls.append(message["params"]["request"]["url"])
    return urls


def visit(driver, page: Path) -> dict:
    driver.get(page.as_uri())
    typeset = driver.execute_async_script(MATHJAX_DONE_JS)
    facts = driver.execute_script(PAGE_FACTS_JS)
    facts["typeset"] = typeset
    facts["console"] = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
    facts["requests"] = network_requests(driver)
    return facts


def leaves_the_machine(url: str) -> bool:
    """A request over the network (not file:, data:, or Chromium's own chrome:// pages)."""
    parts = urlsplit(url)
    local_host = parts.hostname in ("localhost", "127.0.0.1", "::1")
    return parts.scheme in ("http", "https", "ws", "wss", "ftp") and not local_host


def local_target(url: str):
    """(file path, fragment) of a link into the book; None for links elsewhere (mailto:, ...)."""
    parts = urlsplit(url)
    if parts.scheme != "file":
        return None
    return Path(unquote(parts.path)), unquote(parts.fragment)


def save_screenshot(driver, page: Path, target: Path) -> None:
    """The whole chapter at the theme's width, as one PNG."""
    driver.get(page.as_uri())
    driver.execute_async_script(MATHJAX_DONE_JS)
    height = driver.execute_script("return document.documentElement.scrollHeight")
    shot = driver.execute_cdp_cmd("Page.captureScreenshot", {
        "format": "png", "captureBeyondViewport": True,
        "clip": {"x": 0, "y": 0, "width": 1280, "height": min(height, 16000), "scale": 1}})
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(base64.b64decode(shot["data"]))


@pytest.mark.slow
def test_every_page_renders_offline_in_chromium(html_book, browser):
    start = time.perf_counter()
    pages = page_files(html_book)
    chapters = {f"{Path(n).name}.html" for n in bookbuild.toc_files(ROOT)}
    assert chapters <= {p.name for p in pages}, "a chapter of _toc.yml has no page"
    problems, ids, links, math_pages = [], {}, [], 0
    for page in pages:
        facts = visit(browser, page)
        name = page.relative_to(html_book).as_posix()
        ids[page.resolve()] = set(facts["ids"])
        links += [(name, url) for url in facts["links"]]
        if facts["maths"]:
            math_pages += 1
            if facts["typeset"] is not True:
                problems.append(f"{name}: MathJax did not typeset the page ({facts['typeset']})")
        if facts["untypeset"]:
            problems.append(f"{name}: {len(facts['untypeset'])} equations not typeset, e.g. {facts['untypeset'][0]!r}")
        raw = RAW_TEX.search(facts["text"])
        if raw:
            around = facts["text"][max(raw.start() - 40, 0):raw.end() + 40]
            problems.append(f"{name}: raw TeX in the text: ...{around}...")
        for image in facts["images"]:
            if not image["complete"] or image["width"] == 0:
                problems.append(f"{name}: image not loaded: {image['src']}")
        for entry in facts["console"]:
            problems.append(f"{name}: console error: {entry['message'][:200]}")
        outside = [u for u in facts["requests"] + facts["resources"] if leaves_the_machine(u)]
        for url in sorted(set(outside)):
            problems.append(f"{name}: request leaves the machine: {url}")
    for name, url in links:
        target = local_target(url)
        if target is None:  # a reference to a paper's page: a link, not a request the page makes
            continue
        path, fragment = target
        if not path.exists():
            problems.append(f"{name}: broken link {url}")
        elif fragment and path.resolve() in ids and fragment not in ids[path.resolve()]:
            problems.append(f"{name}: link to a missing anchor {url}")
    # the chapters are mostly equations: a renderer that silently did nothing must not pass
    assert math_pages >= len([n for n in chapters if n != "index.html"]) // 2, f"math on {math_pages} pages only"
    save_screenshot(browser, html_book / "book" / f"{SCREENSHOT_CHAPTER}.html",
                    ARTIFACTS / f"{SCREENSHOT_CHAPTER}.png")
    print(f"{len(pages)} pages, {len(links)} links checked in {time.perf_counter() - start:.1f} s; "
          f"screenshot: {ARTIFACTS / f'{SCREENSHOT_CHAPTER}.png'}")
    assert not problems, "\n".join(problems[:40]) + (f"\n... {len(problems) - 40} more" if len(problems) > 40 else "")


@pytest.mark.slow  # the built book: every chapter executed, then Sphinx
def test_the_built_book_carries_its_math_renderer(html_book):
    """MathJax is inside the book and every page refers to the local copy, never to a CDN."""
    assert (html_book / "_static" / "mathjax" / "tex-chtml.js").stat().st_size > 100_000
    fonts = list((html_book / "_static" / "mathjax" / "output" / "chtml" / "fonts").rglob("*.woff"))
    assert fonts, "MathJax's fonts are missing from the book"
    for page in page_files(html_book):
        text = page.read_text()
        assert not re.search(r"""<(script|link)[^>]+(src|href)=["'](https?:)?//""", text), \
            f"{page.name} loads a script or style from the network"
    kd = (html_book / "book" / "kd.html").read_text()
    assert "_static/mathjax/tex-chtml.js" in kd
