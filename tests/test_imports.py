"""Modules import downwards only: no import cycle anywhere in kdlib, counting imports inside functions.

The graph is read from the source (every ``import``/``from ... import`` statement, deferred ones too);
an import of ``kdlib.a.b`` is an edge to that module. The package root ``kdlib`` is left out: it is the
composition root (``kdlib.default_teacher_provider`` hands the engine the teachers module's provider, so
that the engine itself never names it). Then two fresh interpreters import the modules whose old cycles
this guards (``teachers`` first, ``logit_cache`` first) to catch a cycle at import time.
"""
from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import kdlib

ROOT = Path(kdlib.__file__).resolve().parent


def _modules():
    found = {}
    for path in ROOT.rglob("*.py"):
        rel = path.relative_to(ROOT.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def _edges(modules):
    graph = {name: set() for name in modules}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            for target in targets:
                while target and target not in modules:
                    target = target.rpartition(".")[0]
                if target and target != name and target != "kdlib":
                    graph[name].add(target)
    return graph


def _cycles(graph):
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    sys.setrecursionlimit(10000)
    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles():
    graph = _edges(_modules())
    assert _cycles(graph) == []


def test_the_engine_never_imports_teachers_and_the_cache_never_imports_the_engine():
    graph = _edges(_modules())
    engine = [m for m in graph if m == "kdlib.engine" or m.startswith("kdlib.engine.")]
    assert len(engine) >= 6  # run, step, loop, evaluate, rundir, rng, device
    for module in engine:
        assert "kdlib.teachers" not in graph[module], module
    assert not any(t.startswith("kdlib.engine") for t in graph["kdlib.logit_cache"])
    assert any(t.startswith("kdlib.engine") for t in graph["kdlib.teachers"])  # teachers train with the engine


def test_modules_import_alone_in_a_fresh_interpreter():
    env = {**os.environ, "PYTHONPATH": str(ROOT.parent) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    for first in ("kdlib.teachers", "kdlib.logit_cache", "kdlib.engine.step"):
        code = f"import {first}, kdlib.engine, kdlib.teachers; print('ok')"
        res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
        assert res.returncode == 0 and res.stdout.strip() == "ok", (first, res.stderr[-2000:])
