"""The package layout is the architecture: each package imports only those below it, and
no module imports itself back through others (docs/architecture.md)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

PACKAGE = Path(__file__).resolve().parents[2] / "gfs_backup"
# Lowest first: a package may import its own modules and the packages before it.
LAYERS = [
    "retention",
    "core",
    "transport",
    "tools",
    "copying",
    "target",
    "backends",
    "ops",
    "actions",
    "cli",
]
ROOT_MODULES = {"gfs_backup": -1, "gfs_backup.__main__": len(LAYERS)}  # version; entry point


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """The gfs_backup modules `path` imports (at any depth of its code)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module.startswith("gfs_backup"):
                found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("gfs_backup"))
    return found


def layer(module: str) -> int:
    if module in ROOT_MODULES:
        return ROOT_MODULES[module]
    package = module.split(".")[1]
    assert package in LAYERS, f"{module} is in no known package: add it to LAYERS"
    return LAYERS.index(package)


GRAPH = {module_name(p): imports_of(p) for p in PACKAGE.rglob("*.py")}


def test_every_module_lives_in_a_package_of_a_layer() -> None:
    strays = [p.name for p in PACKAGE.glob("*.py") if p.name not in ("__init__.py", "__main__.py")]
    assert strays == [], "modules at the root of gfs_backup: move them into a package"


def test_no_package_imports_a_package_above_it() -> None:
    upward = [
        f"{module} -> {target}"
        for module, targets in GRAPH.items()
        for target in targets
        if target in GRAPH and layer(target) > layer(module)
    ]
    assert upward == []


def test_no_import_cycles() -> None:
    cycles: list[str] = []
    state: dict[str, int] = {}  # 1 visiting, 2 done

    def visit(module: str, trail: list[str]) -> None:
        state[module] = 1
        for target in sorted(GRAPH.get(module, ())):
            if target not in GRAPH or target == module or module.startswith(f"{target}."):
                continue  # a package's __init__ re-exporting its modules is no cycle
            if state.get(target) == 1:
                cycles.append(" -> ".join([*trail[trail.index(target) :], target]))
            elif state.get(target) is None:
                visit(target, [*trail, target])
        state[module] = 2

    for module in sorted(GRAPH):
        if module not in state:
            visit(module, [module])
    assert cycles == []
