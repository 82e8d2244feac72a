"""The mount system calls on the real kernel, with tmpfs (no image needed)."""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from aptlayer.linux import mountapi
from aptlayer.linux.mountinfo import is_mounted, mounts_at

pytestmark = pytest.mark.root


@pytest.fixture
def point(tmp_path: Path, as_root: None) -> Iterator[Path]:
    path = tmp_path / "point"
    path.mkdir()
    try:
        yield path
    finally:
        while is_mounted(path):
            mountapi.umount(str(path), mountapi.MNT_DETACH)


def test_new_api_mounts_detached_then_attaches(point: Path) -> None:
    try:
        ctx = mountapi.FsContext("tmpfs")
    except OSError as e:
        if e.errno == errno.ENOSYS:
            pytest.skip("no new mount API (fsopen) in this kernel")
        raise
    try:
        with pytest.raises(OSError) as exc:
            ctx.string("apt-layer-bogus", "x")
        assert exc.value.errno == errno.EINVAL
        assert "apt-layer-bogus" in ctx.log()  # the kernel said why
        assert ctx.log() == ""  # and said it once
        ctx.string("source", "apt-layer-new")
        ctx.string("size", "1m")
        ctx.create()
        mnt = ctx.mount(mountapi.MOUNT_ATTR_RDONLY)
    finally:
        ctx.close()
    try:
        assert not is_mounted(point)  # detached until moved
        mountapi.move_mount(mnt, str(point))
    finally:
        os.close(mnt)
    [info] = mounts_at(point)
    assert (info.fstype, info.source, info.options[0]) == ("tmpfs", "apt-layer-new", "ro")
    mountapi.umount(str(point))
    assert not is_mounted(point)


def test_legacy_mount_and_busy_umount(point: Path) -> None:
    mountapi.legacy_mount("apt-layer-legacy", str(point), "tmpfs", mountapi.MS_RDONLY, "size=1m")
    [info] = mounts_at(point)
    assert (info.fstype, info.source, info.options[0]) == ("tmpfs", "apt-layer-legacy", "ro")
    assert "size=1024k" in info.super_options
    fd = os.open(point, os.O_RDONLY | os.O_DIRECTORY)
    try:
        with pytest.raises(OSError) as exc:
            mountapi.umount(str(point))
        assert exc.value.errno == errno.EBUSY
        mountapi.umount(str(point), mountapi.MNT_DETACH)
        assert not is_mounted(point)
    finally:
        os.close(fd)
