"""`apt-layer etc diff`: the store's etc/upper (the overlay upper directory a
booted deployment's /etc writes to) read against the image's /etc. The upper
directory is written here as overlayfs writes it: files, whiteouts (0/0
character devices, root only) and opaque directories."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO

from aptlayer.boot import etc
from aptlayer.store import Store

BIG = b"x" * 5000  # kept in the object store: compared by fs-verity digest


@pytest.fixture
def deployed(store: Store, tmp_path: Path) -> Store:
    tree = tmp_path / "tree"
    (tree / "etc" / "sub").mkdir(parents=True)
    (tree / "etc" / "a.conf").write_text("a\n")
    (tree / "etc" / "b.conf").write_text("b\n")
    (tree / "etc" / "big.conf").write_bytes(BIG)
    (tree / "etc" / "sub" / "x").write_text("x\n")
    (tree / "etc" / "sub" / "y").write_text("y\n")
    os.symlink("a.conf", tree / "etc" / "link")
    store.create(str(tree), "base")
    store.deploy("base")
    return store


def upper(store: Store) -> Path:
    u = store.layout.etc_upper
    u.mkdir(parents=True)
    return u


def changes(store: Store, image: str | None = None) -> dict[str, str]:
    return {c["path"]: c["change"] for c in etc.diff(store, image)["changes"]}


def test_no_upper_directory_no_changes(deployed: Store) -> None:
    assert etc.diff(deployed) == {"image": "base", "upper": str(deployed.layout.etc_upper), "changes": []}


def test_added_modified_and_pinned_files(deployed: Store) -> None:
    u = upper(deployed)
    (u / "a.conf").write_text("changed\n")
    (u / "b.conf").write_text("b\n")
    os.chmod(u / "b.conf", 0o644)
    (u / "big.conf").write_bytes(BIG)
    (u / "new.conf").write_text("new\n")
    (u / "sub").mkdir()
    (u / "sub" / "x").write_bytes(b"x\n")
    os.chmod(u / "sub" / "x", 0o600)  # a mode change is a modification
    os.symlink("b.conf", u / "link")
    assert changes(deployed) == {"/etc/a.conf": "modified", "/etc/b.conf": "pinned", "/etc/big.conf": "pinned",
                                 "/etc/new.conf": "added", "/etc/sub/x": "modified", "/etc/link": "modified"}
    (u / "big.conf").write_bytes(BIG[:-1] + b"y")
    assert changes(deployed)["/etc/big.conf"] == "modified"


def test_whiteouts_and_opaque_directories(deployed: Store, as_root: None) -> None:
    u = upper(deployed)
    os.mknod(u / "link", 0o600 | 0o020000, os.makedev(0, 0))
    os.mknod(u / "never-there", 0o600 | 0o020000, os.makedev(0, 0))  # nothing to hide: not a change
    (u / "sub").mkdir(mode=0o755)
    os.setxattr(u / "sub", "trusted.overlay.opaque", b"y")
    (u / "sub" / "x").write_text("x again\n")
    assert changes(deployed) == {"/etc/link": "deleted", "/etc/sub/y": "deleted", "/etc/sub/x": "added"}


def test_the_command_compares_with_the_current_deployment_or_the_image_named(deployed: Store, tmp_path) -> None:
    (upper(deployed) / "a.conf").write_text("changed\n")

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "aptlayer", "--root", str(deployed.root), "etc", "diff", *args],
                              capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})

    assert cli().stdout == "M /etc/a.conf\n"
    data = json.loads(cli("--image", "base", "--json").stdout)
    assert data["image"] == "base" and data["changes"] == [{"path": "/etc/a.conf", "change": "modified"}]
    r = cli("--image", "nope")
    assert r.returncode == 3 and "nope" in r.stderr
