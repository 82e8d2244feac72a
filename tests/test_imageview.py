"""ImageView: the bounds-checked view of an image that the reader and the patcher share."""

from __future__ import annotations

import stat

import pytest

from aptlayer.composefs import format as fmt
from aptlayer.composefs.imageview import ImageFormatError, ImageView, InodeView
from aptlayer.composefs.reader import read_image
from aptlayer.composefs.tree import Node
from aptlayer.composefs.writer import build_image

from conftest import VECTORS, vector_names

NAMES = vector_names()
DIGEST_A, DIGEST_B, DIGEST_C = bytes(range(32)), bytes(range(1, 33)), bytes(range(2, 34))


def sample_tree() -> Node:
    """Two files sharing an xattr pair, each with a unique one too, a symlink and a small file."""
    root = Node()
    for name, digest in ((b"one", DIGEST_A), (b"two", DIGEST_B)):
        root.children[name] = Node(mode=stat.S_IFREG | 0o644, size=100_000, payload=name, digest=digest,
                                   xattrs={b"user.both": b"same", b"user.own": name})
    root.children[b"link"] = Node(mode=stat.S_IFLNK | 0o777, payload=b"one")
    root.children[b"small"] = Node(mode=stat.S_IFREG | 0o644, size=5, content=b"hello")
    return root


def by_name(view: ImageView) -> dict[bytes, InodeView]:
    return {name: ino for depth, name, _nid, ino in view.walk() if depth == 1 and ino is not None}


def test_xattr_entries_say_which_are_shared() -> None:
    """A (name, value) pair two inodes carry sits in the shared table; the rest are inline (§6.3)."""
    data = build_image(sample_tree())
    view = ImageView(data)
    inodes = by_name(view)
    for name in (b"one", b"two"):
        entries = {e.name: e for e in view.xattr_entries(inodes[name])}
        assert entries[b"user.both"].shared and entries[b"user.both"].value == b"same"
        assert not entries[b"user.own"].shared and entries[b"user.own"].value == name
        assert not entries[fmt.XATTR_METACOPY].shared and not entries[fmt.XATTR_REDIRECT].shared
    shared_one = {e.offset for e in view.xattr_entries(inodes[b"one"]) if e.shared}
    shared_two = {e.offset for e in view.xattr_entries(inodes[b"two"]) if e.shared}
    assert shared_one == shared_two  # one entry in the table, referenced twice


def test_writing_at_value_offset_changes_what_the_image_says() -> None:
    """The offsets are where the bytes are: the patcher's premise."""
    data = bytearray(build_image(sample_tree()))
    view = ImageView(bytes(data))
    [metacopy] = [e for e in view.xattr_entries(by_name(view)[b"one"]) if e.name == fmt.XATTR_METACOPY]
    start = metacopy.value_offset + len(fmt.METACOPY_HEADER)
    data[start : start + 32] = DIGEST_C
    tree = read_image(bytes(data))
    assert tree.children[b"one"].digest == DIGEST_C
    assert tree.children[b"two"].digest == DIGEST_B


@pytest.mark.skipif(not NAMES, reason="reference vectors not found")
@pytest.mark.parametrize("name", NAMES)
def test_xattr_entries_locate_every_xattr_of_the_vectors(name: str) -> None:
    data = (VECTORS / name / "image.cfs").read_bytes()
    view = ImageView(data)
    for _depth, _name, _nid, ino in view.walk():
        if ino is None:
            continue
        entries = view.xattr_entries(ino)
        assert [(e.name, e.value) for e in entries] == view.xattrs(ino)
        if not ino.xattr_size:
            assert entries == []
            continue
        body = ino.offset + ino.isize
        assert sum(e.shared for e in entries) == data[body + 4]
        for e in entries:
            assert e.value_offset == e.offset + fmt.XATTR_ENTRY_SIZE + data[e.offset]
            assert data[e.value_offset : e.value_offset + len(e.value)] == e.value
            assert e.name.endswith(data[e.offset + fmt.XATTR_ENTRY_SIZE : e.value_offset])
            if e.shared:
                assert view.xattr_start <= e.offset < len(data)
            else:
                assert body + fmt.XATTR_BODY_HEADER_SIZE <= e.offset < e.value_offset + len(e.value) <= ino.tail_offset


def test_superblock_fields() -> None:
    root = sample_tree()
    root.children[b"gone"] = Node(mode=stat.S_IFCHR | 0o644)  # a whiteout: format version 1
    data = build_image(root)
    assert ImageView(data).composefs_version == 1
    assert ImageView(build_image(root, max_version=0)).composefs_version == 0
    view = ImageView(data)
    assert view.size == len(data)
    assert view.root_nid == fmt.INODES_START // fmt.INODE_SLOT_SIZE
    assert view.inode(view.root_nid).ftype == stat.S_IFDIR


def test_content_and_data_ranges() -> None:
    view = ImageView(build_image(sample_tree()))
    inodes = by_name(view)
    assert view.content(inodes[b"link"]) == b"one"
    assert view.content(inodes[b"small"]) == b"hello"
    small = inodes[b"small"]
    assert view.data_ranges(small) == (0, 0, 5)  # all in the tail, after the xattrs
    with pytest.raises(ImageFormatError, match="layout"):
        view.content(inodes[b"one"])  # an external file's data is not in the image
    assert [name for name, _nid in view.dir_entries(view.inode(view.root_nid))][:4] == [
        b"00", b"01", b"02", b"03"]  # the whiteout stubs are entries; walk() leaves them out


@pytest.mark.parametrize("nid", [-1, -(1 << 40), 1 << 40, (1 << 64) - 1])
def test_inode_outside_the_image(nid: int) -> None:
    view = ImageView(build_image(sample_tree()))
    with pytest.raises(ImageFormatError, match="outside"):
        view.inode(nid)


def test_an_inode_without_xattrs_has_none() -> None:
    view = ImageView(build_image(sample_tree()))
    link = by_name(view)[b"link"]
    assert link.xattr_size == 0
    assert view.xattrs(link) == [] and view.xattr_entries(link) == []
