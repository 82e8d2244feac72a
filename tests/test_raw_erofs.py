"""An image apt-layer writes is a plain erofs file system to the kernel.

`mount -t erofs -o ro,loop IMAGE` (no overlay) shows everything the image
stores: the 256 whiteout stubs, the root's opaque marker, and on external
files the raw `trusted.overlay.metacopy` (00 24 00 01 + fs-verity digest)
and `trusted.overlay.redirect` (/xx/yyyy...) xattrs. Needs root and erofs.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from aptlayer.composefs import build, fsverity

pytestmark = pytest.mark.root


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    t = tmp_path / "tree"
    (t / "usr" / "bin").mkdir(parents=True)
    (t / "usr" / "bin" / "tool").write_bytes(bytes(range(256)) * 40)
    (t / "etc").mkdir()
    (t / "etc" / "motd").write_text("hello\n")
    os.symlink("../etc/motd", t / "usr" / "motd")
    return t


@pytest.fixture
def raw_mount(tmp_path: Path, tree: Path, as_root):
    if "erofs" not in Path("/proc/filesystems").read_text():
        pytest.skip("kernel lacks erofs")
    built = build.make_image(str(tree), digest_store=str(tmp_path / "objects"))
    image = tmp_path / "image.cfs"
    image.write_bytes(built.image)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "erofs", "-o", "ro,loop", str(image), str(mnt)], check=True)
    try:
        yield mnt, built
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def test_raw_erofs_mount_shows_the_overlay_xattrs(raw_mount, tree):
    mnt, _ = raw_mount
    content = (tree / "usr" / "bin" / "tool").read_bytes()
    digest = fsverity.digest_bytes(content)
    tool = mnt / "usr" / "bin" / "tool"
    assert os.getxattr(tool, "trusted.overlay.metacopy") == b"\x00\x24\x00\x01" + digest
    assert os.getxattr(tool, "trusted.overlay.redirect") == b"/" + fsverity.object_path(digest).encode()
    assert tool.stat().st_size == len(content)
    # Inline files carry their content, symlinks their target.
    assert (mnt / "etc" / "motd").read_text() == "hello\n"
    assert os.readlink(mnt / "usr" / "motd") == "../etc/motd"


def test_raw_erofs_mount_shows_stubs_and_the_opaque_root(raw_mount):
    mnt, _ = raw_mount
    names = sorted(os.listdir(mnt))
    stubs = [n for n in names if len(n) == 2 and all(c in "0123456789abcdef" for c in n)]
    assert stubs == [f"{i:02x}" for i in range(256)]
    assert sorted(set(names) - set(stubs)) == ["etc", "usr"]
    st = os.lstat(mnt / "00")
    assert (st.st_mode & 0o170000, st.st_rdev) == (0o020000, 0)
    assert os.getxattr(mnt, "trusted.overlay.opaque") == b"y"
