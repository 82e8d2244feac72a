"""Write a tree as a composefs image, byte for byte like mkcomposefs 1.0.8.

The steps, in order (composefs-format.md in the shared notes explains each rule):

1. validate the input tree and copy it into private ``Inode`` records, so
   the caller's tree is never changed;
2. pick the format version and apply the overlay rewrite (escape
   ``trusted.overlay.*``, metacopy/redirect for external files, whiteouts
   become marked regular files, root ``opaque=y``, 256 whiteout stubs);
3. number the inodes breadth-first and decide xattr sharing;
4. size every inode (compact or extended, xattr body, inline tail, data
   blocks), place them with the C padding rules, then emit the bytes.
"""

from __future__ import annotations

import functools
import gc
import stat
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from operator import itemgetter
from typing import BinaryIO

import xxhash

from . import format as F
from .dumpfile import printable
from .format import (
    MAX_INLINE_CONTENT,
    MAX_SYMLINK_LEN,
    MAX_XATTR_BUDGET,
    MAX_XATTR_NAME_LEN,
    MAX_XATTR_VALUE_LEN,
    XATTR_BUDGET_BASE,
    XATTR_BUDGET_PER_ENTRY,
)
from .tree import Node

_U32 = 0xFFFFFFFF
_U64 = (1 << 64) - 1
_HALF_BLOCK = F.BLOCK_SIZE // 2
_STUB_MODE = stat.S_IFCHR | 0o644
_VALID_TYPES = frozenset(F.FT_FROM_MODE)
_MAX_CHUNK_SIZE = 1 << F.CHUNK_MAX_BITS


class ImageError(ValueError):
    """The tree cannot be written as a composefs image."""

    def __init__(self, message: str, path: bytes | None = None) -> None:
        if path is not None:
            message = f"{printable(path)}: {message}"
        super().__init__(message)
        self.path = path


class InvalidTreeError(ImageError):
    """The tree breaks a rule of the format (bad name, size, link, xattr...)."""


class XattrBudgetError(ImageError):
    """An overlay marker would overflow the node's xattr budget.

    mkcomposefs fails with ERANGE here (its budget counter restarts at zero on
    the copy it rewrites and wraps when a marker replaces a longer input
    value); apt-layer rejects exactly the same inputs.
    """


class VersionError(ImageError):
    """The requested format versions are not supported."""


@dataclass(eq=False, slots=True)
class Inode:
    """A private, rewritable copy of one inode, plus its layout."""

    mode: int
    #: ``stat.S_IFMT(mode)``, kept because it is looked at very often
    ftype: int
    uid: int
    gid: int
    nlink: int
    rdev: int
    size: int
    mtime: tuple[int, int]
    payload: bytes | None
    content: bytes | None
    digest: bytes | None
    xattrs: dict[bytes, bytes]
    path: bytes
    #: directories: (name, inode, is the original entry), sorted by name
    entries: list[tuple[bytes, Inode, bool]] | None = None
    #: mkcomposefs' per-node xattr budget counter during the rewrite (u64)
    budget: int = 0
    ino: int = 0
    nid: int = 0
    extended: bool = False
    #: indexes into the shared table, in sorted-name order
    shared_refs: Sequence[int] = ()
    #: the xattrs stored in the inode itself, encoded, in sorted-name order
    inline_xattrs: bytes = b""
    #: the xattr name filter of the body header
    xattr_filter: int = 0
    xattr_size: int = 0
    n_blocks: int = 0
    tail: bytes = b""
    layout: int = F.LAYOUT_FLAT_PLAIN
    #: the value i_size gets
    i_size: int = 0
    blkaddr: int = 0
    #: directories: groups of entries, one per block, the last maybe the tail
    dir_groups: Sequence[list[tuple[bytes, Inode]]] = ()


# --- 1. validation and copy -----------------------------------------------------


def _check_name(name: bytes, path: bytes) -> None:
    if not name or len(name) > F.MAX_NAME_LEN:
        raise InvalidTreeError(f"name must be 1..{F.MAX_NAME_LEN} bytes", path)
    if b"/" in name or b"\0" in name or name in (b".", b".."):
        raise InvalidTreeError(f"invalid name '{printable(name)}'", path)


