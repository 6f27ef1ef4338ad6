"""What the chapters' Markdown says, checked without executing them (fast)."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CHAPTERS = sorted((ROOT / "book").glob("*.md"))


def math_line_starts(text):
    """Lines of prose that start with `+ `, `- ` or `* ` while an inline `$...$` is open: Markdown reads
    them as list items and the formula breaks (a minus sign disappears)."""
    bad, in_code, in_display, open_math = [], False, False, False
    for number, line in enumerate(text.splitlines(), 1):
        if line.startswith("```") or line.startswith(":::"):
            in_code = line.startswith("```") and not in_code
            open_math = False
            continue
        if in_code:
            continue
        if line.strip() == "$$":
            in_display = not in_display
            continue
        if in_display:
            continue
        if not line.strip():
            open_math = False
            continue
        if open_math and re.match(r"\s*[-+*] ", line):
            bad.append((number, line.strip()[:60]))
        if line.replace("\\$", "").replace("$$", "").count("$") % 2:
            open_math = not open_math
    return bad


def test_the_checker_finds_a_split_formula():
    assert math_line_starts("a gradient $T(p^s - p^t) \\approx (z^s\n- z^t)$ here") == [(2, "- z^t)$ here")]
    assert math_line_starts("a list:\n\n- item with $x$\n- another") == []


def test_no_formula_is_split_at_a_leading_sign():
    for path in CHAPTERS:
        assert math_line_starts(path.read_text()) == [], path.name


def test_no_chapter_points_outside_the_book():
    """methods.md and the other developer notes are not part of the book; neither are included sources'
    references to them."""
    included = set()
    for path in CHAPTERS:
        text = path.read_text()
        assert "methods.md" not in text, path.name
        included |= {ROOT / "book" / m for m in re.findall(r"literalinclude\}\s+(\S+)", text)}
    for source in included:
        assert "methods.md" not in source.read_text(), source
