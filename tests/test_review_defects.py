"""Regression tests for the data-loss defects of the review (issue 17), one or more per finding.

Each reproduces the finding as it was reported, with real processes where two
operations must interleave: the first stops itself at a named point
(``APT_LAYER_PAUSE``), the second runs, the first goes on.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from aptlayer.composefs import fsverity
from aptlayer.store import Store

from crashkit import check_committed_images, cli_args, cli_env, run_cli, spawn_cli


def make_tree(path: Path, tag: str) -> Path:
    (path / "etc").mkdir(parents=True)
    (path / "etc" / "os-release").write_text(f"NAME={tag}\n" * 20)
    (path / "usr").mkdir()
    (path / "usr" / tag).write_bytes(tag.encode() * 100)
    return path


def paused(root: Path, point: str, *args: str) -> subprocess.Popen:
    """Start an apt-layer command and return once it has stopped itself at ``point``."""
    proc = spawn_cli(root, *args, env=cli_env(APT_LAYER_PAUSE=point))
    _, status = os.waitpid(proc.pid, os.WUNTRACED)
    if not os.WIFSTOPPED(status):
        raise AssertionError(f"{' '.join(args)} ended before {point}: status {status}")
    return proc


def resume(proc: subprocess.Popen) -> None:
    os.kill(proc.pid, signal.SIGCONT)


def settle(proc: subprocess.Popen, seconds: float = 1.0) -> bool:
    """Give a second command time to finish; False if it is still waiting (on a lock)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return True
        time.sleep(0.02)
    return False


def finish(*procs: subprocess.Popen) -> list[tuple[int, str]]:
    out = []
    for p in procs:
        _, err = p.communicate(timeout=120)
        out.append((p.returncode, err))
    return out


def store_problems(root: Path) -> list[str]:
    store = Store.open(root)
    try:
        return check_committed_images(store)
    finally:
        store.close()


# --- finding 2: delete X racing create X ------------------------------------------------


def test_delete_paused_after_commit_does_not_unlink_a_new_image_of_the_same_name(tmp_path: Path) -> None:
    root = tmp_path / "store"
    run_cli(root, "image", "create", str(make_tree(tmp_path / "old", "old")), "x")
    deleting = paused(root, "delete.after-commit", "image", "delete", "x")
    creating = spawn_cli(root, "image", "create", str(make_tree(tmp_path / "new", "new")), "x")
    settle(creating)
    resume(deleting)
    (rc_delete, err_delete), (rc_create, err_create) = finish(deleting, creating)
    assert rc_delete == 0, err_delete
    assert rc_create == 0, err_create
    assert store_problems(root) == []
    store = Store.open(root)
    try:
        image = store.journal.image("x")
        assert image is not None
        assert fsverity.digest_file(str(store.image_path("x"))).hex() == image.digest
    finally:
        store.close()


# --- finding 5: two deploys interleaved ----------------------------------------------------


def test_deploys_interleaved_leave_the_links_as_the_journal_says(tmp_path: Path) -> None:
    root = tmp_path / "store"
    for name in ("x", "y", "z"):
        run_cli(root, "image", "create", str(make_tree(tmp_path / name, name)), name)
    run_cli(root, "deploy", "x")
    first = paused(root, "links.after-temp", "deploy", "y")
    second = spawn_cli(root, "deploy", "z")
    settle(second)
    resume(first)
    assert [rc for rc, _ in finish(first, second)] == [0, 0]
    assert store_problems(root) == []
    store = Store.open(root)
    try:
        deps = store.journal.deployments()
        assert (deps["current"].image, deps["previous"].image) == ("z", "y")
    finally:
        store.close()


# --- finding 4: symlinks in staging/ ------------------------------------------------------


def canary(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "keep-me").write_text("canary\n")
    (path / "sub").mkdir()
    (path / "sub" / "also").write_text("canary\n")
    return path


def canary_intact(path: Path) -> bool:
    return (path / "keep-me").read_text() == "canary\n" and (path / "sub" / "also").read_text() == "canary\n"


def test_recover_refuses_a_staging_folder_replaced_by_a_symlink(tmp_path: Path) -> None:
    root = tmp_path / "store"
    run_cli(root, "recover")
    victim = canary(tmp_path / "victim")
    (root / "staging").rmdir()
    (root / "staging").symlink_to(victim)
    proc = run_cli(root, "recover", check=False)
    assert proc.returncode == 6, proc.stderr
    assert "staging is a symlink" in proc.stderr and "replace it with a directory" in proc.stderr
    assert canary_intact(victim)


