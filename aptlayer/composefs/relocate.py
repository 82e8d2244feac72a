"""Write a layered image by moving its base image's inodes rather than rendering every one again.

A layered image (a base image and an overlay upper directory, :mod:`.upper`)
holds mostly the base's inodes, unchanged. In the image that
:func:`.writer.build_image` writes for the merged tree, each of those keeps
its bytes (header, xattr body, inline tail, data blocks) except for what
depends on where things land: its breadth-first index (``i_ino``), its data
block address, its references into the shared xattr table and, in a
directory, the nids of its entries. So:

1. the delta is laid over a *lazy* base (:class:`_LazyBase`): only the
   directories a change touches are read into nodes, the rest stay nids;
2. the merged tree's changed and new entries (the root and its stubs
   included) are prepared by the writer's own steps (``writer.rewrite``,
   ``plan_xattrs``, ``size_inode``);
3. one pass in the new breadth-first order places every inode by the
   upstream rules (composefs-format.md §10) and copies each kept one from
   the base; then the new ones are written, and the fields that moved
   patched in the kept ones (directories, data blocks, shared references).

The result is byte for byte the image a full render gives (the tests check
this against the writer and upstream mkcomposefs). Whatever would change an
unchanged inode's own bytes is declined (:func:`layered_image` returns None
and the caller renders the whole tree): another smallest mtime, an xattr
pair that moves into or out of the shared table for an unchanged inode, a
whiteout, hard links in the base, format version 1, an ACL flag that would
change, a chunk table of more than one entry. Xattr pairs are counted as
the writer counts them, usually without reading the kept inodes' xattrs: a
pair stored in a removed inode itself was that inode's alone, and an
object's metacopy and redirect pair is in no kept inode if the base does
not reference the object (``in_base``, the journal's manifest); else the
kept inodes' references into the shared table are counted.

The Python work left is one short loop over the inodes and one list per
directory; no node or record is made for an entry the delta leaves alone.
"""

from __future__ import annotations

import functools
import gc
import stat
import struct
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from . import format as F
from .fsverity import RawDigest, object_path
from .imageview import ImageFormatError, ImageView
from .reader import make_node
from .tree import Node
from .writer import (
    ImageError,
    Inode,
    add_stubs,
    check_names,
    check_node,
    copy_node,
    is_compact,
    layout_of,
    padding_before,
    plan_xattrs,
    rewrite,
    round_up,
    set_xattr,
    size_inode,
    write_inode,
    xattr_entry,
)

_S_IFMT = 0o170000
_S_IFDIR = stat.S_IFDIR
_S_IFREG = stat.S_IFREG
_S_IFLNK = stat.S_IFLNK
_S_IFCHR = stat.S_IFCHR
_BLOCK = F.BLOCK_SIZE
_HALF_BLOCK = _BLOCK // 2
_COMPACT = F.INODE_COMPACT.unpack_from
_EXTENDED = F.INODE_EXTENDED.unpack_from
_U16 = struct.Struct("<H").unpack_from
_U32_AT = struct.Struct("<I")
_DIRENT = F.DIRENT
_INO_OFFSET = 20  # i_ino, in both inode forms
_U_OFFSET = 16  # i_u, in both inode forms
_METACOPY_SIZE = len(F.METACOPY_HEADER) + F.DIGEST_SIZE
_FT_DIR = F.FT_FROM_MODE[stat.S_IFDIR]
#: the largest external file with a single chunk index
_ONE_CHUNK = 1 << F.CHUNK_MAX_BITS


class _Declined(Exception):
    """This change cannot be laid out by moving the base's inodes; render the tree."""


@dataclass
class Relocated:
    image: bytearray
    #: objects the base referenced and the new image does not
    removed: set[RawDigest] = field(default_factory=set)
    #: objects the new image references and the base did not, with their sizes
    added: dict[RawDigest, int] = field(default_factory=dict)


def layered_image(base: bytes, delta, in_base: Callable[[RawDigest], bool], *, min_version: int = 0,
                  max_version: int = 1) -> Relocated | None:
    """The image of ``delta`` (an :class:`.upper.Delta`) over the base image ``base``; None if declined.

    ``in_base(digest)`` says whether the base references that object (a
    superset only declines more). Errors of the upper directory
    (:class:`.upper.UpperError`) are raised as :func:`.upper.apply` raises them.
    """
    if min_version != 0 or not 0 <= max_version <= F.COMPOSEFS_MAX_VERSION:
        return None
    enabled = gc.isenabled()
    gc.disable()  # the records of a large base live to the end: the collector would walk them for nothing
    try:
        return _Relocator(base, in_base).run(delta)
    except (_Declined, ImageFormatError, ImageError, struct.error, IndexError):
        return None
    finally:
        if enabled:
            gc.enable()


