"""Rule 1 of docs/security.md: store permissions, and what a user other than root may run.

Each test attacks a store as a user who can write where they should not
(or runs apt-layer as a real unprivileged user) and checks what apt-layer
refuses: exit 11 naming the path and the fix, exit 7 before touching the
store, and the read-only commands working for anyone who can read.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from crashkit import REPO, cli_env, run_cli

NOBODY = 65534

#: preloads every module (the interpreter's tree may be unreadable to nobody), then
#: becomes nobody for real (no capabilities left) and runs the command line
_AS_NOBODY = f"""
import importlib, os, pkgutil, sys
import aptlayer
for m in pkgutil.walk_packages(aptlayer.__path__, "aptlayer."):
    if not m.name.endswith("__main__"):
        importlib.import_module(m.name)
os.setgroups([])
os.setresgid({NOBODY}, {NOBODY}, {NOBODY})
os.setresuid({NOBODY}, {NOBODY}, {NOBODY})
assert open("/proc/self/status").read().count("CapEff:\\t0000000000000000") == 1
from aptlayer.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.fixture
def root_user() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root (to make files of other owners and to become nobody)")


@pytest.fixture
def readable_dir(root_user):
    """A directory every user can reach (pytest's own, under /tmp/pytest-of-root, is 0700)."""
    import shutil
    import tempfile

    path = Path(tempfile.mkdtemp(prefix="apt-layer-security-", dir="/tmp"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path)


def make_tree(path: Path) -> Path:
    (path / "etc").mkdir(parents=True)
    (path / "etc" / "hostname").write_text("box\n")
    (path / "usr").mkdir()
    (path / "usr" / "data").write_bytes(b"x" * 9000)
    return path


def new_store(tmp_path: Path) -> Path:
    root = tmp_path / "store"
    run_cli(root, "image", "create", str(make_tree(tmp_path / "src")), "base")
    return root


def as_nobody(root: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", _AS_NOBODY, "--root", str(root), *args], env=cli_env(),
                          capture_output=True, text=True, cwd="/")


def snapshot(root: Path) -> dict:
    """Every path of the store with its bytes (files) or target (links): what must not change."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath, name)
            out[str(p.relative_to(root))] = os.readlink(p) if p.is_symlink() else \
                (p.read_bytes() if p.is_file() else "dir")
    return out


WRITE_COMMANDS = [("image", "delete", "base"), ("gc",), ("gc", "--full"), ("deploy", "base"), ("recover",),
                  ("tx", "begin"), ("journal", "rebuild")]


# --- exit 11: unsafe owners and modes ------------------------------------------------------------


@pytest.mark.parametrize("where", ["", "images/objects", "trash", "staging", "deploy", "images"])
def test_a_group_or_world_writable_store_directory_is_refused_by_every_write_command(tmp_path, root_user,
                                                                                     where) -> None:
    root = new_store(tmp_path)
    target = root / where
    target.chmod(0o777)
    before = snapshot(root)
    for args in WRITE_COMMANDS:
        proc = run_cli(root, *args, check=False)
        assert proc.returncode == 11, (args, proc.stderr)
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1, proc.stderr
        assert f"{os.path.realpath(target)} is writable by group and others (mode 0777)" in lines[0]
        assert f"fix: chmod go-w {os.path.realpath(target)}" in lines[0]
    assert snapshot(root) == before


def test_a_journal_owned_by_another_user_is_refused(tmp_path, root_user) -> None:
    root = new_store(tmp_path)
    os.chown(root / "journal.db", NOBODY, NOBODY)
    proc = run_cli(root, "image", "delete", "base", check=False)
    assert proc.returncode == 11
    assert f"{root / 'journal.db'} is owned by uid {NOBODY}, not root; fix: chown root:root {root / 'journal.db'}" \
        in proc.stderr


def test_a_writable_parent_directory_is_refused_and_a_new_store_is_not_made_under_it(tmp_path, root_user) -> None:
    parent = tmp_path / "shared"
    parent.mkdir()
    parent.chmod(0o775)
    proc = run_cli(parent / "store", "image", "create", str(make_tree(tmp_path / "src")), "base", check=False)
    assert proc.returncode == 11, proc.stderr
    assert f"{parent} is writable by group (mode 0775); fix: chmod go-w {parent}" in proc.stderr
    assert not (parent / "store").exists()


def test_a_parent_owned_by_another_user_is_refused(tmp_path, root_user) -> None:
    root = new_store(tmp_path)
    os.chown(tmp_path, NOBODY, NOBODY)
    try:
        proc = run_cli(root, "gc", check=False)
    finally:
        os.chown(tmp_path, 0, 0)
    assert proc.returncode == 11
    assert f"{tmp_path} is owned by uid {NOBODY}, not root" in proc.stderr


def test_a_sticky_world_writable_parent_is_accepted_when_the_path_below_it_is_roots(tmp_path, root_user) -> None:
    """/tmp's case (mode 1777): other users may add names beside the store's path, not replace it."""
    sticky = tmp_path / "tmp"
    sticky.mkdir()
    sticky.chmod(0o1777)
    (sticky / "work").mkdir(mode=0o755)
    root = sticky / "work" / "store"
    run_cli(root, "image", "create", str(make_tree(tmp_path / "src")), "base")
    run_cli(root, "gc")
    # a directory of another user inside the sticky one is refused: that user may replace what is in it
    theirs = sticky / "theirs"
    theirs.mkdir(mode=0o755)
    os.chown(theirs, NOBODY, NOBODY)
    proc = run_cli(theirs / "store", "image", "create", str(tmp_path / "src"), "base", check=False)
    assert proc.returncode == 11, proc.stderr
    assert f"{theirs} is owned by uid {NOBODY}" in proc.stderr
    # and a world-writable parent without the sticky bit is refused
    sticky.chmod(0o777)
    proc = run_cli(root, "gc", check=False)
    assert proc.returncode == 11
    assert f"{sticky} is writable by group and others (mode 0777)" in proc.stderr


def test_read_only_commands_still_work_on_an_unsafe_store_and_fsck_reports_it(tmp_path, root_user) -> None:
    root = new_store(tmp_path)
    (root / "trash").chmod(0o757)
    assert run_cli(root, "status").returncode == 0
    proc = run_cli(root, "fsck", "--json", check=False)
    assert proc.returncode == 10
    report = json.loads(proc.stdout)
    assert report["ok"] is False
    assert report["permissions"] == [{"path": str(root / "trash"), "problem": "is writable by others (mode 0757)",
                                      "fix": f"chmod go-w {root / 'trash'}"}]
    text = run_cli(root, "fsck", check=False).stdout
    assert f"unsafe permissions: {root / 'trash'} is writable by others (mode 0757); fix: chmod go-w" in text


@pytest.mark.parametrize("umask", [0o077, 0o000])
def test_what_apt_layer_creates_has_explicit_modes_whatever_the_umask(tmp_path, root_user, umask) -> None:
    root = tmp_path / "store"
    src = make_tree(tmp_path / "src")
    code = ("import os, sys; os.umask(%d); from aptlayer.cli import main; sys.exit(main(sys.argv[1:]))" % umask)
    proc = subprocess.run([sys.executable, "-c", code, "--root", str(root), "-q", "image", "create", str(src),
                           "base"], env=cli_env(), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    modes = {str(p.relative_to(root)): stat.S_IMODE(p.lstat().st_mode)
             for p in [root, *root.rglob("*")] if not p.is_symlink()}
    assert modes.pop(".") == 0o755
    for name in ("images", "images/objects", "staging", "deploy", "trash"):
        assert modes[name] == 0o755, name
    assert modes["journal.db"] == 0o644
    assert modes["images/base.composefs"] == 0o644
    objects = [m for n, m in modes.items() if n.startswith("images/objects/") and n.count("/") == 3]
    assert objects and set(objects) == {0o644}
    assert all(m & 0o022 == 0 for m in modes.values()), modes


# --- exit 7 and read-only commands for a real unprivileged user -----------------------------------


READ_ONLY = [("status",), ("image", "list"), ("image", "info", "base"), ("image", "ls", "base"),
             ("image", "dump", "base"), ("image", "objects", "base"), ("log",), ("journal", "verify"),
             ("tx", "list"), ("audit", "SELECT count(*) AS n FROM events")]


def test_read_only_commands_work_for_nobody_where_the_journal_is_readable(readable_dir) -> None:
    root = new_store(readable_dir)
    before = snapshot(root)
    for args in READ_ONLY:
        proc = as_nobody(root, *args)
        assert proc.returncode == 0, (args, proc.stderr)
    assert "base" in as_nobody(root, "image", "list").stdout
    assert as_nobody(root, "audit", "--json", "SELECT count(*) AS n FROM events").stdout.split() == \
        ["[", "{", '"n":', "3", "}", "]"]
    assert snapshot(root) == before


def test_every_write_command_run_by_nobody_exits_7_before_touching_anything(readable_dir) -> None:
    tmp_path = readable_dir
    root = new_store(tmp_path)
    before = snapshot(root)
    for args in WRITE_COMMANDS + [("image", "create", str(tmp_path / "src"), "other"), ("rollback",)]:
        proc = as_nobody(root, *args)
        assert proc.returncode == 7, (args, proc.stderr)
        assert "run it as root" in proc.stderr
    assert snapshot(root) == before
    # nor does nobody make a store where they could write one
    theirs = tmp_path / "nobody"
    theirs.mkdir()
    os.chown(theirs, NOBODY, NOBODY)
    proc = as_nobody(theirs / "store", "image", "create", str(tmp_path / "src"), "x")
    assert proc.returncode == 7, proc.stderr
    assert list(theirs.iterdir()) == []
