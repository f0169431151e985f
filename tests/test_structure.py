"""Code-shape rules of issue 11, read from the source (ast): no function in pipeline/ or stages/
over 60 lines unless its def line says why (`# long: <reason>`), and every exception class in
one module (pipeline/errors.py)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MAX_LINES = 60


def _sources(*folders: str) -> list[Path]:
    return [p for folder in folders for p in sorted((ROOT / folder).rglob("*.py"))]


def _functions(path: Path):
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node


def long_functions() -> list[str]:
    found = []
    for path in _sources("pipeline", "stages"):
        relative = path.relative_to(ROOT).as_posix()
        lines = path.read_text(encoding="utf-8").splitlines()
        for node in _functions(path):
            length = node.end_lineno - node.lineno + 1
            if length > MAX_LINES and "# long:" not in lines[node.lineno - 1]:
                found.append(f"{relative}:{node.lineno} {node.name} ({length} lines)")
    return found


def test_no_function_over_60_lines_without_a_reason():
    assert long_functions() == []


def test_a_long_reason_needs_words():
    for path in _sources("pipeline", "stages"):
        for line in path.read_text(encoding="utf-8").splitlines():
            if "# long:" in line:
                assert len(line.split("# long:", 1)[1].strip()) >= 10, line


def test_every_exception_class_is_in_the_errors_module():
    errors = ROOT / "pipeline" / "errors.py"
    defined = {}
    for path in _sources("pipeline", "stages", "schemas", "hardneg"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ClassDef):
                bases = {getattr(b, "id", getattr(b, "attr", "")) for b in node.bases}
                if any(b.endswith(("Error", "Exception", "Interrupt")) or b == "BaseException" for b in bases):
                    defined[node.name] = path
    assert defined, "the walk found no exception class"
    outside = {name: str(path.relative_to(ROOT)) for name, path in defined.items() if path != errors}
    assert outside == {}
