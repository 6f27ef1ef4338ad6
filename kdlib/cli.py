"""``python -m kdlib``: one command line for training, sweeps, benchmarks and the book.

Each sub-command lives in its own module, which provides ``add_arguments(parser)`` and ``run(args)``.
Errors the user can fix (:class:`~kdlib.errors.KDLibError`) print one ``error: ...`` line and exit 2.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import List, Optional

from kdlib.errors import KDLibError

SUBCOMMANDS = {
    "train": ("kdlib.train", "train a network or distil a student (one run)"),
    "sweep": ("kdlib.sweep", "run a grid of methods x pairs x seeds and summarise it"),
    "bench": ("kdlib.bench", "measure a distillation step against the reference pipeline"),
    "book": ("kdlib.bookbuild", "execute the book's chapters and build the HTML book"),
    "course": ("kdlib.course", "the book as a course: nbgrader assignments, JupyterLab and student copies"),
}


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse's own errors keep the one-line, exit-2 contract
        self.print_usage(sys.stderr)
        raise KDLibError(message)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m kdlib", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for name, (module, help_text) in SUBCOMMANDS.items():
        try:
            implementation = importlib.import_module(module)
        except ModuleNotFoundError as exc:  # a sub-command whose module is not installed is left out
            if exc.name != module:
                raise
            continue
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module)
        implementation.add_arguments(p)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        return int(importlib.import_module(args._module).run(args) or 0)
    except KDLibError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