def check_names(children: dict[bytes, Node], base: bytes) -> None:
    """The entry names of one directory, as :func:`_check_name` checks them.

    All names are tested at once first, on their concatenation: the
    ``in`` tests on each name made up a third of the cost of copying an
    entry.  If that fails, the names are checked one by one, in order, to
    report the first bad one.
    """
    if not children:
        return
    joined = b"/".join(children)
    if (
        b"\0" not in joined
        and joined.count(b"/") == len(children) - 1
        and min(map(len, children)) > 0
        and max(map(len, children)) <= F.MAX_NAME_LEN
        and b"." not in children
        and b".." not in children
    ):
        return
    for name in sorted(children):
        _check_name(name, base + name)


def _check_xattrs(node: Node, path: bytes) -> None:
    used = 0
    for name, value in node.xattrs.items():
        if not name or len(name) > MAX_XATTR_NAME_LEN or b"\0" in name:
            raise InvalidTreeError(f"invalid xattr name '{printable(name)}'", path)
        if len(value) > MAX_XATTR_VALUE_LEN:
            raise InvalidTreeError(
                f"xattr '{printable(name)}' value longer than {MAX_XATTR_VALUE_LEN} bytes", path
            )
        used += XATTR_BUDGET_PER_ENTRY + len(name) + len(value)
    if used and used + XATTR_BUDGET_BASE > MAX_XATTR_BUDGET:
        raise InvalidTreeError(
            f"xattrs exceed the per-inode budget of {MAX_XATTR_BUDGET} bytes", path
        )


def _chunk_bits(size: int) -> int:
    return min(max(F.BLOCK_BITS, (size - 1).bit_length()), F.CHUNK_MAX_BITS)


