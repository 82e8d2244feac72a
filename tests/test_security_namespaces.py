"""Known defect of issue 15: a mount namespace pinned only by an nsfs bind mount.

``unshare --mount=FILE`` leaves a namespace no process is in; a composefs
mount made there stays mounted and keeps using the store's objects, but a
scan of ``/proc/*/mountinfo`` never sees it. Recovery must still find it
(here, with a real ``unshare``) and not mark it lost, or gc would take its
objects.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from crashkit import REPO, cli_env, run_cli

pytestmark = pytest.mark.root


@pytest.fixture
def pin_dir(tmp_path: Path, kernel):
    if shutil.which("unshare") is None or shutil.which("nsenter") is None:
        pytest.skip("needs unshare and nsenter (util-linux)")
    pins = tmp_path / "pins"
    pins.mkdir()
    # a namespace file can be bind-mounted only on a mount that does not propagate
    subprocess.run(["mount", "--bind", str(pins), str(pins)], check=True)
    subprocess.run(["mount", "--make-private", str(pins)], check=True)
    yield pins
    for pin in pins.iterdir():
        subprocess.run(["nsenter", f"--mount={pin}", "sh", "-c",
                        f"umount -l {tmp_path}/mnt 2>/dev/null || true"], check=False)
        subprocess.run(["umount", "-l", str(pin)], check=False)
    subprocess.run(["umount", "-l", str(pins)], check=False)


def test_a_mount_in_a_namespace_pinned_only_by_nsfs_is_not_marked_lost(tmp_path: Path, pin_dir: Path) -> None:
    root = tmp_path / "store"
    src = tmp_path / "src"
    (src / "usr").mkdir(parents=True)
    (src / "usr" / "data").write_bytes(b"pinned " * 2000)
    run_cli(root, "image", "create", str(src), "img")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    pin = pin_dir / "ns"
    pin.touch()
    apt_layer = " ".join([sys.executable, "-m", "aptlayer", "--root", str(root), "-q"])
    proc = subprocess.run(["unshare", f"--mount={pin}", "--propagation", "private", "sh", "-c",
                           f"{apt_layer} image mount img {mnt}"], env=cli_env(), capture_output=True, text=True,
                          cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    # no process is in the namespace now: only the pin keeps it, and its mount, alive
    inside = subprocess.run(["nsenter", f"--mount={pin}", "cat", str(mnt / "usr" / "data")], capture_output=True)
    assert inside.stdout == b"pinned " * 2000
    report = json.loads(run_cli(root, "recover", "--json").stdout)
    assert not [a for a in report["actions"] if a["kind"] == "mount.lost"], report
    status = json.loads(run_cli(root, "status", "--json").stdout)
    assert [(m["mountpoint"], m["state"]) for m in status["mounts"]] == [(str(mnt), "mounted")]
    run_cli(root, "gc", "--full")
    inside = subprocess.run(["nsenter", f"--mount={pin}", "cat", str(mnt / "usr" / "data")], capture_output=True)
    assert inside.stdout == b"pinned " * 2000


def test_pins_are_the_nsfs_mounts_of_mount_namespaces_only() -> None:
    from aptlayer.linux.nsfs import pins

    rows = [("nsfs", "mnt:[4026532801]", "/run/ns/a"), ("nsfs", "net:[4026532900]", "/run/netns/b"),
            ("ext4", "/", "/"), ("nsfs", "/mnt:[7]", "/x")]
    assert pins(rows) == [(4026532801, "/run/ns/a"), (7, "/x")]
