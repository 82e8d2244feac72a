"""Rule 2 of docs/security.md: a symlink planted in the store never sends apt-layer outside it.

Each attack plants a symlink to a directory holding a canary (a file named
like what apt-layer would remove there) and runs the operations that
remove things: gc, gc --full, recover, fsck. The canary must survive. The
swaps during an operation stop the operation at a named fault point
(``APT_LAYER_PAUSE``), swap, and let it go on.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from aptlayer.linux import beneath
from aptlayer.store import Store

from crashkit import cli_env, run_cli
from test_review_defects import finish, paused, resume

CANARY = b"do not delete me\n"


def make_tree(path: Path, tag: str) -> Path:
    (path / "usr").mkdir(parents=True)
    (path / "usr" / "big").write_bytes(tag.encode() * 5000)  # an object, not inline
    (path / "usr" / "other").write_bytes(tag.encode() * 7000)
    return path


def objects_of(root: Path, name: str) -> list[str]:
    store = Store.open(root)
    try:
        return sorted(obj for obj, _ in store.journal.manifest(store.journal.image(name).digest))
    finally:
        store.close()


def canary_dir(tmp_path: Path, *names: str) -> Path:
    """A directory outside the store holding a canary file under each name (and a subfolder with one)."""
    d = tmp_path / "elsewhere"
    d.mkdir()
    for name in names:
        (d / name).write_bytes(CANARY)
    (d / "sub").mkdir()
    (d / "sub" / "canary").write_bytes(CANARY)
    return d


def assert_canaries(d: Path, *names: str) -> None:
    for name in (*names, "sub/canary"):
        assert (d / name).read_bytes() == CANARY, name


def store_with_garbage(tmp_path: Path) -> tuple[Path, list[str]]:
    """A store whose image ``gone`` was deleted: its objects are garbage for the next gc."""
    root = tmp_path / "store"
    run_cli(root, "image", "create", str(make_tree(tmp_path / "keep", "k")), "keep")
    run_cli(root, "image", "create", str(make_tree(tmp_path / "gone", "g")), "gone")
    garbage = objects_of(root, "gone")
    run_cli(root, "image", "delete", "gone")
    return root, garbage


@pytest.mark.parametrize("args", [("gc",), ("gc", "--full"), ("recover",), ("fsck",)])
def test_a_fan_out_directory_that_is_a_symlink_is_never_followed(tmp_path: Path, args) -> None:
    """``objects/ab -> /some/dir``: the garbage object's name there is a canary, not an object."""
    root, garbage = store_with_garbage(tmp_path)
    fan, rest = garbage[0].split("/")
    elsewhere = canary_dir(tmp_path, rest)
    fan_dir = root / "images" / "objects" / fan
    for f in fan_dir.iterdir():
        f.unlink()
    fan_dir.rmdir()
    fan_dir.symlink_to(elsewhere)
    run_cli(root, *args, check=False)
    assert_canaries(elsewhere, rest)
    assert fan_dir.is_symlink()


@pytest.mark.parametrize("args", [("gc",), ("gc", "--full"), ("recover",), ("image", "delete", "keep")])
def test_a_trash_that_is_a_symlink_to_root_is_refused(tmp_path: Path, args) -> None:
    root, _ = store_with_garbage(tmp_path)
    elsewhere = canary_dir(tmp_path, "object")
    (root / "trash").rmdir()
    (root / "trash").symlink_to(elsewhere)
    proc = run_cli(root, *args, check=False)
    assert proc.returncode == 6, proc.stderr
    assert "is a symlink" in proc.stderr
    assert_canaries(elsewhere, "object")


def test_trash_swapped_for_a_symlink_during_gc_empties_only_the_real_trash(tmp_path: Path) -> None:
    root, _ = store_with_garbage(tmp_path)
    elsewhere = canary_dir(tmp_path, "0123456789abcdef")
    gc = paused(root, "gc.after-first-trash", "gc")
    (root / "trash").rename(root / "trash.real")
    (root / "trash").symlink_to(elsewhere)
    resume(gc)
    [(rc, err)] = finish(gc)
    assert rc == 0, err
    assert_canaries(elsewhere, "0123456789abcdef")
    assert list((root / "trash.real").iterdir()) == []  # what gc moved there went


def test_staging_swapped_for_a_symlink_during_recover_is_left_alone(tmp_path: Path) -> None:
    root = tmp_path / "store"
    run_cli(root, "image", "create", str(make_tree(tmp_path / "a", "a")), "a")
    killed = run_cli(root, "image", "create", str(make_tree(tmp_path / "b", "b")), "b",
                     env=cli_env(APT_LAYER_FAULT="create.after-commit"), check=False)
    assert killed.returncode < 0  # committed, not placed: recovery places it, then clears staging
    elsewhere = canary_dir(tmp_path, "0123456789abcdef-0123456789abcdef")
    (elsewhere / "leftover-dir").mkdir()
    (elsewhere / "leftover-dir" / "canary").write_bytes(CANARY)
    recovering = paused(root, "recover.after-place", "recover", "--json")
    (root / "staging").rename(root / "staging.real")
    (root / "staging").symlink_to(elsewhere)
    resume(recovering)
    finish(recovering)
    assert_canaries(elsewhere, "0123456789abcdef-0123456789abcdef", "leftover-dir/canary")
    assert (root / "staging").is_symlink()


def test_open_beneath_refuses_symlinks_dotdot_and_absolute_paths_with_and_without_openat2(tmp_path: Path) -> None:
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "a" / "link").symlink_to("/etc")
    (tmp_path / "a" / "rel").symlink_to("b")
    top = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for fallback in (None, False):
            beneath.force_fallback(fallback)
            fd = beneath.open_dir_beneath(top, "a/b")
            assert os.readlink(f"/proc/self/fd/{fd}") == str(tmp_path / "a" / "b")
            os.close(fd)
            for path, code in [("a/link", errno.ELOOP), ("a/rel", errno.ELOOP), ("a/link/passwd", None),
                               ("../x", errno.EXDEV), ("/etc", errno.EXDEV), ("a/b/../b", errno.EXDEV)]:
                with pytest.raises(OSError) as caught:
                    beneath.open_beneath(top, path, os.O_RDONLY)
                if code is not None:
                    assert caught.value.errno == code, path
    finally:
        beneath.force_fallback(None)
        os.close(top)
