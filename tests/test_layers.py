"""The layers of docs/architecture.md, checked on the source.

composefs knows nothing of the journal, the journal nothing of composefs,
the CLI neither touches SQL nor reaches past the Store into the journal,
and packages/ (apt, dpkg, mmdebstrap) knows nothing of the Store above it.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parent.parent / "aptlayer"

#: package folder -> modules its files must not import (absolute names)
FORBIDDEN = {
    "composefs": ("aptlayer.journal", "aptlayer.store", "aptlayer.cli", "aptlayer.recovery", "sqlite3"),
    "journal": ("aptlayer.composefs", "aptlayer.store", "aptlayer.cli", "aptlayer.recovery"),
    "cli": ("aptlayer.journal", "sqlite3", "sqlite_utils"),
    # packages/ is a room of its own: layering calls it, it calls nothing above
    "packages": ("aptlayer.journal", "aptlayer.store", "aptlayer.cli", "aptlayer.recovery",
                 "aptlayer.maintenance", "aptlayer.watch", "sqlite3", "sqlite_utils"),
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
    bad = sorted(m for m in imported_modules(path)
                 if any(m == f or m.startswith(f + ".") for f in FORBIDDEN[layer]))
    assert not bad, f"{path.relative_to(PKG.parent)} imports {bad}"


def test_the_checker_sees_relative_imports() -> None:
    names = imported_modules(PKG / "cli" / "maint.py")
    assert "aptlayer.maintenance.Maintenance" in names
