"""Regression tests for the data-loss defects of the review (issue 17), one or more per finding.

Each reproduces the finding as it was reported, with real processes where two
operations must interleave: the first stops itself at a named point
(``APT_LAYER_PAUSE``), the second runs, the first goes on.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

from aptlayer.composefs import fsverity
from aptlayer.store import Store

from crashkit import check_committed_images, cli_env, run_cli, spawn_cli


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
        assert fsverity.digest_file(str(store.image_path("x"))).hex() == image["digest"]
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
        assert (deps["current"]["image"], deps["previous"]["image"]) == ("z", "y")
    finally:
        store.close()
