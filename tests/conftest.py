"""Shared fixtures: where the reference vectors and upstream tools are."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from aptlayer.composefs.upstream import find_tool

REPO = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("APT_LAYER_SHARED", REPO.parent / "shared"))
VECTORS = SHARED / "vectors"
UPSTREAM_TESTS = SHARED / "upstream-tests"


def vector_names() -> list[str]:
    """Every vector folder in the shared set (read from disk, never hard-coded)."""
    if not VECTORS.is_dir():
        return []
    return sorted(p.name for p in VECTORS.iterdir() if (p / "image.cfs").is_file())


def vector_flags(name: str) -> list[str]:
    return json.loads((VECTORS / name / "manifest.json").read_text())["flags"]


@pytest.fixture
def vectors() -> Path:
    if not VECTORS.is_dir():
        pytest.skip(f"reference vectors not found at {VECTORS}")
    return VECTORS


@pytest.fixture
def upstream_tests() -> Path:
    if not UPSTREAM_TESTS.is_dir():
        pytest.skip(f"upstream test assets not found at {UPSTREAM_TESTS}")
    return UPSTREAM_TESTS


def _tool_fixture(name: str):
    @pytest.fixture
    def fixture() -> str:
        path = find_tool(name)
        if path is None:
            pytest.skip(f"upstream {name} not installed (set APT_LAYER_COMPOSEFS_BIN)")
        return path

    return fixture


mkcomposefs = _tool_fixture("mkcomposefs")
composefs_info = _tool_fixture("composefs-info")
mount_composefs = _tool_fixture("mount.composefs")


@pytest.fixture
def store(tmp_path: Path):
    """A new, empty apt-layer store, closed after the test."""
    from aptlayer.store import Store

    s = Store.open(tmp_path / "store")
    yield s
    s.close()


@pytest.fixture
def as_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root")


@pytest.fixture
def kernel(as_root: None) -> None:
    """Root, and a kernel with erofs and overlayfs: what a composefs mount needs."""
    with open("/proc/filesystems") as f:
        have = {line.split()[-1] for line in f if line.strip()}
    missing = [fs for fs in ("erofs", "overlay") if fs not in have]
    if missing:
        pytest.skip(f"kernel lacks {', '.join(missing)} (not in /proc/filesystems)")


@pytest.fixture(scope="session")
def debian_base_tree() -> Path:
    """The cached bookworm minbase, extracted (read-only: use ``debian_root``)."""
    from debian_base import Unavailable, base_tree

    try:
        return base_tree()
    except Unavailable as exc:
        pytest.skip(str(exc))


@pytest.fixture
def debian_root(debian_base_tree: Path, tmp_path: Path):
    """A writable bookworm minbase root of this test's own (an overlay on the cached tree)."""
    from debian_base import writable_root

    root, cleanup = writable_root(debian_base_tree, tmp_path / "base")
    yield root
    cleanup()


@pytest.fixture(scope="session")
def apt_repo(tmp_path_factory):
    """The signed local apt repository of tests/aptrepo.py, built once per run."""
    import shutil as _shutil

    from aptrepo import AptRepo

    for tool in ("dpkg-deb", "apt-ftparchive", "gpg"):
        if _shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed (tools/setup.sh installs it)")
    return AptRepo.build(tmp_path_factory.mktemp("aptrepo") / "repo")
