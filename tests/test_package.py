"""The package's shape: declared dependencies, import layers, no import cycles.

Read from the source and pyproject.toml (no import of the modules), so these
run in a second and catch what a user's install would: napari's plugin manager
installs the package without extras into a napari environment, and the widgets
failed with ``No module named 'matplotlib'`` (issue 13, fault 12).
"""

from __future__ import annotations

import ast
import re
import sys
import tomllib
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "src" / "napari_class2d"
#: the application that loads the plugin: present wherever the plugin runs
HOST = {"napari"}
#: commands import the engine inside main(), so ``napari-class2d info`` and ``--help``
#: start without loading torch (documented in napari_class2d/cli/__init__.py)
LAZY_IMPORTS_ALLOWED = ("cli/",)


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _modules() -> dict[str, Path]:
    """Dotted module name -> file, for every module of the package."""
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _imports(path: Path, *, module_level_only: bool) -> list[tuple[str, int, bool]]:
    """``(imported module, line, at module level)`` of a file; ``TYPE_CHECKING`` blocks
    are left out (they are never executed)."""
    tree = ast.parse(path.read_text())
    found: list[tuple[str, int, bool]] = []

    def visit(node, top: bool):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                continue
            if isinstance(child, ast.Import):
                found.extend((a.name, child.lineno, top) for a in child.names)
            elif isinstance(child, ast.ImportFrom) and child.level == 0 and child.module:
                found.append((child.module, child.lineno, top))
                # `from pkg import module` imports pkg.module too
                found.extend((f"{child.module}.{a.name}", child.lineno, top) for a in child.names)
            inner = top and not isinstance(
                child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda
            )
            visit(child, inner)

    visit(tree, True)
    return [f for f in found if f[2] or not module_level_only]


def _declared() -> set[str]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    names = set()
    for requirement in project["dependencies"]:
        names.add(_normalise(re.match(r"[A-Za-z0-9_.\-]+", requirement).group(0)))
    return names


def test_every_imported_package_is_a_declared_dependency():
    """What any module imports (the widgets included) is installed with the package itself,
    not only with an extra: ``pip install napari-class2d`` into a napari environment."""
    declared = _declared()
    providers = packages_distributions()
    missing = {}
    for path in PACKAGE.rglob("*.py"):
        for name, line, _ in _imports(path, module_level_only=False):
            top = name.split(".")[0]
            if top in sys.stdlib_module_names or top == "napari_class2d" or top in HOST:
                continue
            dists = {_normalise(d) for d in providers.get(top, [top])}
            if not dists & declared:
                missing.setdefault(top, f"{path.relative_to(REPO)}:{line}")
    assert not missing, f"imported but not in [project.dependencies]: {missing}"


def test_no_qt_binding_is_required():
    """napari brings its Qt binding; a plugin that requires one can break napari's."""
    declared = _declared()
    assert not declared & {"pyqt5", "pyqt6", "pyside2", "pyside6"}


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        targets = set()
        for imported, _, _ in _imports(path, module_level_only=True):
            if imported in modules and imported != name:
                targets.add(imported)
        graph[name] = targets
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_no_import_cycle():
    """Data classes below the readers, readers below ``read_particles``; nothing imports a
    module that imports it back (a package ``__init__`` re-exporting is not a cycle)."""
    graph = _graph()
    for name in list(graph):  # a package's __init__ imports its modules, not the reverse
        graph[name] = {t for t in graph[name] if not name.startswith(t + ".")}
    assert _cycle(graph) is None, " -> ".join(_cycle(graph))


def test_no_function_level_imports_of_the_package():
    """Imports inside functions only hid the dependency graph (and the io cycle)."""
    hidden = []
    for path in PACKAGE.rglob("*.py"):
        relative = path.relative_to(PACKAGE).as_posix()
        if relative.startswith(LAZY_IMPORTS_ALLOWED):
            continue
        for name, line, top in _imports(path, module_level_only=False):
            if not top and name.startswith("napari_class2d"):
                hidden.append(f"{relative}:{line} {name}")
    assert not hidden, hidden


LAYERS = {
    # package: what it may import (besides itself)
    "io": set(),
    "engine": {"io"},
    "stream": {"io"},
    "run": {"io", "engine", "stream"},
}
GUI = ("qtpy", "napari", "magicgui", "superqt", "matplotlib", "vispy")


@pytest.mark.parametrize("layer", sorted(LAYERS))
def test_layers_import_only_downwards_and_never_qt(layer):
    for path in (PACKAGE / layer).rglob("*.py"):
        for name, line, _ in _imports(path, module_level_only=False):
            where = f"{path.relative_to(PACKAGE)}:{line} imports {name}"
            assert name.split(".")[0] not in GUI, where
            if name.startswith("napari_class2d.") and (PACKAGE / name.split(".")[1]).is_dir():
                assert name.split(".")[1] in LAYERS[layer] | {layer}, where
