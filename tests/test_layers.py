"""The layers of docs/architecture.md, checked on the source.

composefs knows nothing of the journal, the journal nothing of composefs,
the builder nothing of the journal, packages/ uses composefs only through its
public names, and the CLI neither touches SQL nor reaches past the Store into the
journal, the layout or the effects. SQL stays inside journal/. linux/ is
generic OS code: it imports nothing else of aptlayer, so every layer
(composefs first) may use it.
No module, test or tool takes another module's private (``_x``) names.
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
    # calls the Store (and names the event it records with a pull); nothing below it calls it
    "oci": ("aptlayer.journal.log", "aptlayer.journal.projection", "aptlayer.journal.state", "aptlayer.cli",
            "aptlayer.recovery", "aptlayer.maintenance", "aptlayer.gc", "aptlayer.watch", "aptlayer.layering",
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


# --- private names stay in their module -----------------------------------------------------

ROOT = PKG.parent
#: where the rule is checked: the package, and the tests and tools that use it
CHECKED = sorted(PKG.rglob("*.py")) + sorted((ROOT / "tests").glob("*.py")) + sorted((ROOT / "tools").glob("*.py"))
#: white-box tests and benchmarks that still reach into a module's private names
#: through the module object (``module._name``): (file, name). Known debt, to be
#: made public or tested through the public API; do not add to it.
KNOWN_REACHES = {
    ("tests/test_lstatwalk.py", "_Part"),
    ("tests/test_mount.py", "_NOT_ROOT"),
    ("tests/test_mount.py", "_Plan"),
    ("tests/test_mount.py", "_Request"),
    ("tests/test_mount.py", "_legacy_escape"),
    ("tests/test_mount.py", "_mount"),
    ("tests/test_mount.py", "_request"),
    ("tools/bench_mount.py", "_Plan"),
    ("tools/bench_mount.py", "_mount"),
    ("tools/bench_mount.py", "_request"),
}


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _is_module(name: str) -> bool:
    path = ROOT.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def _dotted(node: ast.expr) -> str | None:
    """``a.b.c`` for a chain of names and attributes, else None."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = _dotted(node.value)
        return None if base is None else f"{base}.{node.attr}"
    return None


def private_reaches(source: str, own: str, is_package: bool = False) -> list[tuple[int, str, str]]:
    """Every private name module ``own`` takes from another aptlayer module: (line, module, name).

    Both ``from module import _name`` and ``module._name`` on a module the
    source imported (under any alias) count; a module's own names do not.
    """
    tree = ast.parse(source, own)
    package = own if is_package else own.rpartition(".")[0]
    modules: dict[str, str] = {}  # local name -> the aptlayer module it is bound to
    found: list[tuple[int, str, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "aptlayer":
                    local = alias.asname or alias.name.split(".")[0]
                    modules[local] = alias.name if alias.asname else "aptlayer"
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            if module.split(".")[0] != "aptlayer":
                continue
            for alias in node.names:
                if _private(alias.name) and module != own:
                    found.append((node.lineno, module, alias.name))
                if _is_module(f"{module}.{alias.name}"):
                    modules[alias.asname or alias.name] = f"{module}.{alias.name}"
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and _private(node.attr):
            chain = _dotted(node.value)
            if chain is None or chain.split(".")[0] not in modules:
                continue
            head, _, rest = chain.partition(".")
            module = modules[head] + (f".{rest}" if rest else "")
            if module != own and _is_module(module):
                found.append((node.lineno, module, node.attr))
    return sorted(found)


def reaches(path: Path) -> list[tuple[int, str, str]]:
    return private_reaches(path.read_text(), _module_name(path), path.name == "__init__.py")


@pytest.mark.parametrize("path", CHECKED, ids=[str(p.relative_to(ROOT)) for p in CHECKED])
def test_no_private_names_from_other_modules(path: Path) -> None:
    rel = str(path.relative_to(ROOT))
    bad = [f"{rel}:{line}: {module}.{name}" for line, module, name in reaches(path)
           if (rel, name) not in KNOWN_REACHES]
    assert not bad, "private names used outside their module (make them public):\n" + "\n".join(bad)


def test_known_private_reaches_are_still_there() -> None:
    """Debt paid off leaves the list, so the list only shrinks."""
    seen = {(str(p.relative_to(ROOT)), name) for p in CHECKED for _line, _module, name in reaches(p)}
    assert KNOWN_REACHES <= seen, f"no longer used, remove from KNOWN_REACHES: {sorted(KNOWN_REACHES - seen)}"


def test_the_private_name_checker_sees_every_form() -> None:
    """Each way of reaching a private name is found; public names and a module's own are not."""
    source = (
        "from . import reader\n"
        "from .imageview import ImageView, _signed64\n"
        "from aptlayer.composefs import imageview as iv\n"
        "import aptlayer.composefs.reader\n"
        "import aptlayer.composefs.format as F\n"
        "from .probe import _mine\n"
        "reader._make_node\n"
        "iv._refs_struct\n"
        "aptlayer.composefs.reader._load\n"
        "F.__name__, reader.read_image, ImageView(b'')._spend, _mine, F._private.attr\n"
    )
    assert private_reaches(source, "aptlayer.composefs.probe") == [
        (2, "aptlayer.composefs.imageview", "_signed64"),
        (7, "aptlayer.composefs.reader", "_make_node"),
        (8, "aptlayer.composefs.imageview", "_refs_struct"),
        (9, "aptlayer.composefs.reader", "_load"),
        (10, "aptlayer.composefs.format", "_private"),
    ]
    # In a package's __init__, ``.`` is the package itself.
    assert private_reaches("from .reader import _x\n", "aptlayer.composefs", is_package=True) == [
        (1, "aptlayer.composefs.reader", "_x")
    ]
