"""The package's shape: imports flow one way (no cycles, even through imports inside functions), nothing below the
command line imports it, the `python -m finetune.X` shims are entry points only, and modules stay readable."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from helpers import PROJECT

PACKAGE = PROJECT / "finetune"
TOP = {"finetune.__main__", "finetune.cli"}  # the command line: imports everything, imported by nothing below it
# `python -m finetune.X` kept for old scripts
SHIMS = {
    "finetune.merge",
    "finetune.generate",
    "finetune.serve",
    "finetune.embed",
    "finetune.push",
    "finetune.preview",
    "finetune.checkpoints",
    "finetune.sweep",
    "finetune.tiny",
}
MAX_LINES = 600  # STYLE.md: split a module past ~400 lines along a seam a reader would name; this is the hard stop
# (counted as ruff formats the code: one argument per line where a call does not fit in 120 columns)


def modules() -> dict[str, Path]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PROJECT).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imports(path: Path, known: dict[str, Path]) -> set[str]:
    """The finetune modules a file imports anywhere in it (top level or inside a function)."""

    def resolve(name: str) -> str | None:
        while name and name not in known:
            name = name.rpartition(".")[0]
        return name or None

    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("finetune"):
            found |= {resolve(f"{node.module}.{alias.name}") for alias in node.names}
        elif isinstance(node, ast.Import):
            found |= {resolve(alias.name) for alias in node.names if alias.name.startswith("finetune")}
    return found - {None}


def graph() -> dict[str, set[str]]:
    known = modules()
    edges = {name: imports(path, known) - {name} for name, path in known.items()}
    # a package's __init__ is imported with any of its modules; ours only hold docstrings, so they add no edges
    return edges


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state, stack = {}, []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        stack.append(node)
        for target in sorted(edges.get(node, ())):
            if state.get(target) == "open":
                return stack[stack.index(target) :] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(edges):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_imports_have_no_cycle():
    cycle = find_cycle(graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_finder_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_nothing_below_the_command_line_imports_it():
    edges = graph()
    wrong = {
        f"{source} imports {target}"
        for source, targets in edges.items()
        for target in targets
        if target in TOP | SHIMS and source not in TOP and not (source in SHIMS and target in TOP)
    }
    assert not wrong, "library modules must not import the command line or its shims:\n" + "\n".join(sorted(wrong))


def test_package_inits_hold_no_code():
    """Importing finetune.models must not import torch or the world: each room's __init__ is its docstring."""
    for path in PACKAGE.rglob("__init__.py"):
        if path.parent == PACKAGE:
            continue  # finetune/__init__.py installs the library log filters (see its docstring)
        body = ast.parse(path.read_text(encoding="utf-8")).body
        assert len(body) == 1 and isinstance(body[0], ast.Expr), f"{path.relative_to(PROJECT)}: only a docstring"


@pytest.mark.parametrize("name", sorted(modules()))
def test_module_fits_in_one_sitting(name):
    path = modules()[name]
    lines = len(path.read_text(encoding="utf-8").splitlines())
    assert lines <= MAX_LINES, f"{path.relative_to(PROJECT)} has {lines} lines (> {MAX_LINES}): split it along a seam"
