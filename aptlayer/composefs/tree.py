"""The in-memory tree that the writer consumes and the reader produces.

A tree is a root :class:`Node` (a directory) whose ``children`` map names
(bytes, 1..255 bytes, no ``/``) to nodes. Names, paths, payloads, contents and
xattr names and values are all ``bytes``: composefs stores raw bytes and never
decodes them.

A hard link is a separate Node whose ``link`` names the node it points to; its
own metadata is ignored. The entry that is *not* a link is the original and
decides where the inode is placed in the image.

``xattrs`` keeps insertion order. The writer sorts; the reader inserts in the
order the image stores them (inline first, then shared) so that printing a
dump in dict order reproduces ``composefs-info dump``.
"""

from __future__ import annotations

import stat
from collections.abc import Iterator
_FIELDS = ("mode", "uid", "gid", "nlink", "rdev", "size", "mtime_sec", "mtime_nsec",
           "payload", "content", "digest", "xattrs", "children", "link")


class Node:
    """One entry: its metadata, a regular file's data, a directory's children.

    A plain class rather than a dataclass: importing ``dataclasses`` (and
    ``inspect`` with it) would cost the drop-in ``composefs info`` commands,
    which load nothing else of note, 6 ms.  Nodes compare by identity.
    """

    def __init__(
        self,
        mode: int = stat.S_IFDIR | 0o755,
        uid: int = 0,
        gid: int = 0,
        nlink: int = 1,
        rdev: int = 0,
        size: int = 0,
        mtime_sec: int = 0,
        mtime_nsec: int = 0,
        payload: bytes | None = None,
        content: bytes | None = None,
        digest: bytes | None = None,
        xattrs: dict[bytes, bytes] | None = None,
        children: dict[bytes, Node] | None = None,
        link: Node | None = None,
    ) -> None:
        self.mode = mode
        self.uid = uid
        self.gid = gid
        self.nlink = nlink
        self.rdev = rdev
        self.size = size
        self.mtime_sec = mtime_sec
        self.mtime_nsec = mtime_nsec
        #: symlink target, or a regular file's backing object path (``xx/yyyy...``)
        self.payload = payload
        #: inline content of a regular file
        self.content = content
        #: raw 32-byte fs-verity digest of a regular file's content
        self.digest = digest
        self.xattrs: dict[bytes, bytes] = {} if xattrs is None else xattrs
        self.children: dict[bytes, Node] = {} if children is None else children
        #: set on a hard-link entry: the node it is another name for
        self.link = link

    def __repr__(self) -> str:
        shown = ", ".join(f"{f}={getattr(self, f)!r}" for f in _FIELDS if f != "children")
        return f"Node({shown}, children=<{len(self.children)}>)"

    @classmethod
    def hardlink(cls, target: Node) -> Node:
        return cls(mode=0, link=target)

    def resolve(self) -> Node:
        """The node this entry names, following hard-link chains."""
        node = self
        seen = 0
        while node.link is not None:
            node = node.link
            seen += 1
            if seen > 1_000_000:
                raise ValueError("hard-link cycle")
        return node

    @property
    def ftype(self) -> int:
        return stat.S_IFMT(self.mode)

    @property
    def is_dir(self) -> bool:
        return self.link is None and stat.S_ISDIR(self.mode)

    @property
    def is_reg(self) -> bool:
        return self.link is None and stat.S_ISREG(self.mode)

    @property
    def is_lnk(self) -> bool:
        return self.link is None and stat.S_ISLNK(self.mode)

    @property
    def is_whiteout(self) -> bool:
        """An overlay whiteout: a character device with device number 0/0."""
        return self.link is None and stat.S_ISCHR(self.mode) and self.rdev == 0

    def walk(self, path: bytes = b"/") -> Iterator[tuple[bytes, Node]]:
        """Depth-first, parents first, children in byte order of their names."""
        stack: list[tuple[bytes, Node]] = [(path, self)]
        while stack:
            p, node = stack.pop()
            yield p, node
            if node.is_dir:
                base = p if p.endswith(b"/") else p + b"/"
                for name in sorted(node.children, reverse=True):
                    stack.append((base + name, node.children[name]))
