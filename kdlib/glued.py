"""The values a chapter glued in this kernel, by name, for the chapters opened in JupyterLab.

``kdlib.experiments.glue`` records each value here as it glues it; a lab copy of a chapter (``make lab``)
shows it with an inline ``{eval}`` of :func:`value`, so the notebook reads as the book reads.
"""
from __future__ import annotations

from typing import Any, Dict

#: every value this kernel glued, by name
GLUED: Dict[str, Any] = {}


def value(key: str, fmt: str = "") -> Any:
    """The value glued as ``key``, formatted as ``{glue:text}`key:fmt``` formats it (a figure as itself)."""
    if key not in GLUED:
        return f"[{key}: run the cells above]"
    found = GLUED[key]
    if fmt and isinstance(found, (int, float)):
        return format(found, fmt)
    return found
