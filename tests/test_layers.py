"""The layers of docs/architecture.md, checked on the source.

composefs knows nothing of the journal, the journal nothing of composefs,
the builder nothing of the journal, packages/ uses composefs only through its
public names, and the CLI neither touches SQL nor reaches past the Store into the
journal, the layout or the effects. SQL stays inside journal/. linux/ is
generic OS code: it imports nothing else of aptlayer, so every layer
(composefs first) may use it.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parent.parent / "aptlayer"

#: package folder -> modules its files must not import (absolute names); a
#: package's imports of its own modules are always allowed
FORBIDDEN = {
    "linux": ("aptlayer",),
    "composefs": ("aptlayer.journal", "aptlayer.store", "aptlayer.cli", "aptlayer.recovery", "sqlite3"),
    "journal": ("aptlayer.composefs", "aptlayer.store", "aptlayer.cli", "aptlayer.recovery"),
    "cli": ("aptlayer.journal", "sqlite3", "sqlite_utils", "aptlayer.layout", "aptlayer.effects", "aptlayer.gc",
            "aptlayer.builder.strategies"),
    "builder": ("aptlayer.journal", "aptlayer.store", "aptlayer.cli", "aptlayer.recovery", "aptlayer.maintenance",
                "sqlite3"),
    "gc": ("aptlayer.journal", "aptlayer.store", "aptlayer.cli", "sqlite3"),
    # a room of its own: reads images through composefs, is called by the Store, never calls it
    "packages": ("aptlayer.journal", "aptlayer.store", "aptlayer.cli", "aptlayer.recovery",
                 "aptlayer.maintenance", "aptlayer.gc", "aptlayer.watch", "aptlayer.layering",
                 "sqlite3", "sqlite_utils"),
}


def imported_modules(path: Path) -> set[str]:
    """Absolute names of every module a file imports (relative imports resolved)."""
    package = ".".join(path.relative_to(PKG.parent).with_suffix("").parts[:-1])
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")
            if node.level:
                base = base[: len(base) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            found.add(name)
            found.update(f"{name}.{alias.name}" for alias in node.names)
    return found


CASES = [(layer, f) for layer in FORBIDDEN for f in sorted((PKG / layer).glob("*.py"))]


@pytest.mark.parametrize("layer,path", CASES, ids=[f"{l}/{p.name}" for l, p in CASES])
def test_layer_imports(layer: str, path: Path) -> None:
    own = f"aptlayer.{layer}"
    bad = sorted(m for m in imported_modules(path)
                 if not (m == own or m.startswith(own + "."))
                 and any(m == f or m.startswith(f + ".") for f in FORBIDDEN[layer]))
    assert not bad, f"{path.relative_to(PKG.parent)} imports {bad}"


def test_the_checker_sees_relative_imports() -> None:
    names = imported_modules(PKG / "cli" / "maint.py")
    assert "aptlayer.maintenance.Maintenance" in names
    assert "aptlayer.linux.verity" in imported_modules(PKG / "linux" / "fsops.py")


def test_composefs_builds_on_linux() -> None:
    """The file operations and the mount calls composefs uses come from linux/, not a copy of their own."""
    assert "aptlayer.linux.fsops" in imported_modules(PKG / "composefs" / "objectstore.py")
    assert "aptlayer.linux.mountapi" in imported_modules(PKG / "composefs" / "mount.py")


def _outside_journal() -> list[Path]:
    return [p for p in sorted(PKG.rglob("*.py")) if "journal" not in p.relative_to(PKG).parts]


@pytest.mark.parametrize("path", _outside_journal(), ids=lambda p: str(p.relative_to(PKG)))
def test_no_sql_outside_the_journal(path: Path) -> None:
    """Neither sqlite3 nor a journal's connection (``.conn``) is used outside journal/."""
    tree = ast.parse(path.read_text(), str(path))
    imports = {m for m in imported_modules(path) if m == "sqlite3" or m.startswith("sqlite3.")}
    conns = [node.lineno for node in ast.walk(tree) if isinstance(node, ast.Attribute) and node.attr == "conn"]
    assert not imports and not conns, f"{path.relative_to(PKG.parent)}: sqlite3 {sorted(imports)}, .conn at {conns}"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PKG.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _import_graph() -> dict[str, set[str]]:
    """aptlayer module -> the aptlayer modules it imports (a package's ``__init__`` for the package).

    ``from . import x`` counts as importing the module ``x``, not its package.
    """
    files = {_module_name(p): p for p in PKG.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        edges = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                edges.update(a.name for a in node.names if a.name in files)
            elif isinstance(node, ast.ImportFrom):
                base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
                module = ".".join(base + ([node.module] if node.module else [])) if node.level else node.module
                subs = {f"{module}.{a.name}" for a in node.names} & files.keys()
                edges |= subs or ({module} & files.keys())
                if node.module and subs and module in files and len(subs) < len(node.names):
                    edges.add(module)
        graph[name] = edges - {name}
    return graph


def test_no_import_cycles() -> None:
    """No aptlayer module imports, however indirectly and however lazily, one that imports it back."""
    graph = _import_graph()
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    assert cycles == []


def test_the_import_graph_sees_relative_and_lazy_imports() -> None:
    graph = _import_graph()
    assert "aptlayer.store" in graph["aptlayer.recovery"]  # from .store import Store
    assert "aptlayer.composefs.upstream" in graph["aptlayer.builder.strategies"]  # inside a function
    assert "aptlayer.journal.log" in graph["aptlayer.journal"]  # a package's __init__


PACKAGES = sorted((PKG / "packages").glob("*.py"))


@pytest.mark.parametrize("path", PACKAGES, ids=[p.name for p in PACKAGES])
def test_packages_use_only_public_names_of_other_rooms(path: Path) -> None:
    private = sorted(m for m in imported_modules(path)
                     if m.startswith("aptlayer.") and not m.startswith("aptlayer.packages")
                     and any(part.startswith("_") for part in m.split(".")))
    assert not private, f"{path.relative_to(PKG.parent)} imports private names {private}"
