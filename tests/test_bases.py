"""Base images: import(export(image)) is the same image, for tarballs and squashfs; a real bootstrap.

Export mounts the image, so these need root, erofs and overlayfs.
"""

from __future__ import annotations

import os
import shutil
import stat
from pathlib import Path

import pytest

from aptlayer import bases, errors
from aptlayer.store import Store

pytestmark = pytest.mark.root
NS = 123_456_789


def rich_tree(root: Path, nanoseconds: bool) -> Path:
    """Owners, modes, xattrs, hard links, symlinks, device nodes, a fifo, and set mtimes."""
    (root / "etc").mkdir(parents=True)
    (root / "usr" / "bin").mkdir(parents=True)
    (root / "etc" / "config").write_text("key = value\n" * 10)
    (root / "usr" / "bin" / "tool").write_bytes(b"\x7fELF" + os.urandom(5000))
    os.chmod(root / "usr" / "bin" / "tool", 0o4755)
    os.link(root / "usr" / "bin" / "tool", root / "usr" / "bin" / "tool-again")
    (root / "etc" / "small").write_text("inline\n")
    os.chown(root / "etc" / "small", 1234, 5678)
    os.setxattr(root / "etc" / "config", "user.note", b"kept")
    os.setxattr(root / "usr" / "bin" / "tool", "security.capability",
                bytes.fromhex("0100000200200000000000000000000000000000"))
    (root / "link").symlink_to("etc/config")
    os.mknod(root / "etc" / "null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    os.mkfifo(root / "etc" / "fifo")
    ns = NS if nanoseconds else 0
    for path in sorted(root.rglob("*"), key=lambda p: -len(p.parts)) + [root]:
        os.utime(path, ns=(1_700_000_000 * 10**9 + ns, 1_700_000_000 * 10**9 + ns), follow_symlinks=False)
    return root


@pytest.mark.parametrize("suffix", [".tar", ".tar.zst", ".tar.gz", ".squashfs"])
def test_import_of_an_export_is_the_same_image(tmp_path: Path, kernel: None, suffix: str) -> None:
    if suffix == ".squashfs" and shutil.which("mksquashfs") is None:
        pytest.skip("squashfs-tools is not installed")
    store = Store.open(tmp_path / "store")
    try:
        tree = rich_tree(tmp_path / "tree", nanoseconds=suffix != ".squashfs")  # squashfs keeps seconds only
        made = store.create(str(tree), "orig")
        archive = tmp_path / f"orig{suffix}"
        exported = bases.export_file(store, "orig", str(archive))
        assert exported["format"] == ("squashfs" if suffix == ".squashfs" else "tar") and archive.stat().st_size > 0
        imported = bases.import_file(store, str(archive), "again")
        assert imported["digest"] == made["digest"]
        assert list(store.staging_dir.iterdir()) == []
        event = next(store.journal.events(subject="again", kind="image.created"))
        assert event.data["origin"]["import"]["format"] == exported["format"]
    finally:
        store.close()


def test_export_never_overwrites_and_import_names_bad_files(tmp_path: Path, kernel: None) -> None:
    store = Store.open(tmp_path / "store")
    try:
        store.create(str(rich_tree(tmp_path / "tree", True)), "orig")
        (tmp_path / "there.tar").write_text("mine")
        with pytest.raises(errors.Conflict, match="does not overwrite"):
            bases.export_file(store, "orig", str(tmp_path / "there.tar"))
        assert (tmp_path / "there.tar").read_text() == "mine"
        with pytest.raises(errors.InvalidInput, match="not a tarball"):
            bases.import_file(store, str(tmp_path / "there.txt"), "x") if (tmp_path / "there.txt").write_text("x") \
                else None
        with pytest.raises(errors.NotFound):
            bases.import_file(store, str(tmp_path / "missing.tar"), "x")
        (tmp_path / "broken.tar").write_bytes(b"not a tar at all" * 100)
        with pytest.raises(errors.AptLayerError, match="importing"):
            bases.import_file(store, str(tmp_path / "broken.tar"), "x")
        assert store.journal.image("x") is None and list(store.staging_dir.iterdir()) == []
    finally:
        store.close()


def test_bootstrap_makes_a_base_image_that_records_how(tmp_path: Path, kernel: None) -> None:
    from aptlayer.packages.sources import read_sources

    if shutil.which("mmdebstrap") is None:
        pytest.skip("mmdebstrap is not installed (tools/setup.sh installs it)")
    try:
        read_sources()
    except errors.AptLayerError as e:
        pytest.skip(f"no apt sources on this host: {e}")
    store = Store.open(tmp_path / "store")
    try:
        try:
            result = bases.bootstrap(store, "bookworm", "bookworm-base", include=("hello",))
        except errors.AptLayerError as e:
            if "unreachable" in str(e).lower() or "Failed to fetch" in str(e):
                pytest.skip(f"the Debian archive cannot be reached: {e}")
            raise
        event = next(store.journal.events(subject="bookworm-base", kind="image.created"))
        assert event.data["origin"]["bootstrap"]["suite"] == "bookworm"
        assert event.data["origin"]["bootstrap"]["mirror"].startswith(("http", "file", "copy"))
        assert result["objects"] > 1000
        assert store.missing_objects("bookworm-base") == []
        assert list(store.staging_dir.iterdir()) == []
    finally:
        store.close()