def chunk_count(size: int) -> int:
    """How many chunk indexes an external file of ``size`` bytes has."""
    if 0 < size <= _MAX_CHUNK_SIZE:  # the chunk grows with the file up to this size
        return 1
    return -(-size // (1 << _chunk_bits(size)))


def check_node(node: Node, ftype: int, path: bytes) -> None:
    """Everything about one (non-link) node that the format limits."""
    if ftype not in _VALID_TYPES:
        raise InvalidTreeError(f"invalid file type in mode {node.mode:o}", path)
    if not (  # one test for the common case; the loop below names the culprit
        0 <= node.mode <= _U32 and 0 <= node.uid <= _U32 and 0 <= node.gid <= _U32
        and 0 <= node.nlink <= _U32 and 0 <= node.rdev <= _U32 and 0 <= node.size <= _U64
        and 0 <= node.mtime_nsec <= _U32
    ):
        for what, value, limit in (
            ("mode", node.mode, _U32),
            ("uid", node.uid, _U32),
            ("gid", node.gid, _U32),
            ("nlink", node.nlink, _U32),
            ("rdev", node.rdev, _U32),
            ("size", node.size, _U64),
            ("mtime nsec", node.mtime_nsec, _U32),
        ):
            if not 0 <= value <= limit:
                raise InvalidTreeError(f"{what} {value} out of range", path)
    if not -(1 << 63) <= node.mtime_sec < (1 << 63):
        raise InvalidTreeError(f"mtime {node.mtime_sec} out of range", path)
    if ftype == stat.S_IFLNK:
        if not node.payload or len(node.payload) >= MAX_SYMLINK_LEN:
            raise InvalidTreeError(f"symlink target must be 1..{MAX_SYMLINK_LEN - 1} bytes", path)
    elif ftype == stat.S_IFREG:
        if node.content is not None:
            if len(node.content) > MAX_INLINE_CONTENT:
                raise InvalidTreeError(
                    f"inline content longer than {MAX_INLINE_CONTENT} bytes", path
                )
            if len(node.content) != node.size:
                raise InvalidTreeError(
                    f"content length {len(node.content)} != size {node.size}", path
                )
        elif node.size > 0 and chunk_count(node.size) > F.MAX_CHUNKS:
            raise InvalidTreeError(
                f"file too big ({node.size} bytes, > {F.MAX_CHUNKS} chunks)", path
            )
        if node.digest is not None and len(node.digest) != F.DIGEST_SIZE:
            raise InvalidTreeError(f"digest must be {F.DIGEST_SIZE} bytes", path)
    if node.xattrs:
        _check_xattrs(node, path)


def copy_node(node: Node, ftype: int, path: bytes) -> Inode:
    """The node's private copy; arguments by position (twice as fast as by keyword)."""
    is_reg = ftype == stat.S_IFREG
    is_lnk = ftype == stat.S_IFLNK
    return Inode(
        node.mode,
        ftype,
        node.uid,
        node.gid,
        node.nlink,
        node.rdev if ftype in (stat.S_IFCHR, stat.S_IFBLK) else 0,  # rdev
        len(node.payload or b"") if is_lnk else node.size,  # size
        (node.mtime_sec, node.mtime_nsec),
        node.payload if is_lnk or is_reg else None,  # payload
        node.content if is_reg else None,  # content
        node.digest if is_reg else None,  # digest
        dict(node.xattrs),
        path,
    )


@dataclass
class _Copy:
    root: Inode
    #: non-link inodes, depth-first, parents first, children sorted
    dfs: list[Inode]
    parent: dict[int, Inode]
    has_whiteout: bool


def _copy_tree(root: Node) -> _Copy:
    """Validate the tree and copy it; hard links are resolved to their inode."""
    if root.link is not None or not root.is_dir:
        raise InvalidTreeError("root must be a directory", b"/")
    by_node: dict[int, Inode] = {}
    links: list[tuple[Inode, int, bytes, Node, bytes]] = []
    dfs: list[Inode] = []
    parent: dict[int, Inode] = {}
    has_whiteout = False
    #: (path, name, node, parent copy, index of the entry in the parent)
    stack: list[tuple[bytes, bytes, Node, Inode | None, int]] = [(b"/", b"", root, None, 0)]
    while stack:
        path, name, node, up, index = stack.pop()
        if id(node) in by_node:
            raise InvalidTreeError("the same Node object appears twice; use Node.hardlink", path)
        ftype = stat.S_IFMT(node.mode)
        check_node(node, ftype, path)
        inode = copy_node(node, ftype, path)
        by_node[id(node)] = inode
        dfs.append(inode)
        if up is not None:
            assert up.entries is not None
            parent[id(inode)] = up
            up.entries[index] = (name, inode, True)
        if ftype == stat.S_IFCHR and node.rdev == 0:
            has_whiteout = True
        elif ftype == stat.S_IFDIR:
            _copy_entries(node, inode, path, stack, links)
    _resolve_links(links, by_node)
    return _Copy(by_node[id(root)], dfs, parent, has_whiteout)


def _copy_entries(
    node: Node,
    inode: Inode,
    path: bytes,
    stack: list[tuple[bytes, bytes, Node, Inode | None, int]],
    links: list[tuple[Inode, int, bytes, Node, bytes]],
) -> None:
    """Entries of a directory (placeholders until the children are copied)."""
    base = path if path.endswith(b"/") else path + b"/"
    entries: list[tuple[bytes, Inode, bool]] = []
    inode.entries = entries
    children = []
    check_names(node.children, base)
    for name, child in sorted(node.children.items()):  # names are unique: nodes never compared
        child_path = base + name
        if child.link is not None:
            links.append((inode, len(entries), name, child, child_path))
        else:
            children.append((child_path, name, child, inode, len(entries)))
        entries.append((name, inode, False))
    stack.extend(reversed(children))


def _resolve_links(
    links: list[tuple[Inode, int, bytes, Node, bytes]], by_node: dict[int, Inode]
) -> None:
    for dir_inode, index, name, link, path in links:
        target = link
        seen = {id(link)}
        while target.link is not None:
            target = target.link
            if id(target) in seen:
                raise InvalidTreeError("hard-link cycle", path)
            seen.add(id(target))
        inode = by_node.get(id(target))
        if inode is None:
            raise InvalidTreeError("hard-link target is not part of the tree", path)
        if inode.entries is not None:
            raise InvalidTreeError("hard link to a directory", path)
        assert dir_inode.entries is not None
        dir_inode.entries[index] = (name, inode, False)


# --- 2. version and overlay rewrite ---------------------------------------------


def _select_version(min_version: int, max_version: int, has_whiteout: bool) -> int:
    if min_version < 0 or max_version < 0:
        raise VersionError(f"invalid format versions {min_version}..{max_version}")
    max_version = max(max_version, min_version)
    if max_version > F.COMPOSEFS_MAX_VERSION:
        raise VersionError(
            f"format version {max_version} is not supported (max {F.COMPOSEFS_MAX_VERSION})"
        )
    version = min_version
    if version < 1 <= max_version and has_whiteout:
        version = 1
    return version


def set_xattr(inode: Inode, name: bytes, value: bytes) -> None:
    """Set an overlay xattr, tracking the budget counter like mkcomposefs."""
    xattrs = inode.xattrs
    counter = inode.budget
    old = xattrs.pop(name, None)
    if old is not None and not xattrs:
        counter = 0  # removing the only xattr resets the counter
    elif old is not None:
        # the input value was never counted (the copy starts at 0), so this can wrap
        counter = (counter - (XATTR_BUDGET_PER_ENTRY + len(name) + len(old))) & _U64
    cost = XATTR_BUDGET_PER_ENTRY + len(name) + len(value) + (0 if xattrs else XATTR_BUDGET_BASE)
    counter = (counter + cost) & _U64
    if counter > MAX_XATTR_BUDGET:
        if old is not None:
            xattrs[name] = old
        raise XattrBudgetError(
            f"setting {printable(name)} would overflow the xattr budget "
            f"(it replaces a longer value of the same xattr; mkcomposefs fails with ERANGE)",
            inode.path,
        )
    inode.budget = counter
    xattrs[name] = value


def _escape_overlay_xattrs(inode: Inode) -> None:
    prefix = F.OVERLAY_PREFIX
    if not any(name.startswith(prefix) for name in inode.xattrs):
        return
    inode.xattrs = {
        (F.OVERLAY_ESCAPED_PREFIX + name[len(prefix) :] if name.startswith(prefix) else name): value
        for name, value in inode.xattrs.items()
    }


def rewrite(inode: Inode, parents: dict[int, Inode], version: int) -> None:
    if inode.xattrs:
        _escape_overlay_xattrs(inode)
    ftype = inode.ftype
    if ftype == stat.S_IFREG and inode.size > 0 and inode.content is None:
        metacopy = b"" if inode.digest is None else F.METACOPY_HEADER + inode.digest
        set_xattr(inode, F.XATTR_METACOPY, metacopy)
        if inode.payload:
            set_xattr(inode, F.XATTR_REDIRECT, b"/" + inode.payload)
    elif ftype == stat.S_IFCHR and inode.rdev == 0:
        inode.size = 0
        inode.mode = (inode.mode & ~ftype) | stat.S_IFREG
        inode.ftype = stat.S_IFREG
        set_xattr(inode, F.XATTR_ESCAPED_WHITEOUT, b"")
        set_xattr(inode, F.XATTR_USER_WHITEOUT, b"")
        parent = parents[id(inode)]
        set_xattr(parent, F.XATTR_ESCAPED_WHITEOUTS, b"")
        set_xattr(parent, F.XATTR_USER_WHITEOUTS, b"")
        if version >= 1:
            set_xattr(parent, F.XATTR_ESCAPED_OPAQUE, b"x")
            set_xattr(parent, F.XATTR_USER_OPAQUE, b"x")


def rewritten(node: Node, path: bytes, version: int) -> Inode:
    """One node as the writer stores it (overlay rewrite done), apart from its place in the tree.

    For :mod:`.patch`, which compares it with the inode an image holds.  A
    whiteout changes its parent too, so it is refused here, as is anything
    :func:`build_image` would refuse (:class:`ImageError`).
    """
    ftype = stat.S_IFMT(node.mode)
    check_node(node, ftype, path)
    if ftype == stat.S_IFCHR and node.rdev == 0:
        raise ImageError("a whiteout changes its parent directory", path)
    inode = copy_node(node, ftype, path)
    rewrite(inode, {}, version)
    return inode


def chunk_format(size: int) -> int:
    """The chunk format (low bits of i_u) of an external file of ``size`` bytes."""
    return _chunk_bits(size) - F.BLOCK_BITS


def add_stubs(root: Inode) -> None:
    """The 256 ``00``..``ff`` whiteout chardevs every image root carries."""
    assert root.entries is not None
    present = {name for name, _inode, _orig in root.entries}
    selinux = root.xattrs.get(b"security.selinux")
    for i in range(F.WHITEOUT_STUBS):
        name = b"%02x" % i
        if name in present:
            continue
        stub = Inode(
            mode=_STUB_MODE,
            ftype=stat.S_IFCHR,
            uid=root.uid,
            gid=root.gid,
            nlink=1,
            rdev=0,
            size=0,
            mtime=root.mtime,
            payload=None,
            content=None,
            digest=None,
            xattrs={} if selinux is None else {b"security.selinux": selinux},
            path=b"/" + name,
        )
        root.entries.append((name, stub, True))


def _prepare(tree: _Copy, version: int) -> None:
    for inode in tree.dfs:
        rewrite(inode, tree.parent, version)
    set_xattr(tree.root, F.XATTR_OPAQUE, b"y")
    add_stubs(tree.root)
    by_name = itemgetter(0)
    for inode in tree.dfs:
        if inode.entries is not None:
            up = tree.parent.get(id(inode), inode)
            inode.entries.append((b".", inode, False))
            inode.entries.append((b"..", up, False))
            inode.entries.sort(key=by_name)


# --- 3. ordering and xattr sharing ----------------------------------------------


def _bfs(root: Inode) -> list[Inode]:
    """Inodes in breadth-first order; a hard-linked inode sits at its original entry."""
    order = [root]
    for inode in order:
        if inode.entries is not None:
            order.extend(child for _name, child, original in inode.entries if original)
    for ino, inode in enumerate(order):
        inode.ino = ino
        if inode.entries is not None:
            subdirs = sum(
                1 for _n, child, original in inode.entries if original and child.entries is not None
            )
            inode.nlink = 2 + subdirs
    return order


@functools.lru_cache(maxsize=1 << 14)
def _xattr_key(name: bytes) -> tuple[int, bytes]:
    """(name index, stored suffix) for a full xattr name."""
    for index, prefix in F.XATTR_WRITER_PREFIXES:
        if name.startswith(prefix):
            return index, name[len(prefix) :]
    return 0, name


def _entry_size(name: bytes, value: bytes) -> int:
    return (F.XATTR_ENTRY_SIZE + len(_xattr_key(name)[1]) + len(value) + 3) & ~3


def _shared_table(order: list[Inode]) -> list[tuple[bytes, bytes]]:
    """The xattr pairs used by more than one inode, in the C table order."""
    counts = Counter(pair for inode in order for pair in inode.xattrs.items())
    shared = [pair for pair, n in counts.items() if n > 1]
    shared.sort(key=lambda p: (p[0], len(p[1]), p[1]), reverse=True)
    return shared


def plan_xattrs(order: list[Inode], shared_index: dict[tuple[bytes, bytes], int]) -> None:
    """Per inode: its references into the shared table, its other xattrs encoded, the body size."""
    name_filter = _NameFilter()
    for inode in order:
        if not inode.xattrs:
            continue
        refs: list[int] = []
        inline: list[bytes] = []
        for pair in sorted(inode.xattrs.items()):
            index = shared_index.get(pair)
            if index is not None and len(refs) < F.XATTR_MAX_SHARED_REFS:
                refs.append(index)
            else:
                inline.append(xattr_entry(*pair))
        inode.shared_refs = refs
        inode.inline_xattrs = b"".join(inline)
        inode.xattr_filter = name_filter(tuple(inode.xattrs))
        refs_size = F.XATTR_SHARED_REF.size * len(refs)
        inode.xattr_size = F.XATTR_BODY_HEADER_SIZE + refs_size + len(inode.inline_xattrs)


# --- 4. sizes, placement, bytes -------------------------------------------------


def _split_dir(inode: Inode) -> None:
    """Group dirents into blocks; the last group is the tail unless > half a block."""
    assert inode.entries is not None
    groups: list[list[tuple[bytes, Inode]]] = [[]]
    used = 0
    for name, child, _original in inode.entries:
        cost = F.DIRENT_SIZE + len(name)
        if used + cost > F.BLOCK_SIZE:
            groups.append([])
            used = 0
        groups[-1].append((name, child))
        used += cost
    inode.dir_groups = groups
    if used > _HALF_BLOCK:
        inode.n_blocks, tail_len = len(groups), 0
    else:
        inode.n_blocks, tail_len = len(groups) - 1, used
    inode.i_size = inode.n_blocks * F.BLOCK_SIZE + tail_len
    # placeholder of the right length; the real dirents need the nids
    inode.tail = bytes(tail_len)


def size_inode(inode: Inode) -> None:
    """n_blocks, tail and i_size before placement (composefs-format.md §8)."""
    ftype = inode.ftype
    if inode.entries is not None:
        _split_dir(inode)
    elif ftype == stat.S_IFREG and inode.content is not None:
        content = inode.content
        n_blocks, tail_len = divmod(len(content), F.BLOCK_SIZE)
        if tail_len > _HALF_BLOCK:
            n_blocks, tail_len = n_blocks + 1, 0
        inode.n_blocks = n_blocks
        inode.tail = content[len(content) - tail_len :] if tail_len else b""
        inode.i_size = len(content)
    elif ftype == stat.S_IFREG and inode.size > 0:
        inode.tail = b"\xff" * (F.CHUNK_ENTRY_SIZE * chunk_count(inode.size))
        inode.i_size = inode.size
    elif ftype == stat.S_IFLNK:
        assert inode.payload is not None
        inode.tail = inode.payload
        inode.i_size = len(inode.payload)


def is_compact(inode: Inode, min_mtime: tuple[int, int]) -> bool:
    """Whether the inode is stored in the 32-byte form (its mtime is the build time, small fields)."""
    size = inode.i_size if inode.entries is not None else inode.size
    return (
        inode.mtime == min_mtime
        and inode.nlink <= F.COMPACT_MAX_NLINK
        and inode.uid <= F.COMPACT_MAX_ID
        and inode.gid <= F.COMPACT_MAX_ID
        and size <= F.COMPACT_MAX_SIZE
    )


def round_up(x: int, align: int) -> int:
    return (x + align - 1) & ~(align - 1)


def padding_before(inode: Inode, pos: int, isize: int) -> int:
    """Zero bytes to put before the inode so that its inline tail stays in one block.

    May move the tail to a data block instead, when it cannot fit. Symlinks
    follow their own C rule: the padding is decided from the size the inode
    had before a long target moved out to a block.
    """
    block = F.BLOCK_SIZE
    if inode.ftype == stat.S_IFLNK:
        total = isize + inode.xattr_size + len(inode.tail)
        if total >= block:
            inode.n_blocks, inode.tail = 1, b""
        if pos // block != (pos + total - 1) // block:
            return round_up(pos, block) - pos
        return 0
    tail_len = len(inode.tail)
    if not tail_len:
        return 0
    rem = block - (pos + isize + inode.xattr_size) % block
    if rem >= tail_len:
        return 0
    pad = round_up(rem, F.INODE_SLOT_SIZE)
    if block - (pos + pad + isize + inode.xattr_size) % block >= tail_len:
        return pad
    inode.n_blocks += 1
    inode.tail = b""
    return round_up(pos, block) - pos


def layout_of(inode: Inode) -> int:
    if inode.ftype == stat.S_IFREG and inode.content is None and inode.size > 0:
        return F.LAYOUT_CHUNK_BASED
    return F.LAYOUT_FLAT_INLINE if inode.tail else F.LAYOUT_FLAT_PLAIN


def _place(order: list[Inode]) -> int:
    """Assign nids in BFS order with the C padding rules; returns the table end."""
    pos = F.INODES_START
    for inode in order:
        isize = F.INODE_EXTENDED_SIZE if inode.extended else F.INODE_COMPACT_SIZE
        pos = round_up(pos, F.INODE_SLOT_SIZE)
        pos += padding_before(inode, pos, isize)
        inode.nid = pos >> F.INODE_SLOT_BITS
        inode.layout = layout_of(inode)
        pos += isize + inode.xattr_size + len(inode.tail)
    return round_up(pos, F.INODE_SLOT_SIZE)


def _dirent_chunk(group: list[tuple[bytes, Inode]]) -> bytes:
    """Dirents first, then the names back to back."""
    pack, file_type = F.DIRENT.pack, F.FT_FROM_MODE
    nameoff = F.DIRENT_SIZE * len(group)
    parts = []
    names = []
    for name, child in group:
        parts.append(pack(child.nid, nameoff, file_type[child.ftype]))
        names.append(name)
        nameoff += len(name)
    return b"".join(parts) + b"".join(names)


def _i_u(inode: Inode) -> int:
    """The inode's union field: block address, rdev or chunk format.

    A chunk-based file whose chunk table moved to a block keeps the chunk
    format in the low bits and only the high half of the block address,
    exactly as mkcomposefs writes it.
    """
    ftype = inode.ftype
    if inode.layout == F.LAYOUT_CHUNK_BASED:
        chunk = chunk_format(inode.size)
        return (inode.blkaddr & 0xFFFF0000) | chunk if inode.n_blocks else chunk
    if ftype in (stat.S_IFCHR, stat.S_IFBLK):
        return inode.rdev
    return inode.blkaddr if inode.n_blocks else 0


def _data_blocks(inode: Inode) -> bytes:
    """The inode's out-of-line data; the image is zero-filled, so a short last block is padded."""
    if inode.entries is not None:
        return b"".join(
            _dirent_chunk(g).ljust(F.BLOCK_SIZE, b"\0") for g in inode.dir_groups[: inode.n_blocks]
        )
    if inode.layout == F.LAYOUT_CHUNK_BASED:
        return b"\xff" * F.BLOCK_SIZE
    if inode.content is not None:
        return inode.content[: F.BLOCK_SIZE]
    assert inode.payload is not None
    return inode.payload


class _NameFilter:
    """The per-inode xattr bloom filter (xxHash32 of the suffix), memoised by xattr name tuple."""

    def __init__(self) -> None:
        self.filters: dict[tuple[bytes, ...], int] = {}

    def __call__(self, names: tuple[bytes, ...]) -> int:
        value = self.filters.get(names)
        if value is None:
            mask = 0
            for name in names:
                index, suffix = _xattr_key(name)
                mask |= 1 << (xxhash.xxh32_intdigest(suffix, F.XATTR_FILTER_SEED + index) & 31)
            value = self.filters[names] = _U32 & ~mask
        return value


def xattr_entry(name: bytes, value: bytes) -> bytes:
    head, padding = _xattr_entry_frame(name, len(value))
    return head + value + padding


@functools.lru_cache(maxsize=1 << 14)
def _xattr_entry_frame(name: bytes, value_len: int) -> tuple[bytes, bytes]:
    """What an xattr entry holds around its value: header and suffix, then padding.

    Memoised: most entries are the overlay markers, whose names and value
    lengths repeat on every external file.
    """
    index, suffix = _xattr_key(name)
    head = F.XATTR_ENTRY.pack(len(suffix), index, value_len) + suffix
    return head, bytes(-(len(head) + value_len) % F.XATTR_ALIGN)


def _xattr_body(inode: Inode, refs: list[int]) -> bytes:
    header = F.XATTR_BODY_HEADER.pack(inode.xattr_filter, len(inode.shared_refs))
    if not inode.shared_refs:
        return header + inode.inline_xattrs
    parts = [header]
    parts.extend(F.XATTR_SHARED_REF.pack(refs[i]) for i in inode.shared_refs)
    parts.append(inode.inline_xattrs)
    return b"".join(parts)


def _pack_inode_header(image: bytearray, start: int, inode: Inode) -> int:
    """Write the inode's header at ``start``; returns where its xattr body goes."""
    icount = 0 if not inode.xattr_size else (inode.xattr_size - F.XATTR_BODY_HEADER_SIZE) // 4 + 1
    i_format = inode.layout << 1
    mode = inode.mode & 0xFFFF
    if not inode.extended:
        F.INODE_COMPACT.pack_into(
            image,
            start,
            i_format,
            icount,
            mode,
            inode.nlink,
            inode.i_size,
            _i_u(inode),
            inode.ino,
            inode.uid,
            inode.gid,
        )
        return start + F.INODE_COMPACT_SIZE
    F.INODE_EXTENDED.pack_into(
        image,
        start,
        i_format | F.INODE_FORMAT_EXTENDED,
        icount,
        mode,
        inode.i_size,
        _i_u(inode),
        inode.ino,
        inode.uid,
        inode.gid,
        inode.mtime[0],
        inode.mtime[1],
        inode.nlink,
    )
    return start + F.INODE_EXTENDED_SIZE


def _inline_tail(inode: Inode) -> bytes:
    if inode.entries is not None and inode.tail:
        return _dirent_chunk(inode.dir_groups[-1])
    return inode.tail


@dataclass
class _Layout:
    order: list[Inode]
    shared: list[tuple[bytes, bytes]]
    inodes_end: int
    blocks: int
    version: int
    min_mtime: tuple[int, int]


def _lay_out(root: Node, min_version: int, max_version: int) -> _Layout:
    tree = _copy_tree(root)
    version = _select_version(min_version, max_version, tree.has_whiteout)
    _prepare(tree, version)
    order = _bfs(tree.root)
    min_mtime = min(inode.mtime for inode in order)
    shared = _shared_table(order)
    plan_xattrs(order, {pair: i for i, pair in enumerate(shared)})
    for inode in order:
        size_inode(inode)
        inode.extended = not is_compact(inode, min_mtime)
    inodes_end = _place(order)
    shared_size = sum(_entry_size(name, value) for name, value in shared)
    data_start = round_up(inodes_end + shared_size, F.BLOCK_SIZE)
    cursor = data_start // F.BLOCK_SIZE
    for inode in order:
        if inode.n_blocks:
            inode.blkaddr = cursor
            cursor += inode.n_blocks
    return _Layout(order, shared, inodes_end, cursor, version, min_mtime)


def _superblocks(lay: _Layout, image: bytearray) -> None:
    has_acl = any(name in inode.xattrs for inode in lay.order for name in F.ACL_XATTRS)
    F.COMPOSEFS_HEADER.pack_into(
        image,
        0,
        F.COMPOSEFS_MAGIC,
        F.COMPOSEFS_HEADER_VERSION,
        F.COMPOSEFS_FLAGS_HAS_ACL if has_acl else 0,
        lay.version,
    )
    F.SUPERBLOCK.pack_into(
        image,
        F.EROFS_SUPER_OFFSET,
        F.EROFS_MAGIC,
        0,
        F.COMPOSEFS_FEATURE_COMPAT,
        F.BLOCK_BITS,
        0,
        lay.order[0].nid,
        len(lay.order),
        lay.min_mtime[0] & _U64,
        lay.min_mtime[1],
        lay.blocks,
        0,
        lay.inodes_end // F.BLOCK_SIZE,
        bytes(16),
        bytes(16),
        0,
    )


def build_image(root: Node, *, min_version: int = 0, max_version: int = 1) -> bytes:
    """The composefs image of a tree, as mkcomposefs would write it.

    ``min_version``/``max_version`` are ``--min-version``/``--max-version``:
    the format version starts at ``min_version`` and is raised to 1 (if
    ``max_version`` allows it) when the tree contains an overlay whiteout.
    The caller's tree is not modified. Raises :class:`ImageError`.
    """
    return bytes(_build(root, min_version, max_version))


@contextmanager
def _gc_paused() -> Iterator[None]:
    """Pause the cyclic garbage collector while an image is built.

    Building allocates several objects per inode that all stay alive until
    the end; on a 60,000-entry tree the collector's passes over them (and
    over the caller's tree) took longer than the build itself.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _build(root: Node, min_version: int, max_version: int) -> bytearray:
    """The image; the private copy is freed before the collector is resumed."""
    with _gc_paused():
        return _build_unpaused(root, min_version, max_version)


def _build_unpaused(root: Node, min_version: int, max_version: int) -> bytearray:
    lay = _lay_out(root, min_version, max_version)
    try:
        return _emit(lay)
    finally:
        _break_cycles(lay.order)


def _break_cycles(order: list[Inode]) -> None:
    """Drop the ``.``/``..`` back references so that reference counting frees the copy."""
    for inode in order:
        inode.entries = None
        inode.dir_groups = ()


def _emit(lay: _Layout) -> bytearray:
    image = bytearray(lay.blocks * F.BLOCK_SIZE)
    _superblocks(lay, image)
    offsets = []
    pos = lay.inodes_end
    for name, value in lay.shared:
        entry = xattr_entry(name, value)
        offsets.append(pos - lay.inodes_end)
        image[pos : pos + len(entry)] = entry
        pos += len(entry)
    base = lay.inodes_end % F.BLOCK_SIZE
    refs = [(base + off) // F.XATTR_ALIGN for off in offsets]
    for inode in lay.order:
        write_inode(image, inode, refs)
    return image


def write_inode(image: bytearray, inode: Inode, refs: list[int]) -> None:
    """Put a placed inode into ``image``: header, xattrs (``refs``: the shared table's references), tail, blocks."""
    pos = _pack_inode_header(image, inode.nid << F.INODE_SLOT_BITS, inode)
    if inode.xattr_size:
        body = _xattr_body(inode, refs)
        image[pos : pos + len(body)] = body
        pos += len(body)
    if inode.tail:
        tail = _inline_tail(inode)
        image[pos : pos + len(tail)] = tail
    if inode.n_blocks:
        data = _data_blocks(inode)
        start = inode.blkaddr * F.BLOCK_SIZE
        image[start : start + len(data)] = data


def write_image(root: Node, out: BinaryIO, *, min_version: int = 0, max_version: int = 1) -> None:
    """Write the image of :func:`build_image` to a binary file object."""
    out.write(_build(root, min_version, max_version))
