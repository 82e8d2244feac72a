"""Write the image of a slightly changed tree by patching the image of the tree before.

When a tree keeps all its paths and only some entries changed their
content, size or times (a package upgrade rewriting files, a ``touch``),
the image :func:`.writer.build_image` would write differs from the old one
only inside those entries' inodes, provided nothing that decides the layout
moved:

* every changed entry keeps its type, mode, owner, link count and xattr
  names; only the values of ``trusted.overlay.metacopy`` and ``redirect``
  (which hold the content digest) may change, and only where they were
  stored in the inode itself, not in the shared table;
* a changed digest is used by no other inode, before or after, so no xattr
  moves into or out of the shared table (an inode with the maximum number of
  shared references is refused: there, inline does not mean unique);
* an external file stays external with the same number of chunk indexes;
  a small file or a symlink keeps its exact size (its bytes are replaced);
* the image's build time (the smallest mtime) stays the same, and every
  changed inode stays compact or extended as it was.

Then the patched image is byte for byte the one a full render would write;
otherwise :func:`patch_image` says so (None) and the caller renders.  The
root is never patched: it carries the whiteout stubs and the opaque marker.
"""

from __future__ import annotations

import stat
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from . import format as F
from .fsverity import RawDigest
from .imageview import ImageFormatError, ImageView, InodeView
from .tree import Node
from .writer import ImageError, chunk_count, chunk_format, is_compact, rewritten

_DIGEST_XATTRS = (F.XATTR_METACOPY, F.XATTR_REDIRECT)
_PATCHABLE = (stat.S_IFREG, stat.S_IFDIR, stat.S_IFLNK)


class _Refused(Exception):
    """This change cannot be patched in; the image must be rendered."""


@dataclass
class Patched:
    image: bytearray
    #: objects the old image referenced and the new one does not
    removed: set[RawDigest] = field(default_factory=set)
    #: objects the new image references and the old one did not, with their sizes
    added: dict[RawDigest, int] = field(default_factory=dict)


def patch_image(
    image: bytes, changes: Mapping[bytes, Node], in_image: Callable[[RawDigest], bool]
) -> Patched | None:
    """The image of the tree ``image`` was made from, with ``changes`` applied; None if it cannot be patched.

    ``changes`` maps paths (``/a/b``) to their new nodes; every path must be
    in the image, and every entry not in ``changes`` must be as the image
    has it (a directory's node stands for its own metadata, its children
    are ignored).  ``in_image(digest)`` says whether some inode of the old
    image has that content digest (a superset is fine: it only refuses more).
    """
    try:
        return _Patcher(image, in_image).run(changes)
    except (_Refused, ImageFormatError, ImageError):
        return None


