"""Reading composefs images back into :class:`~aptlayer.composefs.tree.Node` trees.

The reader follows the rules of upstream ``composefs-info`` 1.0.8 so that a
tree printed by ``dumpfile.format_dump`` or ``listing`` matches the C tool byte
for byte:

* compact inodes take their mtime from the superblock's build time;
* character devices with device number 0 are the writer's whiteout stubs and
  are left out; escaped whiteouts (regular files) are turned back into them;
* the first depth-first occurrence of an inode, in dirent order, is the
  original and every later one becomes a hard-link node;
* the overlayfs xattrs the writer adds are stripped or unescaped, and xattrs
  keep the stored order: inline entries first, then shared references.

Images are hostile input. Every offset and size is checked against the file;
directories may not be reached twice (a loop or a directory hard link), the
depth is bounded, and the bytes the reader may consume are budgeted by the
size of the file: in a well-formed image the inodes, their xattrs and data and
the shared xattr entries never overlap, so an image that makes the reader
consume more bytes than it has reuses regions and is rejected. Memory stays
proportional to the file size and the walk is iterative. Every defect raises
:class:`ImageFormatError`.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import os
import stat
import struct
from collections.abc import Callable, Collection, Iterator
from typing import ParamSpec, TypeVar

from . import format as fmt
from .tree import Node


class ImageFormatError(ValueError):
    """The bytes are not a composefs image this reader can trust."""


class SymlinkLoopError(ImageFormatError):
    """A path lookup met more than :data:`MAX_SYMLINK_HOPS` symbolic links (``ELOOP``)."""


#: deepest directory nesting accepted; a path of this many one-byte names
#: already fills PATH_MAX (4096 bytes)
MAX_DEPTH = 2048
#: the smallest image the C reader accepts
MIN_IMAGE_SIZE = fmt.BLOCK_SIZE
#: longest symlink target (PATH_MAX - 1)
MAX_SYMLINK_TARGET = 4095
#: largest inline content of a regular file (the C library refuses more)
MAX_INLINE_CONTENT = 5000
#: symbolic links :func:`read_path` follows in one lookup (the kernel's limit)
MAX_SYMLINK_HOPS = 40

_P = ParamSpec("_P")
_T = TypeVar("_T")
_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_FORMAT_TYPES = frozenset(fmt.FT_FROM_MODE)
_S_IFMT = 0o170000
_XATTR_ENTRY_UNPACK = fmt.XATTR_ENTRY.unpack_from
_COMPACT_UNPACK = fmt.INODE_COMPACT.unpack_from
_EXTENDED_UNPACK = fmt.INODE_EXTENDED.unpack_from
# Hot-path copies of format constants (a module global is cheaper than an attribute).
_SLOT_BITS = fmt.INODE_SLOT_BITS
_COMPACT_SIZE = fmt.INODE_COMPACT_SIZE
_EXTENDED_SIZE = fmt.INODE_EXTENDED_SIZE
_FORMAT_EXTENDED = fmt.INODE_FORMAT_EXTENDED
_LAYOUT_MASK = fmt.INODE_LAYOUT_MASK
_XATTR_BODY_HEADER_SIZE = fmt.XATTR_BODY_HEADER_SIZE
_XATTR_ENTRY_SIZE = fmt.XATTR_ENTRY_SIZE
_DIRENT_SIZE = fmt.DIRENT_SIZE
_S_IFDIR = stat.S_IFDIR
_S_IFREG = stat.S_IFREG
_S_IFLNK = stat.S_IFLNK
_S_IFCHR = stat.S_IFCHR
_S_IFBLK = stat.S_IFBLK
_LAYOUT_CHUNK_BASED = fmt.LAYOUT_CHUNK_BASED
_LAYOUT_FLAT_PLAIN = fmt.LAYOUT_FLAT_PLAIN
_LAYOUT_FLAT_INLINE = fmt.LAYOUT_FLAT_INLINE
_BLOCK_SIZE = fmt.BLOCK_SIZE
_XATTR_REDIRECT = fmt.XATTR_REDIRECT
_XATTR_METACOPY = fmt.XATTR_METACOPY
_METACOPY_SIZE = fmt.METACOPY_SIZE
#: xattr name prefixes by name index
_PREFIXES = tuple(fmt.XATTR_PREFIXES[i] for i in range(len(fmt.XATTR_PREFIXES)))
_PREFIX_COUNT = len(_PREFIXES)
_DOT_NAMES = (b".", b"..")
_BYTES_LT = bytes.__lt__
_OVERLAY_PREFIXES = (fmt.OVERLAY_PREFIX, fmt.USER_OVERLAY_PREFIX)
#: overlay markers the C reader drops wherever they appear
_DROPPED_XATTRS = frozenset(
    (fmt.XATTR_ESCAPED_WHITEOUTS, fmt.XATTR_USER_WHITEOUT, fmt.XATTR_USER_WHITEOUTS)
)
_UNESCAPE_KEEP = len(b"trusted.")
_UNESCAPE_DROP = len(fmt.OVERLAY_PREFIX)


class _Inode:
    """The fields of one on-disk inode the reader needs.

    A slotted plain class rather than a dataclass: importing ``dataclasses``
    (and ``inspect`` with it) would cost ``composefs info`` 6 ms.
    """

    __slots__ = ("nid", "offset", "isize", "layout", "xattr_size", "mode", "ftype", "nlink", "size", "u",
                 "uid", "gid", "mtime_sec", "mtime_nsec", "tail_offset")

    def __init__(self, nid: int, offset: int, isize: int, layout: int, xattr_size: int, mode: int,
                 ftype: int, nlink: int, size: int, u: int, uid: int, gid: int, mtime_sec: int,
                 mtime_nsec: int, tail_offset: int) -> None:
        self.nid = nid
        self.offset = offset
        self.isize = isize
        self.layout = layout
        self.xattr_size = xattr_size
        self.mode = mode
        #: ``stat.S_IFMT(mode)``
        self.ftype = ftype
        self.nlink = nlink
        self.size = size
        self.u = u
        self.uid = uid
        self.gid = gid
        self.mtime_sec = mtime_sec
        self.mtime_nsec = mtime_nsec
        #: where the inline data starts: right after the header and the xattrs
        self.tail_offset = tail_offset


@functools.cache
def _dirents_struct(count: int) -> struct.Struct:
    """The layout of ``count`` consecutive dirents (at most 341 fit in a block)."""
    return struct.Struct("<" + "QHBx" * count)


@functools.cache
def _refs_struct(count: int) -> struct.Struct:
    """The layout of ``count`` shared xattr references (an inode has at most 255)."""
    return struct.Struct(f"<{count}I")


def _signed64(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value


class _Image:
    """Bounds-checked access to the inodes, dirents and xattrs of an image."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.size = len(data)
        #: bytes the reader may still consume (see the module docstring)
        self.budget = self.size
        #: decoded shared xattr entries by reference
        self._shared: dict[int, tuple[bytes, bytes]] = {}
        self._parse_superblock()

    def _parse_superblock(self) -> None:
        if self.size < MIN_IMAGE_SIZE:
            raise ImageFormatError(f"image too small ({self.size} bytes)")
        magic, version, _flags, _cfs_version = fmt.COMPOSEFS_HEADER.unpack_from(self.data, 0)
        if magic != fmt.COMPOSEFS_MAGIC:
            raise ImageFormatError(f"bad composefs magic {magic:#010x}")
        if version != fmt.COMPOSEFS_HEADER_VERSION:
            raise ImageFormatError(f"unsupported composefs header version {version}")
        sb = fmt.SUPERBLOCK.unpack_from(self.data, fmt.EROFS_SUPER_OFFSET)
        if sb[0] != fmt.EROFS_MAGIC:
            raise ImageFormatError(f"bad EROFS magic {sb[0]:#010x}")
        self.root_nid: int = sb[5]
        self.build_time = _signed64(sb[7])
        self.build_time_nsec: int = sb[8]
        self.meta_start = sb[10] * fmt.BLOCK_SIZE
        self.xattr_start = sb[11] * fmt.BLOCK_SIZE
        if self.meta_start >= self.size or self.xattr_start >= self.size:
            raise ImageFormatError("metadata or shared xattr area outside the image")

    def spend(self, nbytes: int) -> None:
        self.budget -= nbytes
        if self.budget < 0:
            raise ImageFormatError("image reuses its own regions (more data read than it holds)")

    def _check_range(self, start: int, length: int, what: str, nid: int) -> None:
        """Check that ``what`` (data, inline data, ...) of inode ``nid`` lies in the image."""
        if start < 0 or length < 0 or start + length > self.size:
            raise ImageFormatError(f"{what} of inode {nid} at {start}+{length} is outside the image")

    # --- inodes ---------------------------------------------------------------

    def inode(self, nid: int) -> _Inode:
        """Parse the inode ``nid``; its header and xattr body are in bounds."""
        offset = self.meta_start + (nid << _SLOT_BITS)
        data = self.data
        if offset + _COMPACT_SIZE > self.size:
            raise ImageFormatError(f"inode {nid} is outside the image")
        i_format = data[offset]  # the format bits all sit in the low byte
        if i_format & _FORMAT_EXTENDED:
            isize = _EXTENDED_SIZE
            if offset + isize > self.size:
                raise ImageFormatError(f"inode {nid} is outside the image")
            (_, icount, mode, size, u, _ino, uid, gid, sec, nsec, nlink) = _EXTENDED_UNPACK(
                data, offset
            )
        else:
            isize = _COMPACT_SIZE
            (_, icount, mode, nlink, size, u, _ino, uid, gid) = _COMPACT_UNPACK(data, offset)
            sec, nsec = self.build_time, self.build_time_nsec
        xattr_size = 0 if icount == 0 else _XATTR_BODY_HEADER_SIZE + 4 * (icount - 1)
        tail_offset = offset + isize + xattr_size
        if tail_offset > self.size:
            raise ImageFormatError(f"xattrs of inode {nid} run past the end of the image")
        ftype = mode & _S_IFMT
        if ftype not in _FORMAT_TYPES:
            raise ImageFormatError(f"inode {nid} has unknown file type (mode {mode:o})")
        return _Inode(
            nid, offset, isize, (i_format & _LAYOUT_MASK) >> 1, xattr_size,
            mode, ftype, nlink, size, u, uid, gid, sec, nsec, tail_offset,
        )

    # --- file data ------------------------------------------------------------

    def flat_data(self, ino: _Inode) -> tuple[int, int, int]:
        """Where the data of a flat inode lives: (block_start, block_length, tail_length).

        The data is ``block_length`` bytes at ``block_start`` followed by
        ``tail_length`` bytes right after the inode's xattrs. Both pieces are
        in bounds and have been charged to the budget.
        """
        size = ino.size
        layout = ino.layout
        if layout == _LAYOUT_FLAT_INLINE:
            tail_len = size % _BLOCK_SIZE
            if tail_len == 0:
                raise ImageFormatError(f"inode {ino.nid}: inline layout without a tail")
            block_len = size - tail_len
        elif layout == _LAYOUT_FLAT_PLAIN:
            block_len, tail_len = size, 0
        else:
            raise ImageFormatError(f"inode {ino.nid}: unsupported data layout {layout}")
        block_start = ino.u * _BLOCK_SIZE
        if block_len:
            self._check_range(block_start, block_len, "data", ino.nid)
        self._check_range(ino.tail_offset, tail_len, "inline data", ino.nid)
        self.spend(block_len + tail_len)
        return block_start, block_len, tail_len

    def content(self, ino: _Inode) -> bytes:
        block_start, block_len, tail_len = self.flat_data(ino)
        data = self.data
        tail_start = ino.tail_offset
        tail = data[tail_start : tail_start + tail_len]
        if not block_len:
            return tail
        return data[block_start : block_start + block_len] + tail

    # --- directories ----------------------------------------------------------

    def dir_entries(self, ino: _Inode) -> list[tuple[bytes, int]]:
        """The (name, nid) entries of a directory without ``.`` and ``..``, in stored order.

        Names must be valid path components in strictly increasing byte order,
        which also rules out duplicates.
        """
        block_start, block_len, tail_len = self.flat_data(ino)
        entries: list[tuple[bytes, int]] = []
        for pos in range(block_start, block_start + block_len, _BLOCK_SIZE):
            end = min(pos + _BLOCK_SIZE, block_start + block_len)
            self._read_dirents(ino, self.data[pos:end], entries)
        if tail_len:
            tail = ino.tail_offset
            self._read_dirents(ino, self.data[tail : tail + tail_len], entries)
        return entries

    def _read_dirents(self, ino: _Inode, chunk: bytes, entries: list[tuple[bytes, int]]) -> None:
        """Parse one dirent chunk (a block or the tail) and append its entries."""
        length = len(chunk)
        if length < _DIRENT_SIZE:
            raise ImageFormatError(f"directory inode {ino.nid}: truncated dirent block")
        names_start = _U16.unpack_from(chunk, 8)[0]
        if names_start % _DIRENT_SIZE or not _DIRENT_SIZE <= names_start <= length:
            raise ImageFormatError(f"directory inode {ino.nid}: bad first name offset")
        # All dirents in one unpack: (nid, nameoff, ftype) repeated.
        fields = _dirents_struct(names_start // _DIRENT_SIZE).unpack_from(chunk)
        # Each name runs to the next one's offset; the last one to a NUL or the end.
        offsets = list(fields[1::3])
        nul = chunk.find(b"\0", offsets[-1])
        offsets.append(length if nul < 0 else nul)
        names = [chunk[a:b] for a, b in zip(offsets, offsets[1:])]
        # A slice is empty exactly when its offsets do not increase.
        if not all(names):
            raise ImageFormatError(f"directory inode {ino.nid}: bad name offsets")
        names_area = chunk[names_start : offsets[-1]]
        if b"/" in names_area or b"\0" in names_area:
            raise ImageFormatError(f"directory inode {ino.nid}: a name holds '/' or NUL")
        # A name can only be too long if all of them together are.
        if len(names_area) > fmt.MAX_NAME_LEN and max(map(len, names)) > fmt.MAX_NAME_LEN:
            raise ImageFormatError(f"directory inode {ino.nid}: name longer than {fmt.MAX_NAME_LEN}")
        found = [entry for entry in zip(names, fields[0::3]) if entry[0] not in _DOT_NAMES]
        if not found:
            return
        names = [name for name, _nid in found]
        if entries and names[0] <= entries[-1][0] or not all(map(_BYTES_LT, names, names[1:])):
            raise ImageFormatError(f"directory inode {ino.nid}: entries not sorted or duplicated")
        entries.extend(found)

    # --- xattrs -----------------------------------------------------------------

    def xattrs(self, ino: _Inode) -> list[tuple[bytes, bytes]]:
        """The raw (full name, value) pairs of an inode: inline entries, then shared ones.

        The body itself was charged to the budget with the inode (see :meth:`walk`).
        """
        data = self.data
        body = ino.offset + ino.isize
        end = ino.tail_offset
        shared_count = data[body + 4]
        refs = body + _XATTR_BODY_HEADER_SIZE
        pos = refs + 4 * shared_count
        if pos > end:
            raise ImageFormatError(f"inode {ino.nid}: shared xattr count overflows the body")
        found = []
        # Like the C reader, stop once no more than an entry header is left.
        while pos + _XATTR_ENTRY_SIZE < end:
            name, value, pos = self._xattr_entry(pos, end, ino.nid)
            found.append((name, value))
        if shared_count:
            shared = self._shared
            for ref in _refs_struct(shared_count).unpack_from(data, refs):
                found.append(shared.get(ref) or self._shared_xattr(ref, ino.nid))
        return found

    def _xattr_entry(self, pos: int, end: int, nid: int) -> tuple[bytes, bytes, int]:
        """Decode the entry at ``pos`` (which must end by ``end``); return it and the next position."""
        data = self.data
        name_len, index, value_size = _XATTR_ENTRY_UNPACK(data, pos)
        start = pos + _XATTR_ENTRY_SIZE
        value_start = start + name_len
        value_end = value_start + value_size
        if value_end > end:
            raise ImageFormatError(f"inode {nid}: xattr entry at {pos} overruns its area")
        if index >= _PREFIX_COUNT:
            raise ImageFormatError(f"inode {nid}: unknown xattr name index {index}")
        name = _PREFIXES[index] + data[start:value_start]
        if not name or b"\0" in name:
            raise ImageFormatError(f"inode {nid}: invalid xattr name {name!r}")
        return name, data[value_start:value_end], (value_end + 3) & ~3

    def _shared_xattr(self, ref: int, nid: int) -> tuple[bytes, bytes]:
        """Decode shared entry ``ref`` and cache it (each is charged to the budget once)."""
        offset = self.xattr_start + 4 * ref
        self._check_range(offset, _XATTR_ENTRY_SIZE, "shared xattr", nid)
        name, value, next_pos = self._xattr_entry(offset, self.size, nid)
        self.spend(next_pos - offset)
        entry = self._shared[ref] = (name, value)
        return entry

    # --- path lookup ---------------------------------------------------------------

    def lookup(self, path: bytes, follow_symlinks: bool) -> int | None:
        """The nid that ``path`` names, symlinks resolved inside the image; None if absent.

        Resolution works as in a chroot: an absolute target starts again at the
        root and ``..`` stops there. Each directory is read once (its entries
        are kept), so the budget bounds a lookup as it bounds a walk.
        """
        root = self.root_nid
        trail = [root]  # the nids from the root down to the entry reached so far
        pending = path.split(b"/")[::-1]  # components left, the next one last
        entries: dict[int, dict[bytes, int]] = {}
        hops = 0
        while pending:
            name = pending.pop()
            parent = self.inode(trail[-1])
            if parent.ftype != _S_IFDIR:
                return None  # ENOTDIR, also for "file/" and "file/."
            if name in (b"", b"."):
                continue
            if name == b"..":
                if len(trail) > 1:
                    trail.pop()
                continue
            if parent.nid not in entries:
                entries[parent.nid] = dict(self.dir_entries(parent))
            nid = entries[parent.nid].get(name)
            if nid is None:
                return None
            ino = self.inode(nid)
            if ino.ftype == _S_IFCHR and ino.u == 0:
                return None  # a whiteout stub is not an entry
            if ino.ftype == _S_IFLNK and (pending or follow_symlinks):
                hops += 1
                if hops > MAX_SYMLINK_HOPS:
                    raise SymlinkLoopError(f"{path!r}: more than {MAX_SYMLINK_HOPS} symbolic links")
                if not 0 < ino.size <= MAX_SYMLINK_TARGET:
                    raise ImageFormatError(f"inode {nid}: symlink target of {ino.size} bytes")
                target = self.content(ino)
                if target.startswith(b"/"):
                    del trail[1:]
                pending.extend(target.split(b"/")[::-1])
                continue
            trail.append(nid)
        return trail[-1]

    # --- the walk -----------------------------------------------------------------

    def walk(
        self, filters: Collection[bytes] | None, top: int | None = None
    ) -> Iterator[tuple[int, bytes, int, _Inode | None]]:
        """Depth-first pre-order over the tree, children in dirent order.

        Yields ``(depth, name, nid, inode)``: first the root at depth 0 with
        an empty name, then every entry below it, with ``inode`` None when
        ``nid`` was met before (a hard link). Stubs are skipped; ``filters``
        keeps only those root-level names. Each inode yielded has had its
        header and xattr body charged to the budget. ``top`` starts the walk
        at another inode than the root (which may then be of any type).
        """
        root = self.inode(self.root_nid if top is None else top)
        if root.ftype != stat.S_IFDIR:
            if top is None:
                raise ImageFormatError("the root inode is not a directory")
            self.spend(root.isize + root.xattr_size)
            yield 0, b"", root.nid, root
            return
        self.spend(root.isize + root.xattr_size)
        yield 0, b"", root.nid, root
        seen: set[int] = {root.nid}
        dirs: set[int] = {root.nid}
        stubs: set[int] = set()
        inode = self.inode
        stack: list[Iterator[tuple[bytes, int]]] = [iter(self._children(root, filters))]
        while stack:
            depth = len(stack)
            for name, nid in stack[-1]:
                if nid in seen:
                    if nid in dirs:
                        raise ImageFormatError(f"directory inode {nid} is reached twice (loop)")
                    yield depth, name, nid, None
                    continue
                ino = inode(nid)
                ftype = ino.ftype
                if ftype == _S_IFCHR and ino.u == 0:
                    # A whiteout stub: left out. Each has a single name, and
                    # the C reader misbehaves when one is reached again.
                    if nid in stubs:
                        raise ImageFormatError(f"whiteout stub inode {nid} is reached twice")
                    stubs.add(nid)
                    continue
                self.spend(ino.isize + ino.xattr_size)
                seen.add(nid)
                yield depth, name, nid, ino
                if ftype == _S_IFDIR:
                    if depth >= MAX_DEPTH:
                        raise ImageFormatError(f"directories nested deeper than {MAX_DEPTH}")
                    dirs.add(nid)
                    stack.append(iter(self._children(ino, None)))
                    break
            else:
                stack.pop()

    def _children(self, ino: _Inode, filters: Collection[bytes] | None) -> list[tuple[bytes, int]]:
        entries = self.dir_entries(ino)
        if filters is not None:
            entries = [entry for entry in entries if entry[0] in filters]
        return entries


# --- from inodes to nodes ---------------------------------------------------------


def _apply_overlay_xattr(node: Node, name: bytes, value: bytes) -> None:
    """Apply one stored ``trusted.overlay.*``/``user.overlay.*`` xattr the way composefs-info does.

    The overlayfs xattrs the writer adds become node fields or are dropped;
    escaped ``trusted.overlay.overlay.*`` names are unescaped. The file type is
    checked at each step because an escaped whiteout turns the regular file
    into a character device part way through the list.
    """
    is_reg = node.mode & _S_IFMT == _S_IFREG
    if name == _XATTR_REDIRECT:
        if is_reg:
            # The C reader over-reads one byte here; the payload is value[1:].
            # Like its string copy, the payload ends at a NUL.
            payload = value[1:] if len(value) > 1 and value[:1] == b"/" else value
            node.payload = payload.partition(b"\0")[0]
    elif name == _XATTR_METACOPY:
        if is_reg and len(value) == _METACOPY_SIZE:
            node.digest = value[4:]
    elif name == fmt.XATTR_ESCAPED_WHITEOUT and is_reg:
        node.mode = stat.S_IFCHR | stat.S_IMODE(node.mode)
        node.rdev = 0
        node.size = 0
        if node.content is not None:
            # composefs-info keeps the content but prints it with the new size 0.
            node.content = b""
    elif name in _DROPPED_XATTRS:
        pass
    elif name.startswith(fmt.OVERLAY_ESCAPED_PREFIX):
        node.xattrs[name[:_UNESCAPE_KEEP] + name[_UNESCAPE_DROP:]] = value
    elif not name.startswith(fmt.OVERLAY_PREFIX):
        node.xattrs[name] = value


def _make_node(image: _Image, ino: _Inode) -> Node:
    ftype = ino.ftype
    rdev = ino.u if ftype == _S_IFCHR or ftype == _S_IFBLK else 0
    # Positional, in Node's field order (mode, uid, gid, nlink, rdev, size,
    # mtime_sec, mtime_nsec): measurably faster on large images.
    node = Node(ino.mode, ino.uid, ino.gid, ino.nlink, rdev, ino.size, ino.mtime_sec, ino.mtime_nsec)
    if ftype == _S_IFREG:
        if ino.size and ino.layout != _LAYOUT_CHUNK_BASED:
            if ino.size > MAX_INLINE_CONTENT:
                raise ImageFormatError(f"inode {ino.nid}: {ino.size} bytes of inline content")
            node.content = image.content(ino)
    elif ftype == _S_IFLNK:
        if not 0 < ino.size <= MAX_SYMLINK_TARGET:
            raise ImageFormatError(f"inode {ino.nid}: symlink target of {ino.size} bytes")
        target = image.content(ino)
        if b"\0" in target:
            raise ImageFormatError(f"inode {ino.nid}: NUL in symlink target")
        node.payload = target
    if ino.xattr_size:
        xattrs = node.xattrs
        for name, value in image.xattrs(ino):
            if name.startswith(_OVERLAY_PREFIXES):
                _apply_overlay_xattr(node, name, value)
            else:
                xattrs[name] = value
    return node


def _load(data: bytes | bytearray | memoryview | str | os.PathLike[str]) -> bytes:
    if isinstance(data, (str, os.PathLike)):
        with open(data, "rb") as f:
            return f.read()
    return bytes(data)


def _guarded(func: Callable[_P, _T]) -> Callable[_P, _T]:
    """Turn any slip past the explicit checks into an ImageFormatError, never a crash."""

    @functools.wraps(func)
    def wrapper(*args: _P.args, **kwargs: _P.kwargs) -> _T:
        try:
            return func(*args, **kwargs)
        except ImageFormatError:
            raise
        except (struct.error, IndexError, ValueError, OverflowError) as exc:
            raise ImageFormatError(f"malformed image: {exc}") from None

    return wrapper


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    """Pause the cyclic garbage collector while a tree is built.

    A tree holds no reference cycles, yet the allocations of a large one set
    off collections that traverse it again and again for nothing (about a
    fifth of the reading time on a 64,000-entry image).
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def read_image(
    data: bytes | bytearray | memoryview | str | os.PathLike[str],
    *,
    filters: Collection[bytes] | None = None,
) -> Node:
    """Read an image (bytes, or a path to one) into a tree; return its root.

    ``filters`` keeps only the named root-level entries and, like
    ``composefs-info --filter``, applies while reading: a hard link whose
    first occurrence is filtered out becomes the original.

    Raises:
        ImageFormatError: the image is malformed, truncated or hostile.
        OSError: ``data`` is a path that cannot be read.
    """
    return _read_tree(_load(data), None if filters is None else frozenset(filters))


@_guarded
def _read_tree(data: bytes, filters: frozenset[bytes] | None) -> Node:
    with _gc_paused():
        return _build_tree(_Image(data), filters)


def _build_tree(image: _Image, filters: frozenset[bytes] | None, top: int | None = None) -> Node:
    by_nid: dict[int, Node] = {}
    #: ``open_dirs[d]``: the children of the last directory met at depth ``d``,
    #: which in a pre-order walk is the parent of any entry at depth ``d + 1``
    open_dirs: list[dict[bytes, Node]] = []
    for depth, name, nid, ino in image.walk(filters, top):
        if ino is None:
            open_dirs[depth - 1][name] = Node.hardlink(by_nid[nid])
            continue
        node = by_nid[nid] = _make_node(image, ino)
        if depth:
            open_dirs[depth - 1][name] = node
        if ino.ftype == _S_IFDIR:
            open_dirs[depth:] = (node.children,)
    return by_nid[image.root_nid if top is None else top]


def read_path(
    data: bytes | bytearray | memoryview | str | os.PathLike[str],
    path: bytes,
    *,
    follow_symlinks: bool = True,
) -> Node | None:
    """The entry at ``path`` in an image (bytes, or a path to one), or None if it has none.

    Reads only the directories on the way and the entry itself, with its
    subtree when it is a directory (hard links inside it as
    :func:`read_image` would give them with the entry as root). Symbolic
    links on the way, and at the end with ``follow_symlinks``, are resolved
    inside the image as in a chroot: an absolute target starts again at the
    image's root and ``..`` never climbs above it, so a hostile link cannot
    name anything outside. A component that is not a directory makes the
    path absent, as ``ENOTDIR`` would.

    Raises:
        ImageFormatError: the image is malformed or hostile.
        SymlinkLoopError: (an ImageFormatError) the lookup meets more than
            :data:`MAX_SYMLINK_HOPS` symbolic links.
        OSError: ``data`` is a path that cannot be read.
    """
    return _read_path(_load(data), path, follow_symlinks)


@_guarded
def _read_path(data: bytes, path: bytes, follow_symlinks: bool) -> Node | None:
    image = _Image(data)
    nid = image.lookup(path, follow_symlinks)
    if nid is None:
        return None
    # The lookup read each directory on the way once; the subtree gets a
    # budget of its own, so a lookup plus a walk reads at most twice the file.
    image.budget = image.size
    with _gc_paused():
        return _build_tree(image, None, nid)


def image_objects(
    data: bytes | bytearray | memoryview | str | os.PathLike[str],
    *,
    filters: Collection[bytes] | None = None,
) -> list[bytes]:
    """The backing-object payloads (``xx/yyyy...``) an image references, sorted and unique.

    Equal to what ``composefs-info objects`` prints, without building the tree:
    only regular files' xattrs are decoded.

    Raises:
        ImageFormatError: the image is malformed, truncated or hostile.
    """
    return _collect_objects(_load(data), None if filters is None else frozenset(filters))


@_guarded
def _collect_objects(data: bytes, filters: frozenset[bytes] | None) -> list[bytes]:
    image = _Image(data)
    objects: set[bytes] = set()
    for _depth, _name, _nid, ino in image.walk(filters):
        if ino is None or ino.ftype != stat.S_IFREG or not ino.xattr_size:
            continue
        node = Node(mode=ino.mode)
        for name, value in image.xattrs(ino):
            if name.startswith(_OVERLAY_PREFIXES):
                _apply_overlay_xattr(node, name, value)
        if node.payload is not None and stat.S_ISREG(node.mode):
            objects.add(node.payload)
    return sorted(objects)