class _LazyNode(Node):
    """An entry of the base image; a directory reads its entries when first asked for them."""

    def __init__(self, base: _LazyBase, nid: int, ino) -> None:
        rdev = ino.u if ino.ftype in (stat.S_IFCHR, stat.S_IFBLK) else 0
        super().__init__(ino.mode, ino.uid, ino.gid, ino.nlink, rdev, ino.size, ino.mtime_sec, ino.mtime_nsec)
        self.nid = nid
        self._base = base
        self._entries: dict[bytes, Node] | None = None if ino.ftype == _S_IFDIR else {}
        self._data_read = False

    @property
    def children(self) -> dict[bytes, Node]:
        if self._entries is None:
            self._entries = self._base.entries(self)
        return self._entries

    @children.setter
    def children(self, value: dict[bytes, Node]) -> None:
        self._entries = value


class _LazyBase:
    """The base image read on demand; remembers every nid it met (for the accounting)."""

    def __init__(self, view: ImageView) -> None:
        self.view = view
        self.met: set[int] = set()

    def node(self, nid: int) -> _LazyNode:
        ino = self.view.inode(nid)
        self.met.add(nid)
        full = make_node(self.view, ino)
        node = _LazyNode(self, nid, ino)
        node.payload, node.content, node.digest, node.xattrs = full.payload, full.content, full.digest, full.xattrs
        return node

    def entries(self, node: _LazyNode) -> dict[bytes, Node]:
        out: dict[bytes, Node] = {}
        for name, nid in self.view.dir_entries(self.view.inode(node.nid)):
            ino = self.view.inode(nid)
            if ino.ftype == _S_IFCHR and ino.u == 0:
                self.met.add(nid)  # a whiteout stub: not an entry of the tree
                continue
            out[name] = self.node(nid)
        return out


class _Moved:
    """A base inode among the entries of a new directory: its type, and its nid once placed."""

    __slots__ = ("old", "nid", "ftype", "entries")

    def __init__(self, old: int, ftype: int) -> None:
        self.old = old
        self.nid = 0
        self.ftype = ftype
        self.entries = () if ftype == _S_IFDIR else None


