"""Loop devices on the real kernel: what a read-only attach configures, and that it lets go."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from aptlayer.linux import loop

pytestmark = pytest.mark.root


@pytest.fixture
def loop_control(as_root: None) -> None:
    if not os.path.exists("/dev/loop-control"):
        pytest.skip("no /dev/loop-control (loop driver missing)")


def sysfs(device: str, name: str) -> str:
    return Path(f"/sys/block/{os.path.basename(device)}/{name}").read_text().strip()


def test_attach_read_only(loop_control: None, tmp_path: Path) -> None:
    backing = tmp_path / "backing"
    data = os.urandom(3 * loop.BLOCK_SIZE)
    backing.write_bytes(data)
    fd = os.open(backing, os.O_RDONLY)
    try:
        device, loop_fd = loop.attach_read_only(fd)
    finally:
        os.close(fd)
    try:
        assert sysfs(device, "loop/backing_file") == str(backing)
        assert (sysfs(device, "ro"), sysfs(device, "loop/dio"), sysfs(device, "loop/autoclear")) == ("1", "1", "1")
        assert sysfs(device, "queue/logical_block_size") == str(loop.BLOCK_SIZE)
        assert os.pread(loop_fd, len(data), 0) == data
    finally:
        os.close(loop_fd)
    # autoclear: the last fd gone, the device is free again
    assert not os.path.exists(f"/sys/block/{os.path.basename(device)}/loop/backing_file")


def test_a_file_the_kernel_refuses(loop_control: None, tmp_path: Path) -> None:
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        with pytest.raises(loop.ConfigureError) as exc:
            loop.attach_read_only(fd)
    finally:
        os.close(fd)
    assert exc.value.errno == errno.EINVAL  # a directory cannot back a device
