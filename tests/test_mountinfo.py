"""mountinfo: parsing the kernel's lines, and the mounts of this and other namespaces."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from aptlayer.linux.mountinfo import MountInfo, is_mounted, mount_info, mount_points_elsewhere, mounts_at, topmost


def test_mountinfo_line_is_parsed_and_unescaped() -> None:
    line = (rb"45 27 0:40 / /tmp/a\040b\011c\012d\134e rw,relatime shared:1 master:2 - overlay composefs "
            rb"ro,lowerdir+=/,datadir+=/srv/o\054x,redirect_dir=on,metacopy=on" b"\n")
    info = MountInfo.parse(line)
    assert info == MountInfo(
        mount_id=45, parent_id=27, major=0, minor=40, root="/", mount_point="/tmp/a b\tc\nd\\e",
        options=("rw", "relatime"), optional=("shared:1", "master:2"), fstype="overlay", source="composefs",
        super_options=("ro", "lowerdir+=/", "datadir+=/srv/o,x", "redirect_dir=on", "metacopy=on"))


def test_mount_info_lists_the_root() -> None:
    assert any(m.mount_point == "/" for m in mount_info())
    assert is_mounted("/") and is_mounted("/proc")
    assert not is_mounted("/proc/self")


@pytest.fixture
def point(tmp_path: Path, as_root: None) -> Iterator[Path]:
    """An empty directory, with whatever the test mounted on it unmounted afterwards."""
    path = tmp_path / "point"
    path.mkdir()
    try:
        yield path
    finally:
        while is_mounted(path):
            subprocess.run(["umount", "-l", str(path)], check=True)


def test_stacked_mounts_and_the_topmost(point: Path) -> None:
    for source in ("apt-layer-below", "apt-layer-above"):
        subprocess.run(["mount", "-t", "tmpfs", source, str(point)], check=True)
    stack = mounts_at(point)
    assert sorted(m.source for m in stack) == ["apt-layer-above", "apt-layer-below"]
    assert topmost(stack).source == topmost(stack[::-1]).source == "apt-layer-above"
    link = point.parent / "link"
    link.symlink_to(point)
    assert mounts_at(link) == stack and is_mounted(link)


def test_mounts_of_other_namespaces_are_found(point: Path) -> None:
    """A tmpfs mounted inside ``unshare -m`` is not mounted here, yet found through the process holding it."""
    source = f"apt-layer-elsewhere-{os.getpid()}"
    script = 'mount -t tmpfs "$1" "$2" && echo ready && exec sleep 600'
    child = subprocess.Popen(["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh",
                              source, str(point)], stdout=subprocess.PIPE)
    try:
        assert child.stdout is not None and child.stdout.readline() == b"ready\n"
        assert not is_mounted(point)
        assert mount_points_elsewhere(lambda m: m.source == source) == {str(point)}
        assert mount_points_elsewhere(lambda m: False) == set()
    finally:
        child.kill()
        child.wait()
    assert mount_points_elsewhere(lambda m: m.source == source) == set()