class _Relocator:
    def __init__(self, base: bytes, in_base: Callable[[RawDigest], bool]) -> None:
        self.data = base
        self.view = ImageView(base)
        self.in_base = in_base
        view = self.view
        if view.composefs_version != 0 or view.meta_start != 0:
            raise _Declined("format version or metadata start")
        _magic, _version, self.flags, _cfs = F.COMPOSEFS_HEADER.unpack_from(base, 0)
        self.inos = F.SUPERBLOCK.unpack_from(base, F.EROFS_SUPER_OFFSET)[6]
        self.min_mtime = (view.build_time, view.build_time_nsec)

    # --- the merged tree ---------------------------------------------------------------

    def run(self, delta) -> Relocated:
        from .upper import apply

        lazy = _LazyBase(self.view)
        base_root = lazy.node(self.view.root_nid)
        dropped: list[Node] = []
        merged = apply(base_root, delta, dropped, split_links=False)
        root, made = self._materialize(merged)
        order, dotdot = self._order(root)
        kept = [item for item in order if type(item) is int]
        reached = set(kept)
        if len(reached) != len(kept):
            raise _Declined("a base inode reached twice")
        removed = self._removed(lazy, dropped, reached)
        if len(kept) + len(removed) != self.inos:
            raise _Declined("base inodes not accounted for")
        shared_pairs, objects, has_acl = self._count_pairs(made, removed, kept)
        return self._write(root, made, order, dotdot, shared_pairs, objects, has_acl)

    def _materialize(self, merged: Node) -> tuple[Inode, list[Inode]]:
        """The merged tree's own nodes as the writer's records; base entries stay base inodes (``_Moved``)."""
        made: list[Inode] = []
        seen: set[int] = set()
        moved: set[int] = set()
        parents: dict[int, Inode] = {}
        stack: list[tuple[bytes, Node, Inode | None, int, bytes]] = [(b"/", merged, None, 0, b"")]
        root = None
        while stack:
            path, node, up, index, name = stack.pop()
            if node.link is not None or id(node) in seen:
                raise _Declined("a hard link, or an entry reached twice")
            seen.add(id(node))
            ftype = stat.S_IFMT(node.mode)
            check_node(node, ftype, path)
            if ftype == _S_IFCHR and node.rdev == 0:
                raise _Declined("a whiteout")
            inode = copy_node(node, ftype, path)
            if ftype != _S_IFDIR:
                inode.nlink = 1  # the merged view scanned: every file its own inode
            rewrite(inode, parents, 0)
            made.append(inode)
            if up is None:
                root = inode
            else:
                up.entries[index] = (name, inode, True)
                parents[id(inode)] = up
            if ftype != _S_IFDIR:
                continue
            base = path if path.endswith(b"/") else path + b"/"
            check_names(node.children, base)
            entries: list = []
            inode.entries = entries
            later = []
            for child_name, child in sorted(node.children.items()):
                if isinstance(child, _LazyNode):
                    if child.nid in moved:
                        raise _Declined("a base entry reached twice")
                    moved.add(child.nid)
                    entries.append((child_name, _Moved(child.nid, stat.S_IFMT(child.mode)), True))
                else:
                    later.append((base + child_name, child, inode, len(entries), child_name))
                    entries.append((child_name, None, True))
            stack.extend(reversed(later))
        assert root is not None
        set_xattr(root, F.XATTR_OPAQUE, b"y")
        named = len(root.entries)
        add_stubs(root)
        made.extend(stub for _name, stub, _orig in root.entries[named:])
        for inode in made:
            if inode.entries is not None:
                inode.entries.append((b".", inode, False))
                inode.entries.append((b"..", parents.get(id(inode), inode), False))
                inode.entries.sort(key=lambda e: e[0])
                inode.nlink = 2 + sum(1 for _n, child, orig in inode.entries if orig and child.entries is not None)
        return root, made

    # --- the new breadth-first order --------------------------------------------------

    def _order(self, root: Inode) -> tuple[list, dict[int, tuple[int, Inode]]]:
        """Inodes in the new BFS order: the writer's records, and base nids.

        Only directories are visited, in BFS order (the order's directories
        are in the same order as the directories it comes from): each appends
        its entries. Base directories are read from their dirents alone
        (their type says which entries are directories). Also returns the base
        directories whose ``..`` is a new directory: position -> (the old
        nid their ``..`` names, the new parent).
        """
        data = self.data
        order: list = [root]
        dotdot: dict[int, tuple[int, Inode]] = {}
        #: directories in BFS order: the writer's records, and (nid, the old nid its ``..`` names)
        queue: list = [root]
        self.moved: list[tuple[int, _Moved]] = []
        view = self.view
        unpack = _DIRENT.iter_unpack
        for item in queue:
            if type(item) is tuple:
                nid, up = item
                ino = view.inode(nid)
                for start, _length in self._chunks(ino.tail_offset, ino.size % _BLOCK, ino.u, ino.size // _BLOCK):
                    count = _U16(data, start + 8)[0] // F.DIRENT_SIZE
                    ents = [e for e in unpack(data[start : start + count * F.DIRENT_SIZE])
                            if e[0] != nid and e[0] != up]
                    order.extend([e[0] for e in ents])
                    queue.extend([(e[0], nid) for e in ents if e[2] == _FT_DIR])
                continue
            for _name, child, orig in item.entries:
                if not orig:
                    continue
                if type(child) is _Moved:
                    self.moved.append((len(order), child))
                    if child.ftype == _S_IFDIR:
                        old_up = self._old_dotdot(child.old)
                        dotdot[len(order)] = (old_up, item)
                        queue.append((child.old, old_up))
                    order.append(child.old)
                else:
                    if child.entries is not None:
                        queue.append(child)
                    order.append(child)
        return order, dotdot

    def _chunks(self, tail_start: int, tail: int, u: int, blocks: int) -> list[tuple[int, int]]:
        """(start, length) of a directory's dirent chunks: its full blocks, then its inline tail."""
        chunks = [(b * _BLOCK, _BLOCK) for b in range(u, u + blocks)]
        if tail:
            chunks.append((tail_start, tail))
        return chunks

    def _old_dotdot(self, nid: int) -> int:
        """The nid the ``..`` entry of base directory ``nid`` names."""
        data = self.data
        ino = self.view.inode(nid)
        for start, length in self._chunks(ino.tail_offset, ino.size % _BLOCK, ino.u, ino.size // _BLOCK):
            count = _U16(data, start + 8)[0] // F.DIRENT_SIZE
            ents = list(_DIRENT.iter_unpack(data[start : start + count * F.DIRENT_SIZE]))
            for i, (child, nameoff, _t) in enumerate(ents):
                end = ents[i + 1][1] if i + 1 < count else length
                name = data[start + nameoff : start + end].rstrip(b"\0")
                if name == b"..":
                    return child
        raise _Declined("a directory without ..")

    # --- what the base loses -----------------------------------------------------------

    def _removed(self, lazy: _LazyBase, dropped: list[Node], reached: set[int]) -> list[int]:
        """The base inodes the new image no longer holds as they were."""
        gone = {nid for nid in lazy.met if nid not in reached}
        stack = [node.nid for node in dropped if isinstance(node, _LazyNode)]
        if len(stack) != len(dropped):
            raise _Declined("a dropped entry not of the base")
        view = self.view
        while stack:
            nid = stack.pop()
            if nid not in reached:
                gone.add(nid)
            ino = view.inode(nid)
            if ino.ftype == _S_IFDIR:
                stack.extend(child for _name, child in view.dir_entries(ino))
        return sorted(gone)

    # --- xattr pairs and objects -------------------------------------------------------

    def _count_pairs(self, made: list[Inode], removed: list[int], kept: list[int]):
        """The pairs the new inodes share, the objects gone and new, the ACL flag.

        A pair counts as the writer counts it (composefs-format.md §6.3):
        new inodes share a pair that two inodes or more hold, and no kept
        inode may see one of its pairs move into or out of the table (that
        is declined). What kept inodes hold is known without reading them
        in the usual case: a pair stored in a removed inode itself is that
        inode's alone, and an object the base does not reference is in no
        kept inode. Else the kept inodes' shared references are counted.
        """
        view = self.view
        data = self.data
        removed_pairs: Counter = Counter()
        shared_old: set[tuple[bytes, bytes]] = set()
        self.removed_at_min = 0
        acl_gone = False
        for nid in removed:
            ino = view.inode(nid)
            if (ino.mtime_sec, ino.mtime_nsec) == self.min_mtime:
                self.removed_at_min += 1
            if not ino.xattr_size:
                continue
            if data[ino.offset + ino.isize + 4] >= F.XATTR_MAX_SHARED_REFS:
                raise _Declined("an inode with the most shared xattr references")
            entries = view.xattr_entries(ino)
            mine = {entry.name: entry.value for entry in entries}
            digest = _digest_of((F.XATTR_METACOPY, mine.get(F.XATTR_METACOPY, b"")))
            if digest is not None and mine.get(F.XATTR_REDIRECT) != b"/" + object_path(digest).encode():
                raise _Declined("a base file whose object is not its digest's")
            for entry in entries:
                removed_pairs[(entry.name, entry.value)] += 1
                if entry.shared:
                    shared_old.add((entry.name, entry.value))
                if entry.name in F.ACL_XATTRS:
                    acl_gone = True
        added_pairs: Counter = Counter()
        min_mtime = self.min_mtime
        self.added_at_min = 0
        acl_new = False
        sizes: dict[bytes, int] = {}
        for inode in made:
            if inode.mtime < min_mtime:
                raise _Declined("a new smallest mtime")
            if inode.mtime == min_mtime:
                self.added_at_min += 1
            added_pairs.update(inode.xattrs.items())
            if any(name in F.ACL_XATTRS for name in inode.xattrs):
                acl_new = True
            if inode.ftype == _S_IFREG and inode.content is None and inode.size > 0:
                if inode.digest is None or inode.payload != object_path(inode.digest).encode():
                    raise _Declined("a file whose object is not its digest's")
                sizes[inode.digest] = inode.size
        has_acl = bool(self.flags & F.COMPOSEFS_FLAGS_HAS_ACL)
        if acl_gone and has_acl and not acl_new:
            raise _Declined("the ACL flag")
        unknown = [pair for pair in added_pairs if pair not in removed_pairs]
        if shared_old or any(_digest_of(pair) is None or self.in_base(_digest_of(pair)) for pair in unknown):
            kept_by_pair = self._kept_pairs(kept)
            shared_old |= set(kept_by_pair)
        else:
            kept_by_pair = Counter()

        def kept_count(pair: tuple[bytes, bytes]) -> int:
            if pair in shared_old:
                return kept_by_pair[pair]
            if removed_pairs[pair]:
                return 0  # stored in the removed inode itself: its own
            digest = _digest_of(pair)
            if digest is None:
                raise _Declined("an xattr a kept inode may hold in itself")
            return 1 if self.in_base(digest) else 0

        shared_pairs = []
        out = Relocated(bytearray())
        for pair in set(removed_pairs) | set(added_pairs):
            kept = kept_count(pair)
            total = kept + added_pairs[pair]
            if total >= 2:
                if kept and pair not in shared_old:
                    raise _Declined("a kept inode's xattr joins the shared table")
                if added_pairs[pair]:
                    shared_pairs.append(pair)
            elif kept and pair in shared_old:
                raise _Declined("a kept inode's shared xattr leaves the table")
            if pair[0] == F.XATTR_METACOPY:
                digest = _digest_of(pair)
                if digest is None:
                    raise _Declined("a metacopy without a digest")
                before, after = kept + removed_pairs[pair], total
                if before and not after:
                    out.removed.add(digest)
                elif after and not before:
                    out.added[digest] = sizes[digest]
        return shared_pairs, out, has_acl or acl_new

    def _kept_pairs(self, kept: list[int]) -> Counter:
        """How many kept inodes reference each pair of the shared table (one read of every header)."""
        data = self.data
        refs: Counter = Counter()
        for nid in kept:
            off = nid << 5
            if not _U16(data, off + 2)[0]:
                continue
            body = off + (64 if data[off] & 1 else 32)
            count = data[body + 4]
            if count >= F.XATTR_MAX_SHARED_REFS:
                raise _Declined("an inode with the most shared xattr references")
            if count:
                refs.update(struct.unpack_from(f"<{count}I", data, body + 12))
        by_pair: Counter = Counter()
        for ref, n in refs.items():
            by_pair[self._shared_entry(ref)] += n
        return by_pair

    def _shared_entry(self, ref: int) -> tuple[bytes, bytes]:
        data = self.data
        pos = self.view.xattr_start + 4 * ref
        name_len, index, value_len = F.XATTR_ENTRY.unpack_from(data, pos)
        start = pos + F.XATTR_ENTRY_SIZE
        name = F.XATTR_PREFIXES[index] + data[start : start + name_len]
        return name, data[start + name_len : start + name_len + value_len]

    # --- placing and writing -----------------------------------------------------------

    def _write(self, root: Inode, made: list[Inode], order: list, dotdot: dict, shared_pairs: list,
               objects: Relocated, has_acl: bool) -> Relocated:
        """Place every inode (composefs-format.md §10), copying the kept ones; then patch what moved."""
        min_mtime = self.min_mtime
        plan_xattrs(made, {pair: i for i, pair in enumerate(shared_pairs)})
        for inode in made:
            size_inode(inode)
            inode.extended = not is_compact(inode, min_mtime)
        data = self.data
        source = memoryview(data)
        # The inode table is copied into a buffer large enough for it (grown if ever not), then cut.
        image = bytearray(2 * len(data) + sum(64 + i.xattr_size + len(i.tail) + 64 for i in made))
        newnid = [0] * (len(data) // 32 + 1)
        #: kept inodes with more to patch than their i_ino: (position, old offset, new offset, isize,
        #: xattr size, tail, blocks, old i_u, type, shared refs)
        special: list[tuple] = []
        blocks_before: dict[int, int] = {}
        nblocks = 0
        at_min = 0
        pack_u32 = _U32_AT.pack_into
        # hot loop: locals rather than globals
        chunk_based, chunk_entry, half_block, one_chunk = F.LAYOUT_CHUNK_BASED, F.CHUNK_ENTRY_SIZE, _HALF_BLOCK, _ONE_CHUNK
        s_ifmt, s_ifreg, s_ifdir, s_iflnk = _S_IFMT, _S_IFREG, _S_IFDIR, _S_IFLNK
        extended, compact, refs_of, ino_offset = _EXTENDED, _COMPACT, _refs, _INO_OFFSET
        min_sec, min_nsec = min_mtime
        pos = F.INODES_START
        for k, item in enumerate(order):
            pos = (pos + 31) & ~31
            if type(item) is not int:
                isize = F.INODE_EXTENDED_SIZE if item.extended else F.INODE_COMPACT_SIZE
                pos += padding_before(item, pos, isize)
                item.nid = pos >> 5
                item.layout = layout_of(item)
                item.ino = k
                pos += isize + item.xattr_size + len(item.tail)
                if item.n_blocks:
                    blocks_before[k] = nblocks
                    nblocks += item.n_blocks
                continue
            off = item << 5
            i_format = data[off]
            if i_format & 1:
                isize = 64
                (_f, icount, mode, size, u, _ino, _uid, _gid, sec, nsec, nlink) = extended(data, off)
                if sec == min_sec and nsec == min_nsec:
                    at_min += 1
            else:
                isize = 32
                (_f, icount, mode, nlink, size, u, _ino, _uid, _gid) = compact(data, off)
                at_min += 1
            ftype = mode & s_ifmt
            xsize = 0 if not icount else 12 + 4 * (icount - 1)
            refs = refs_of(data[off + isize + 4]).unpack_from(data, off + isize + 12) if xsize else ()
            if ftype == s_ifreg:
                if nlink != 1:
                    raise _Declined("a base file with hard links")
                if (i_format >> 1) & 7 == chunk_based:
                    if size > one_chunk:
                        raise _Declined("a chunk table of more than one entry")
                    blocks, tail = 0, chunk_entry
                else:
                    blocks, tail = divmod(size, _BLOCK)
                    if tail > half_block:
                        blocks, tail = blocks + 1, 0
            elif ftype == s_ifdir:
                blocks, tail = divmod(size, _BLOCK)
            elif nlink != 1:
                raise _Declined("a base file with hard links")
            elif ftype == s_iflnk:
                blocks, tail = 0, size
            elif ftype == _S_IFCHR and u == 0:
                raise _Declined("a whiteout stub below the root")
            else:
                blocks, tail = 0, 0
            if ftype == s_iflnk:
                total = isize + xsize + tail
                if total >= _BLOCK:
                    blocks, tail = 1, 0
                if pos >> 12 != (pos + total - 1) >> 12:
                    pos = round_up(pos, _BLOCK)
            elif tail:
                rem = _BLOCK - (pos + isize + xsize) % _BLOCK
                if rem < tail:
                    pad = (rem + 31) & ~31
                    if _BLOCK - (pos + pad + isize + xsize) % _BLOCK < tail:
                        raise _Declined("a tail that moves to a block")
                    pos += pad
            newnid[item] = pos >> 5
            span = isize + xsize + tail
            if pos + span > len(image):
                image.extend(bytes(pos + span))
            image[pos : pos + span] = source[off : off + span]
            pack_u32(image, pos + ino_offset, k)
            if blocks:
                blocks_before[k] = nblocks
                nblocks += blocks
            if blocks or refs or ftype == s_ifdir:
                special.append((k, off, pos, isize, xsize, tail, blocks, u, ftype, refs))
            pos += span
        if at_min + self.added_at_min == 0:
            raise _Declined("the smallest mtime goes")
        # the shared table: the kept inodes' pairs, and those the new inodes share
        old_pairs = {ref: self._shared_entry(ref) for entry in special for ref in entry[9]}
        table = sorted(set(old_pairs.values()) | set(shared_pairs), key=_table_key, reverse=True)
        inodes_end = round_up(pos, 32)
        offsets = []
        at = inodes_end
        entries = []
        for name, value in table:
            entry = xattr_entry(name, value)
            offsets.append(at - inodes_end)
            entries.append(entry)
            at += len(entry)
        data_start = round_up(at, _BLOCK)
        if len(image) < inodes_end:
            image.extend(bytes(inodes_end - len(image)))
        del image[inodes_end:]
        image += b"".join(entries)
        first_block = data_start // _BLOCK
        total_blocks = first_block + nblocks
        image.extend(bytes(total_blocks * _BLOCK - len(image)))
        mod = inodes_end % _BLOCK
        index = {pair: i for i, pair in enumerate(table)}
        refs_by_index = [(mod + off) // 4 for off in offsets]
        new_ref = {old: refs_by_index[index[pair]] for old, pair in old_pairs.items()}
        for k, moved in self.moved:
            moved.nid = newnid[moved.old]
        self._superblocks(image, root, len(order), inodes_end, total_blocks, has_acl)
        made_refs = [refs_by_index[index[pair]] for pair in shared_pairs]  # as plan_xattrs numbered them
        for k, inode in enumerate(order):
            if type(inode) is int:
                continue
            if inode.n_blocks:
                inode.blkaddr = first_block + blocks_before[k]
            write_inode(image, inode, made_refs)
        for k, old, new, isize, xsize, tail, blocks, u, ftype, refs in special:
            for i, ref in enumerate(refs):
                pack_u32(image, new + isize + 12 + 4 * i, new_ref[ref])
            blkaddr = first_block + blocks_before[k] if blocks else 0
            if blocks:
                pack_u32(image, new + _U_OFFSET, blkaddr)
            if ftype != _S_IFDIR:
                if blocks:
                    image[blkaddr * _BLOCK : (blkaddr + 1) * _BLOCK] = source[u * _BLOCK : (u + 1) * _BLOCK]
                continue
            over = dotdot.get(k)
            chunks = zip(self._chunks(old + isize + xsize, tail, u, blocks),
                         self._chunks(new + isize + xsize, tail, blkaddr, blocks))
            for (src, length), (dst, _l) in chunks:
                if length == _BLOCK:
                    image[dst : dst + _BLOCK] = source[src : src + _BLOCK]
                count = _U16(data, src + 8)[0] // F.DIRENT_SIZE
                ents = _DIRENT.iter_unpack(data[src : src + count * F.DIRENT_SIZE])
                if over is None:
                    fresh = [field for n, o, t in ents for field in (newnid[n], o, t)]
                else:
                    parent_old, parent = over
                    fresh = [field for n, o, t in ents
                             for field in (parent.nid if n == parent_old else newnid[n], o, t)]
                _dirents(count).pack_into(image, dst, *fresh)
        objects.image = image
        return objects

    def _superblocks(self, image: bytearray, root: Inode, inos: int, inodes_end: int, blocks: int,
                     has_acl: bool) -> None:
        F.COMPOSEFS_HEADER.pack_into(image, 0, F.COMPOSEFS_MAGIC, F.COMPOSEFS_HEADER_VERSION,
                                     F.COMPOSEFS_FLAGS_HAS_ACL if has_acl else 0, 0)
        sb = self.data[F.EROFS_SUPER_OFFSET : F.EROFS_SUPER_OFFSET + F.SUPERBLOCK_SIZE]
        image[F.EROFS_SUPER_OFFSET : F.EROFS_SUPER_OFFSET + F.SUPERBLOCK_SIZE] = sb
        F.SUPERBLOCK.pack_into(image, F.EROFS_SUPER_OFFSET, *(
            F.SUPERBLOCK.unpack_from(sb, 0)[:5] + (root.nid, inos) + F.SUPERBLOCK.unpack_from(sb, 0)[7:9]
            + (blocks, 0, inodes_end // _BLOCK) + F.SUPERBLOCK.unpack_from(sb, 0)[12:]))


@functools.lru_cache(maxsize=F.XATTR_MAX_SHARED_REFS)
def _refs(count: int) -> struct.Struct:
    """The layout of ``count`` shared xattr references."""
    return struct.Struct(f"<{count}I")


@functools.lru_cache(maxsize=1024)
def _dirents(count: int) -> struct.Struct:
    """The layout of ``count`` dirents."""
    return struct.Struct("<" + "QHBx" * count)


def _table_key(pair: tuple[bytes, bytes]) -> tuple[bytes, int, bytes]:
    """The shared table's order (descending by this key), as the writer sorts it."""
    return pair[0], len(pair[1]), pair[1]


def _digest_of(pair: tuple[bytes, bytes]) -> RawDigest | None:
    """The object digest a metacopy or redirect pair names; None for other xattrs."""
    name, value = pair
    if name == F.XATTR_METACOPY:
        if len(value) == _METACOPY_SIZE and value.startswith(F.METACOPY_HEADER):
            return value[len(F.METACOPY_HEADER) :]
        return None
    if name == F.XATTR_REDIRECT:
        path = value[1:]
        if value[:1] == b"/" and len(path) == 65 and path[2:3] == b"/":
            try:
                digest = bytes.fromhex((path[:2] + path[3:]).decode("ascii"))
            except ValueError:
                return None
            if object_path(digest).encode() == path:
                return digest
    return None