class _Patcher:
    def __init__(self, image: bytes, in_image: Callable[[RawDigest], bool]) -> None:
        self.img = ImageView(image)
        self.version = self.img.composefs_version
        self.min_mtime = (self.img.build_time, self.img.build_time_nsec)
        self.in_image = in_image
        self.out = Patched(bytearray(image))
        self.dirs: dict[int, dict[bytes, int]] = {}
        self.patched: set[int] = set()

    def run(self, changes: Mapping[bytes, Node]) -> Patched:
        for path, node in changes.items():
            self._patch(path, node)
        return self.out

    def _lookup(self, path: bytes) -> int:
        """The nid of ``path``, walking the directories from the root."""
        if path == b"/" or not path.startswith(b"/"):
            raise _Refused("only entries below the root are patched")
        img = self.img
        nid = img.root_nid
        for name in path[1:].split(b"/"):
            entries = self.dirs.get(nid)
            if entries is None:
                ino = img.inode(nid)
                if ino.ftype != stat.S_IFDIR:
                    raise _Refused("not a directory")
                entries = self.dirs[nid] = dict(img.dir_entries(ino))
            child = entries.get(name)
            if child is None:
                raise _Refused("path not in the image")
            nid = child
        return nid

    def _patch(self, path: bytes, node: Node) -> None:
        nid = self._lookup(path)
        if nid in self.patched:
            raise _Refused("two paths name one inode")
        self.patched.add(nid)
        old = self.img.inode(nid)
        new = rewritten(node, path, self.version)
        if new.ftype not in _PATCHABLE or new.ftype != old.ftype:
            raise _Refused("file type")
        if (new.mode & 0xFFFF, new.uid, new.gid) != (old.mode, old.uid, old.gid):
            raise _Refused("mode or owner")
        if new.ftype != stat.S_IFDIR and new.nlink != old.nlink:
            raise _Refused("link count")
        header: dict = {}
        size = self._data(old, new, header)
        self._times(old, new, size, header)
        if header:
            self._header(old, **header)
        self._xattrs(old, new)

    def _data(self, old: InodeView, new, header: dict) -> int:
        """Patch the data, note new header fields; returns the size the compact test looks at."""
        if new.ftype == stat.S_IFDIR:
            return old.size  # the dirents are not the node's: its size is the image's
        external = new.ftype == stat.S_IFREG and new.content is None and new.size > 0
        if external != (old.layout == F.LAYOUT_CHUNK_BASED):
            raise _Refused("data layout")
        if external:
            if chunk_count(new.size) != chunk_count(old.size):
                raise _Refused("chunk count")
            header.update(size=new.size, u=(old.u & 0xFFFF0000) | chunk_format(new.size))
            return new.size
        data = new.content if new.ftype == stat.S_IFREG else new.payload
        data = data or b""
        if len(data) != old.size:
            raise _Refused("inline size")
        if data:
            block_start, block_len, tail_len = self.img.data_ranges(old)
            image = self.out.image
            image[block_start : block_start + block_len] = data[:block_len]
            image[old.tail_offset : old.tail_offset + tail_len] = data[block_len:]
        return old.size

    def _times(self, old: InodeView, new, size: int, header: dict) -> None:
        """Keep the build time and the inode's compact/extended form; patch the mtime."""
        low = self.min_mtime
        if new.mtime < low or ((old.mtime_sec, old.mtime_nsec) == low and new.mtime != low):
            raise _Refused("the smallest mtime would change")
        if new.ftype == stat.S_IFDIR:  # its size and link count come from its entries: the image's
            new.size, new.nlink = size, old.nlink
        compact = is_compact(new, low)
        if compact != (old.isize == F.INODE_COMPACT_SIZE):
            raise _Refused("compact or extended form")
        if not compact:
            header["mtime"] = new.mtime

    def _header(self, old: InodeView, *, size: int | None = None, u: int | None = None,
                mtime: tuple[int, int] | None = None) -> None:
        image = self.out.image
        extended = old.isize == F.INODE_EXTENDED_SIZE
        layout = F.INODE_EXTENDED if extended else F.INODE_COMPACT
        fields = list(layout.unpack_from(image, old.offset))
        size_at, u_at = (3, 4) if extended else (4, 5)
        if size is not None:
            fields[size_at] = size
        if u is not None:
            fields[u_at] = u
        if mtime is not None:
            fields[8], fields[9] = mtime
        layout.pack_into(image, old.offset, *fields)

    def _xattrs(self, old: InodeView, new) -> None:
        """Same names; only the digest xattrs stored in the inode may take new values."""
        if not old.xattr_size and not new.xattrs:
            return
        if not old.xattr_size:
            raise _Refused("xattr names")
        entries = self.img.xattr_entries(old)
        if sum(entry.shared for entry in entries) >= F.XATTR_MAX_SHARED_REFS:
            raise _Refused("as many shared xattrs as an inode may reference")
        current = {entry.name: entry.value for entry in entries}
        #: where the values stored in the inode itself start, by name
        inline = {entry.name: entry.value_offset for entry in entries if not entry.shared}
        if current.keys() != new.xattrs.keys():
            raise _Refused("xattr names")
        for name, value in new.xattrs.items():
            was = current[name]
            if value == was:
                continue
            if name not in _DIGEST_XATTRS or name not in inline or len(value) != len(was):
                raise _Refused(f"xattr {name!r} changed")
            start = inline[name]
            self.out.image[start : start + len(value)] = value
        self._objects(current.get(F.XATTR_METACOPY), new)

    def _objects(self, metacopy: bytes | None, new) -> None:
        """Note the object the inode stops and starts using, refusing a digest shared with another inode."""
        old_digest = metacopy[len(F.METACOPY_HEADER) :] if metacopy else None
        if new.digest == old_digest:
            return
        out = self.out
        if new.digest is not None:
            if new.digest in out.added or self.in_image(new.digest):
                raise _Refused("the new content is another inode's too")
            out.added[new.digest] = new.size
        if old_digest:
            out.removed.add(old_digest)
