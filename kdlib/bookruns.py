"""``kdlib book --executor``: the runs the chapters ask for, trained on an executor of :mod:`kdlib.runs`.

The command's options, the command line that resumes a build, and :class:`BookRuns`, which gathers what
each chapter's collect file names and trains it (:func:`kdlib.bookbuild.run_book_on_executor` drives it).
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import threading
import time
from pathlib import Path
from typing import Dict

from kdlib import runs, sweep
from kdlib.config import RunConfig
from kdlib.engine.rundir import RunLock
from kdlib.runs.executors import cores


def add_book_executor_arguments(parser: argparse.ArgumentParser) -> None:
    sweep.add_execution_arguments(parser, book=True)
    parser.add_argument("--plan", action="store_true", help="with --executor: collect the chapters' runs, write "
                        "and print the plan (--verbose: every run's resolved recipe), train nothing")
    parser.add_argument("--verbose", action="store_true", help=argparse.SUPPRESS)
    # a side-by-side chapter of the book's executor path: where it records its runs, whether it waits for them
    parser.add_argument("--collect", help=argparse.SUPPRESS)
    parser.add_argument("--wait-runs", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--staging", help=argparse.SUPPRESS)


def book_command(args: argparse.Namespace) -> str:
    """The ``python -m kdlib book`` command line of ``args``: running it again resumes the book."""
    words = ["python", "-m", "kdlib", "book", "--profile", args.profile]
    words += [w for name, value in args.parameter for w in ("-p", name, value)]
    words += sweep.flag_words((("--data-root", args.data_root), ("--executor", args.executor),
                               ("--workers", args.workers), ("--threads", args.threads), ("--jobs", args.jobs)))
    words += sweep.flag_words((flag, getattr(args, f"slurm_{name}", None)) for name, flag in sweep.SLURM_FLAGS.items())
    return shlex.join(words)


class BookRuns:
    """The runs the chapters ask for, trained on the book's executor: what each chapter's collect file
    holds, deduplicated, teachers first; failures kept to be named at the end."""

    def __init__(self, args: argparse.Namespace, folder: Path):
        self.args, self.folder, self.home = args, folder, Path(os.environ["KDLIB_HOME"]).absolute()
        self.command, self.workers = book_command(args), args.workers or 1
        self.options = runs.SlurmOptions.from_mapping(sweep.slurm_from_args(args))
        if args.executor == "slurm":  # the options checked against the cluster before any chapter runs
            runs.slurm.executor(self.options, self.home / "jobs")
        cpus = self.options.cpus if args.executor == "slurm" else cores()
        self.threads = runs.run_threads(args.threads, cpus, self.workers)
        self.seen, self.failed, self.queue, self.thread = set(), {}, [], None

    def asked(self, missing: bool = False) -> Dict[str, list]:
        """Per chapter, the runs it asked for (only those it lacked then: ``missing``), each once."""
        found = {}
        for path in sorted(self.folder.glob("*.jsonl")):
            entries = [e for e in map(json.loads, path.read_text().splitlines()) if e["missing"] or not missing]
            found[path.stem] = list({e["config"]["out"]: runs.Run(RunConfig.from_dict(e["config"]), e["role"],
                                                                  e["needs"]) for e in entries}.values())
        return found

    def new(self) -> list:
        """Runs asked for since the last call that are not finished, teachers first."""
        fresh = {str(r.run_dir): r for rs in self.asked().values() for r in rs
                 if str(r.run_dir) not in self.seen and not r.finished()}
        self.seen.update(fresh)
        return sorted(fresh.values(), key=lambda r: r.role != "teacher")

    def train(self, todo: list, round_: str) -> None:
        outcomes, _ = runs.execute(todo, self.args.executor, folder=self.home / "jobs", workers=self.workers,
                                   threads=self.threads, slurm=self.options, resume=self.command,
                                   desc=f"book runs ({round_})")
        for outcome in outcomes:
            if outcome.status == "locked":  # a job of an earlier, interrupted build still trains it
                print(f"  waiting for {outcome.run.label} ({outcome.error})", flush=True)
                while RunLock.holder(outcome.run.run_dir):
                    time.sleep(10)
            if not outcome.run.finished():
                self.failed[str(outcome.run.run_dir)] = outcome
                print(f"  {outcome.status}: {outcome.run.label}: {outcome.error} (log: {outcome.log})", flush=True)

    def poll(self) -> None:
        """Called while the chapters execute: train what they ask for after all, in a thread of its own."""
        self.queue += self.new()
        if self.queue and (self.thread is None or not self.thread.is_alive()):
            batch, self.queue = self.queue, []
            print(f"  {len(batch)} more runs asked for: {', '.join(r.label for r in batch)}", flush=True)
            self.thread = threading.Thread(target=self.train, args=(batch, "while executing"), daemon=True)
            self.thread.start()

    def report(self) -> int:
        """1 after naming every failed run, the chapters that need it, and the command that resumes."""
        if not self.failed:
            return 0
        asked = self.asked()
        for key, o in self.failed.items():
            chapters = [n for n, rs in asked.items() if any(str(r.run_dir) == key for r in rs)]
            print(f"run {o.status}: {o.run.label}: {o.error} (log: {o.log}; needed by {', '.join(chapters)})",
                  file=sys.stderr)
        print(f"{len(self.failed)} runs did not finish; fix the cause, then resume with: {self.command}",
              file=sys.stderr, flush=True)
        return 1