def test_tx_rollback_leaves_a_planted_staging_symlink_and_its_target_alone(tmp_path: Path) -> None:
    root = tmp_path / "store"
    tx = run_cli(root, "tx", "begin").stdout.strip()
    victim = canary(tmp_path / "victim")
    (root / "staging" / f"anything-{tx}").symlink_to(victim)
    proc = run_cli(root, "tx", "rollback", tx, check=False)
    assert proc.returncode == 0, proc.stderr
    assert canary_intact(victim)
    assert (root / "staging" / f"anything-{tx}").is_symlink()
    store = Store.open(root)
    try:
        assert store.journal.transaction_state(tx) == "aborted"
    finally:
        store.close()


def test_recover_reports_a_staging_symlink_and_follows_none(tmp_path: Path) -> None:
    root = tmp_path / "store"
    run_cli(root, "recover")
    victim = canary(tmp_path / "victim")
    (root / "staging" / "0000-dead").symlink_to(victim)
    proc = run_cli(root, "recover", "--json", check=False)
    assert canary_intact(victim)
    assert (root / "staging" / "0000-dead").is_symlink()
    assert "symlink in staging" in proc.stdout


# --- finding 6: recover and an unknown file with a deleted image's name --------------------


def test_recover_keeps_an_unknown_file_that_carries_a_deleted_images_name(tmp_path: Path) -> None:
    root = tmp_path / "store"
    run_cli(root, "image", "create", str(make_tree(tmp_path / "a", "a")), "a")
    run_cli(root, "image", "create", str(make_tree(tmp_path / "b", "b")), "b")
    backup = (root / "images" / "b.composefs").read_bytes()
    run_cli(root, "image", "delete", "a")
    (root / "images" / "a.composefs").write_bytes(backup)  # restored from elsewhere by hand
    proc = run_cli(root, "recover", "--json", check=False)
    assert (root / "images" / "a.composefs").read_bytes() == backup
    assert "unknown image file" in proc.stdout


def test_recover_still_unlinks_the_file_a_committed_delete_left(tmp_path: Path) -> None:
    root = tmp_path / "store"
    run_cli(root, "image", "create", str(make_tree(tmp_path / "a", "a")), "a")
    run_cli(root, "image", "delete", "a", env=cli_env(APT_LAYER_FAULT="delete.after-commit"), check=False)
    assert (root / "images" / "a.composefs").exists()
    run_cli(root, "recover")
    assert not (root / "images" / "a.composefs").exists()


# --- finding 9: a mistyped --root ---------------------------------------------------------


def test_reading_commands_never_create_a_store(tmp_path: Path) -> None:
    root = tmp_path / "typo"
    for args in (["status"], ["image", "list"], ["log"], ["tx", "list"], ["journal", "verify"],
                 ["audit", "SELECT 1"], ["gc", "--dry-run"], ["fsck"], ["image", "info", "x"]):
        proc = run_cli(root, *args, check=False)
        assert proc.returncode == 3, (args, proc.stderr)
        assert f"no apt-layer store at {root}" in proc.stderr, (args, proc.stderr)
        assert not root.exists(), args


def test_an_empty_root_is_an_error(tmp_path: Path) -> None:
    for args, env in ((["--root", ""], cli_env()), ([], cli_env(APT_LAYER_ROOT=""))):
        proc = subprocess.run([sys.executable, "-m", "aptlayer", *args, "status"],
                              cwd=tmp_path, env=env, capture_output=True, text=True)
        assert proc.returncode == 2, proc.stderr
        assert list(tmp_path.iterdir()) == [], proc.stderr


def test_writing_commands_create_the_store_at_the_given_root(tmp_path: Path) -> None:
    root = tmp_path / "new"
    run_cli(root, "image", "create", str(make_tree(tmp_path / "t", "t")), "t")
    assert (root / "journal.db").is_file()
    assert "t" in run_cli(root, "image", "list").stdout


# --- finding 10: images whose objects are missing ------------------------------------------


