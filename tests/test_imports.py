"""The import graph of hardneg's own modules has no circle (issue 11: runner -> card -> evaluate
-> runner was one), function-level imports included: a circle hidden in a function still ties
the modules together. Orchestration (pipeline/, pipeline/executors/) never imports what reads
finished outputs (pipeline/outputs/), and stages never import the pipeline's runner."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# The checkout's folders and the package names they install as (pyproject's package-dir).
FOLDERS = {"hardneg": "hardneg", "pipeline": "hardneg.pipeline", "stages": "hardneg.stages", "schemas": "hardneg.schemas"}


def modules() -> dict[str, Path]:
    found: dict[str, Path] = {}
    for folder, package in FOLDERS.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = list(path.relative_to(ROOT / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join([package, *parts])] = path
    return found


def imports(path: Path, known: dict[str, Path]) -> set[str]:
    """hardneg modules a file imports anywhere in it (a package's __init__ run on the way to a
    submodule is not counted: Python runs it, but it is not what the file asked for)."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names if alias.name in known)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                if sub in known:
                    out.add(sub)
                elif node.module in known:
                    out.add(node.module)
    return out


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports(path, known) - {name} for name, path in known.items()}


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: finished
    stack: list[str] = []

    def visit(name: str) -> list[str] | None:
        state[name] = 1
        stack.append(name)
        for target in sorted(edges.get(name, ())):
            if state.get(target) == 1:
                return stack[stack.index(target):] + [target]
            if target not in state:
                found = visit(target)
                if found:
                    return found
        stack.pop()
        state[name] = 2
        return None

    for name in sorted(edges):
        if name not in state:
            found = visit(name)
            if found:
                return found
    return None


def test_the_walk_sees_the_modules():
    edges = graph()
    assert "hardneg.pipeline.runner" in edges and "hardneg.pipeline.plan" in edges["hardneg.pipeline.runner"]
    assert "hardneg.pipeline.outputs.evaluate" in edges and "hardneg.stages.engines.bm25" in edges


def test_find_cycle_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_circle():
    cycle = find_cycle(graph())
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_orchestration_does_not_import_the_output_readers():
    edges = graph()
    for name, targets in edges.items():
        orchestration = name.startswith("hardneg.pipeline.") and not name.startswith(
            ("hardneg.pipeline.outputs", "hardneg.pipeline.cli", "hardneg.pipeline.api"))
        if orchestration:
            readers = sorted(t for t in targets if t.startswith("hardneg.pipeline.outputs"))
            assert not readers, f"{name} imports {readers}"


def test_stages_do_not_import_the_runner():
    for name, targets in graph().items():
        if name.startswith("hardneg.stages"):
            assert not any(t.startswith(("hardneg.pipeline.runner", "hardneg.pipeline.plan", "hardneg.pipeline.executors",
                                         "hardneg.pipeline.outputs")) for t in targets), name
