"""The house's floors hold: core <- training <- aws <- (api, plan, compare, demo, cli), with no
upward import and no import cycle, lazy (in-function) imports included. A new upward import
fails here, naming the module, the line and the import."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "spectrum_sm"
#: Floor of each sub-package; every other module of spectrum_sm sits on the top floor.
FLOORS = {"core": 0, "training": 1, "aws": 2}
TOP = 3


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}


def floor(module: str) -> int:
    parts = module.split(".")
    if len(parts) == 1:  # the package's own __init__: the facade over everything
        return TOP + 1
    return FLOORS.get(parts[1], TOP)


def imports(path: Path) -> list[tuple[int, str]]:
    """(line, spectrum_sm module) for every import in a file, wherever it is written."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                found.append((node.lineno, sub if sub in MODULES else target))
    return [(line, t) for line, t in found if t == "spectrum_sm" or t.startswith("spectrum_sm.")]


def test_the_scan_finds_the_floors():
    # The walk sees lazy imports and relative ones: a check that found nothing could not fail.
    edges = {(m, t) for m, p in MODULES.items() for _, t in imports(p)}
    assert ("spectrum_sm.cli", "spectrum_sm.api") in edges
    assert ("spectrum_sm.core.scanner", "spectrum_sm.core.selection") in edges
    assert (
        floor("spectrum_sm.core.snr")
        < floor("spectrum_sm.training.recipe")
        < floor("spectrum_sm.aws.pipeline")
        < floor("spectrum_sm.cli")
    )


def test_no_module_imports_a_floor_above_its_own():
    upward = [
        f"{MODULES[m].relative_to(ROOT)}:{line} imports {target}"
        for m in sorted(MODULES)
        for line, target in imports(MODULES[m])
        if floor(target) > floor(m)
    ]
    assert not upward, "\n".join(upward)


def test_nothing_imports_the_cli():
    users = [m for m, p in MODULES.items() for _, t in imports(p) if t == "spectrum_sm.cli"]
    assert users == []


def test_no_import_cycles():
    graph = {m: {t for _, t in imports(p) if t != m} for m, p in MODULES.items()}
    # Tarjan's strongly connected components: any component of two or more is a cycle.
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph.get(node, ()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for module in sorted(graph):
        if module not in index:
            visit(module)
    assert not cycles, cycles


@pytest.mark.parametrize("script", ["analyze.py", "train.py", "launch.py"])
def test_entrypoints_use_no_sagemaker_sdk(script):
    tree = ast.parse((ROOT / "entrypoints" / script).read_text())
    names = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    names += [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    assert not [n for n in names if n.split(".")[0] == "sagemaker"]
