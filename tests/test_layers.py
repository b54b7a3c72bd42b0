"""The layout: every module sits in a layer, imports only downwards, and there are no import
circles (counting the imports inside functions, which is where circles used to hide)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "mtlkit"

LAYERS: list[set[str]] = [
    {"errors", "registry", "version"},
    {"engine"},
    {"methods"},
    {"metrics", "tasks", "architectures", "data"},
    {"parallel"},
    {"training"},
    {"integrations"},
    {"app"},
]
"""Bottom to top; the package itself (``mtlkit/__init__.py``, ``__main__.py``) may import all."""

MAX_LINES = 620
"""No module over this many lines (the issue's "about 500 unless it is one concept")."""


def _modules() -> dict[str, Path]:
    found = {}
    for path in sorted(SRC.rglob("*.py")):
        parts = path.relative_to(SRC.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def _imports(path: Path, name: str) -> set[str]:
    """Every mtlkit module ``path`` imports, anywhere in the file."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("mtlkit"))
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1])
                base = f"{base}.{node.module}" if node.module else base
            if base.startswith("mtlkit"):
                found.add(base)
                found.update(f"{base}.{a.name}" for a in node.names)
    return found


MODULES = _modules()
GRAPH = {
    name: {m for m in _imports(path, name) if m in MODULES and m != name}
    for name, path in MODULES.items()
}


def _layer(module: str) -> int | None:
    parts = module.split(".")
    if len(parts) < 2 or parts[1] == "__main__":
        return None  # the package's public face
    for index, layer in enumerate(LAYERS):
        if parts[1] in layer:
            return index
    raise AssertionError(f"{module} sits in no layer; add its package to LAYERS")


def test_every_module_sits_in_a_layer():
    assert all(_layer(m) is not None or m in ("mtlkit", "mtlkit.__main__") for m in MODULES)
    assert len(MODULES) > 60  # the walk found the package


def test_layers_import_only_downwards():
    upward = []
    for module, imported in GRAPH.items():
        own = _layer(module)
        if own is None:
            continue
        for target in imported:
            other = _layer(target)
            if other is None or other > own:
                upward.append(f"{module} -> {target}")
    assert not upward, "imports of a higher layer:\n" + "\n".join(sorted(upward))


def _children(package: str) -> set[str]:
    return {m for m in MODULES if m.startswith(package + ".")}


def test_no_import_circles():
    """Depth-first search for a cycle; a package's ``__init__`` importing its own children
    (re-exports) is not an edge back from them unless a child imports the package."""
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for target in sorted(GRAPH[node]):
            if node in _children(target) or target == "mtlkit":
                continue  # a module importing its own package's __init__ (or the top package)
            if state.get(target) == 1:
                cycles.append([*path[path.index(target) :], target] if target in path else [node])
            elif target not in state:
                visit(target, [*path, target])
        state[node] = 2

    for module in sorted(GRAPH):
        if module not in state:
            visit(module, [module])
    assert not cycles, "import circles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_the_rules_catch_a_violation():
    """The checks can fail: an engine module importing the trainer is upward."""
    assert _layer("mtlkit.engine.backward") < _layer("mtlkit.training.trainer")
    assert _imports(SRC / "training" / "step.py", "mtlkit.training.step") >= {
        "mtlkit.engine.backward",
        "mtlkit.training.nonfinite",
    }


def test_no_module_is_huge():
    sizes = {m: len(p.read_text(encoding="utf-8").splitlines()) for m, p in MODULES.items()}
    big = {m: n for m, n in sizes.items() if n > MAX_LINES}
    assert not big, f"modules over {MAX_LINES} lines: {big}"


@pytest.mark.slow
def test_every_module_imports_first_in_a_fresh_interpreter():
    """A circle that the static graph misses (``importlib`` tricks) shows when a module is the
    first one imported; one fresh interpreter per module."""
    failures = []
    for module in sorted(set(MODULES) - {"mtlkit.__main__"}):  # that one runs the CLI
        done = subprocess.run(
            [sys.executable, "-c", f"import {module}"], capture_output=True, text=True
        )
        if done.returncode:
            failures.append(f"{module}: {done.stderr.strip().splitlines()[-1]}")
    assert not failures, "\n".join(failures)
