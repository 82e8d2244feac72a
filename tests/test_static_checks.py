"""Rule 8 of docs/security.md: static checks of the code, run as tests so CI runs them.

bandit (PyPI) over the package, failing on any high-severity finding (the
medium ones are explained in docs/security.md), and shellcheck over every
shell script of the repository, found by its ``#!`` line.
"""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
_SKIP_DIRS = {".git", ".venv", ".upstream", "node_modules", "__pycache__", ".pytest_cache", "build"}
_SHELLS = ("sh", "bash", "dash")


def shell_scripts() -> list[Path]:
    """Every file of the repository whose ``#!`` line names a POSIX shell or bash."""
    found = []
    for path in sorted(REPO.rglob("*")):
        if _SKIP_DIRS & set(path.relative_to(REPO).parts) or not path.is_file() or path.is_symlink():
            continue
        with open(path, "rb") as f:
            first = f.readline(200)
        if not first.startswith(b"#!"):
            continue
        words = first[2:].decode(errors="replace").split()
        interpreter = words[1] if words and words[0].endswith("/env") and len(words) > 1 else \
            (words[0].rsplit("/", 1)[-1] if words else "")
        if interpreter in _SHELLS:
            found.append(path)
    return found


def test_the_repository_has_shell_scripts_to_check() -> None:
    names = {str(p.relative_to(REPO)) for p in shell_scripts()}
    assert {"tools/setup.sh", "tools/test.sh", "debian/apt-layer.postinst"} <= names


def test_shellcheck_finds_nothing_in_any_shell_script() -> None:
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed (tools/setup.sh installs it)")
    scripts = shell_scripts()
    proc = subprocess.run(["shellcheck", "--format=gcc", *map(str, scripts)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_bandit_finds_no_high_severity_issue() -> None:
    if importlib.util.find_spec("bandit") is None:
        pytest.skip("bandit is not installed (pip install -e .[test])")
    proc = subprocess.run([sys.executable, "-m", "bandit", "-q", "-r", str(REPO / "aptlayer"),
                           "--severity-level", "high", "--format", "txt"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