def test_an_image_from_a_dump_lacking_objects_is_created_with_a_warning_and_never_deployed(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    run_cli(a, "image", "create", str(make_tree(tmp_path / "t", "t")), "t")
    dump = tmp_path / "t.dump"
    dump.write_text(run_cli(a, "image", "dump", "t").stdout)
    proc = run_cli(b, "image", "create", "--from-file", str(dump), "t")
    assert "references 2 objects the store lacks" in proc.stderr
    assert "apt-layer image missing-objects t" in proc.stderr
    proc = run_cli(b, "deploy", "t", check=False)
    assert proc.returncode == 6
    assert "2 of its objects are missing" in proc.stderr
    tx = run_cli(b, "tx", "begin").stdout.strip()
    assert run_cli(b, "deploy", "--tx", tx, "t", check=False).returncode == 6
    store = Store.open(b)
    try:
        assert store.journal.deployments() == {}
    finally:
        store.close()


def test_rollback_to_an_image_whose_objects_went_missing_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "store"
    run_cli(root, "image", "create", str(make_tree(tmp_path / "x", "x")), "x")
    run_cli(root, "image", "create", str(make_tree(tmp_path / "y", "y")), "y")
    run_cli(root, "deploy", "x")
    run_cli(root, "deploy", "y")
    store = Store.open(root)
    try:
        unique = {o for o, _ in store.journal.manifest(store.journal.image("x").digest)} - \
                 {o for o, _ in store.journal.manifest(store.journal.image("y").digest)}
    finally:
        store.close()
    for obj in unique:
        (root / "images" / "objects" / obj).unlink()
    proc = run_cli(root, "rollback", check=False)
    assert proc.returncode == 6 and "cannot be deployed" in proc.stderr


# --- findings 3 and 11: mounts (root, erofs and overlayfs) -----------------------------------


def test_unmount_refuses_a_mount_another_store_made(tmp_path: Path, kernel: None) -> None:
    mine, theirs = tmp_path / "mine", tmp_path / "theirs"
    run_cli(theirs, "image", "create", str(make_tree(tmp_path / "t", "t")), "t")
    run_cli(mine, "image", "create", str(make_tree(tmp_path / "u", "u")), "u")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    run_cli(theirs, "image", "mount", "t", str(mnt))
    try:
        proc = run_cli(mine, "image", "unmount", str(mnt), check=False)
        assert proc.returncode == 4, proc.stderr
        assert "not a mount of this store" in proc.stderr and "--force" in proc.stderr
        assert (mnt / "usr" / "t").read_bytes() == b"t" * 100
        run_cli(mine, "image", "unmount", "--force", str(mnt))
        assert not (mnt / "usr").exists()
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True)


def test_a_mount_in_another_mount_namespace_is_not_lost_and_keeps_its_objects(tmp_path: Path, kernel: None) -> None:
    if shutil.which("unshare") is None:
        pytest.skip("unshare (util-linux) is not installed")
    root = tmp_path / "store"
    run_cli(root, "image", "create", str(make_tree(tmp_path / "x", "x")), "x")
    mnt, ready = tmp_path / "mnt", tmp_path / "ready"
    mnt.mkdir()
    mount = " ".join(cli_args(root, "image", "mount", "x", str(mnt)))
    holder = subprocess.Popen(["unshare", "-m", "--propagation", "private", "sh", "-c",
                               f"{mount} && touch {ready} && exec sleep 120"], env=cli_env())
    try:
        while not ready.exists():
            assert holder.poll() is None, "the mount in the other namespace failed"
            time.sleep(0.05)
        assert "mount.lost" not in run_cli(root, "recover", "--json").stdout
        assert run_cli(root, "image", "delete", "x", check=False).returncode == 4
        run_cli(root, "gc", "--full")
        store = Store.open(root)
        try:
            assert store.missing_objects("x") == []
        finally:
            store.close()
        assert run_cli(root, "image", "unmount", str(mnt), check=False).returncode == 4
    finally:
        holder.kill()
        holder.wait()
    assert "mount.lost" in run_cli(root, "recover", "--json").stdout  # the namespace died with its mount


# --- finding 12: recover and status report damage and dead transactions ----------------------


def test_recover_and_status_report_a_missing_object_of_a_deployed_image(tmp_path: Path) -> None:
    root = tmp_path / "store"
    run_cli(root, "image", "create", str(make_tree(tmp_path / "x", "x")), "x")
    run_cli(root, "deploy", "x")
    store = Store.open(root)
    try:
        obj = store.journal.manifest(store.journal.image("x").digest)[0][0]
    finally:
        store.close()
    (root / "images" / "objects" / obj).unlink()
    proc = run_cli(root, "recover", check=False)
    assert proc.returncode == 10
    assert "the current deployment lacks 1 of its objects" in proc.stderr
    assert "nothing to recover" not in proc.stdout
    assert "the current deployment lacks 1 of its objects" in run_cli(root, "status").stdout


def test_status_reports_a_transaction_whose_process_is_gone(tmp_path: Path) -> None:
    root = tmp_path / "store"
    run_cli(root, "image", "create", str(make_tree(tmp_path / "x", "x")), "x",
            env=cli_env(APT_LAYER_FAULT="create.after-begin"), check=False)
    out = run_cli(root, "status").stdout
    assert "is open but its process" in out and "is gone" in out, out
    run_cli(root, "recover")
    out = run_cli(root, "status").stdout
    assert "Problem" not in out, out
