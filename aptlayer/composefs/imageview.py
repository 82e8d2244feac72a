"""A bounds-checked view of the EROFS filesystem inside a composefs image.

:class:`ImageView` decodes the structures ``format.py`` lays out (the
superblock, inodes, directory entries, file data, inline and shared
xattrs) straight from the image bytes, and walks the tree. It interprets
nothing: what the overlayfs xattrs mean is the reader's business
(``reader.py``), and the patcher (``patch.py``) uses the byte offsets the
view hands out to rewrite an image in place.

Images are hostile input. Every offset and size is checked against the
file before it is read; a walk may not reach a directory twice (a loop or a
directory hard link), its depth is bounded, and the bytes a view may
consume are budgeted by the size of the file: in a well-formed image the
inodes, their xattrs and data and the shared xattr entries never overlap,
so an image that makes the view consume more bytes than it has reuses
regions and is rejected. Memory stays proportional to the file size and the
walk is iterative. Every defect the checks find raises
:class:`ImageFormatError`; :func:`guarded` turns anything that slips past
them into one too.

The views are slotted plain classes rather than dataclasses: importing
``dataclasses`` (and ``inspect`` with it) would cost ``composefs info``
several milliseconds of its start-up.
"""

from __future__ import annotations

import functools
import stat
import struct
from collections.abc import Callable, Collection, Iterator
from typing import ParamSpec, TypeVar

from . import format as fmt


class ImageFormatError(ValueError):
    """The bytes are not a composefs image this reader can trust."""


#: deepest directory nesting a walk accepts; a path of this many one-byte
#: names already fills PATH_MAX (4096 bytes)
MAX_DEPTH = 2048
#: the smallest image the C reader accepts
MIN_IMAGE_SIZE = fmt.BLOCK_SIZE

_P = ParamSpec("_P")
_T = TypeVar("_T")
_U16 = struct.Struct("<H")
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
_S_IFCHR = stat.S_IFCHR
_LAYOUT_FLAT_PLAIN = fmt.LAYOUT_FLAT_PLAIN
_LAYOUT_FLAT_INLINE = fmt.LAYOUT_FLAT_INLINE
_BLOCK_SIZE = fmt.BLOCK_SIZE
#: xattr name prefixes by name index
_PREFIXES = tuple(fmt.XATTR_PREFIXES[i] for i in range(len(fmt.XATTR_PREFIXES)))
_PREFIX_COUNT = len(_PREFIXES)
_DOT_NAMES = (b".", b"..")
_BYTES_LT = bytes.__lt__


class InodeView:
    """The decoded header of one on-disk inode, and where its parts lie in the image."""

    __slots__ = ("nid", "offset", "isize", "layout", "xattr_size", "mode", "ftype", "nlink", "size", "u",
                 "uid", "gid", "mtime_sec", "mtime_nsec", "tail_offset")

    def __init__(self, nid: int, offset: int, isize: int, layout: int, xattr_size: int, mode: int,
                 ftype: int, nlink: int, size: int, u: int, uid: int, gid: int, mtime_sec: int,
                 mtime_nsec: int, tail_offset: int) -> None:
        self.nid = nid
        #: where the inode header starts
        self.offset = offset
        #: the header's size: ``fmt.INODE_COMPACT_SIZE`` or ``fmt.INODE_EXTENDED_SIZE``
        self.isize = isize
        #: ``fmt.LAYOUT_*``
        self.layout = layout
        #: the xattr body's size (0: none), which starts right after the header
        self.xattr_size = xattr_size
        self.mode = mode
        #: ``stat.S_IFMT(mode)``
        self.ftype = ftype
        self.nlink = nlink
        self.size = size
        #: ``i_u``: first data block, chunk format or device number, by type
        self.u = u
        self.uid = uid
        self.gid = gid
        #: a compact inode's are the superblock's build time
        self.mtime_sec = mtime_sec
        self.mtime_nsec = mtime_nsec
        #: where the inline data starts: right after the header and the xattrs
        self.tail_offset = tail_offset


class XattrEntry:
    """One stored xattr of an inode, with where it lies in the image."""

    __slots__ = ("name", "value", "offset", "value_offset", "shared")

    def __init__(self, name: bytes, value: bytes, offset: int, value_offset: int, shared: bool) -> None:
        #: the full name, its prefix decoded
        self.name = name
        self.value = value
        #: where the entry starts: in the inode's xattr body, or in the shared table
        self.offset = offset
        #: where the value's ``len(value)`` bytes start
        self.value_offset = value_offset
        #: whether the inode references the entry in the shared table
        self.shared = shared


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


def guarded(func: Callable[_P, _T]) -> Callable[_P, _T]:
    """Turn any slip past the explicit checks into an ImageFormatError, never a crash.

    For the entry points of a view's users: one wrapper around a whole
    read rather than one around each call on the hot path.
    """

    @functools.wraps(func)
    def wrapper(*args: _P.args, **kwargs: _P.kwargs) -> _T:
        try:
            return func(*args, **kwargs)
        except ImageFormatError:
            raise
        except (struct.error, IndexError, ValueError, OverflowError) as exc:
            raise ImageFormatError(f"malformed image: {exc}") from None

    return wrapper


class ImageView:
    """Bounds-checked access to the superblock, inodes, dirents, data and xattrs of an image.

    Raises:
        ImageFormatError: (from the constructor and every method) the
            structure read is malformed, out of bounds or reuses bytes
            already consumed.
    """

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.size = len(data)
        #: bytes the view may still consume (see the module docstring)
        self._budget = self.size
        #: decoded shared xattr entries by reference
        self._shared: dict[int, tuple[bytes, bytes]] = {}
        self._parse_superblock()

    def _parse_superblock(self) -> None:
        if self.size < MIN_IMAGE_SIZE:
            raise ImageFormatError(f"image too small ({self.size} bytes)")
        magic, version, _flags, cfs_version = fmt.COMPOSEFS_HEADER.unpack_from(self.data, 0)
        if magic != fmt.COMPOSEFS_MAGIC:
            raise ImageFormatError(f"bad composefs magic {magic:#010x}")
        if version != fmt.COMPOSEFS_HEADER_VERSION:
            raise ImageFormatError(f"unsupported composefs header version {version}")
        #: the header's ``composefs_version`` (0 or 1 from the C writer; any value is read)
        self.composefs_version: int = cfs_version
        sb = fmt.SUPERBLOCK.unpack_from(self.data, fmt.EROFS_SUPER_OFFSET)
        if sb[0] != fmt.EROFS_MAGIC:
            raise ImageFormatError(f"bad EROFS magic {sb[0]:#010x}")
        self.root_nid: int = sb[5]
        #: the smallest mtime, which compact inodes take
        self.build_time = _signed64(sb[7])
        self.build_time_nsec: int = sb[8]
        self.meta_start = sb[10] * fmt.BLOCK_SIZE
        #: where shared xattr references count from
        self.xattr_start = sb[11] * fmt.BLOCK_SIZE
        if self.meta_start >= self.size or self.xattr_start >= self.size:
            raise ImageFormatError("metadata or shared xattr area outside the image")

    def _spend(self, nbytes: int) -> None:
        self._budget -= nbytes
        if self._budget < 0:
            raise ImageFormatError("image reuses its own regions (more data read than it holds)")

    def _check_range(self, start: int, length: int, what: str, nid: int) -> None:
        """Check that ``what`` (data, inline data, ...) of inode ``nid`` lies in the image."""
        if start < 0 or length < 0 or start + length > self.size:
            raise ImageFormatError(f"{what} of inode {nid} at {start}+{length} is outside the image")

    # --- inodes ---------------------------------------------------------------

    def inode(self, nid: int) -> InodeView:
        """Parse the inode ``nid``; its header and xattr body are in bounds."""
        offset = self.meta_start + (nid << _SLOT_BITS)
        data = self.data
        if not self.meta_start <= offset <= self.size - _COMPACT_SIZE:
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
        return InodeView(
            nid, offset, isize, (i_format & _LAYOUT_MASK) >> 1, xattr_size,
            mode, ftype, nlink, size, u, uid, gid, sec, nsec, tail_offset,
        )

    # --- file data ------------------------------------------------------------

    def data_ranges(self, ino: InodeView) -> tuple[int, int, int]:
        """Where the data of a flat inode lives: (block_start, block_length, tail_length).

        The data is ``block_length`` bytes at ``block_start`` followed by
        ``tail_length`` bytes at ``ino.tail_offset``, right after the inode's
        xattrs. Both pieces are in bounds and have been charged to the
        budget. A chunk-based (external) inode has no such data: an error.
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
        self._spend(block_len + tail_len)
        return block_start, block_len, tail_len

    def content(self, ino: InodeView) -> bytes:
        """The data of a flat inode: a small file's content or a symlink's target."""
        block_start, block_len, tail_len = self.data_ranges(ino)
        data = self.data
        tail_start = ino.tail_offset
        tail = data[tail_start : tail_start + tail_len]
        if not block_len:
            return tail
        return data[block_start : block_start + block_len] + tail

    # --- directories ----------------------------------------------------------

    def dir_entries(self, ino: InodeView) -> list[tuple[bytes, int]]:
        """The (name, nid) entries of a directory without ``.`` and ``..``, in stored order.

        Names must be valid path components in strictly increasing byte order,
        which also rules out duplicates.
        """
        block_start, block_len, tail_len = self.data_ranges(ino)
        entries: list[tuple[bytes, int]] = []
        for pos in range(block_start, block_start + block_len, _BLOCK_SIZE):
            end = min(pos + _BLOCK_SIZE, block_start + block_len)
            self._read_dirents(ino, self.data[pos:end], entries)
        if tail_len:
            tail = ino.tail_offset
            self._read_dirents(ino, self.data[tail : tail + tail_len], entries)
        return entries

    def _read_dirents(self, ino: InodeView, chunk: bytes, entries: list[tuple[bytes, int]]) -> None:
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

    def xattrs(self, ino: InodeView) -> list[tuple[bytes, bytes]]:
        """The (full name, value) pairs of an inode: inline entries, then shared ones.

        The body itself is charged to the budget by :meth:`walk`.
        """
        if not ino.xattr_size:
            return []
        refs, shared_count, pos = self._xattr_body(ino)
        end = ino.tail_offset
        found = []
        # Like the C reader, stop once no more than an entry header is left.
        while pos + _XATTR_ENTRY_SIZE < end:
            name, value, pos = self._xattr_entry(pos, end, ino.nid)
            found.append((name, value))
        if shared_count:
            shared = self._shared
            for ref in _refs_struct(shared_count).unpack_from(self.data, refs):
                found.append(shared.get(ref) or self._shared_xattr(ref, ino.nid))
        return found

    def xattr_entries(self, ino: InodeView) -> list[XattrEntry]:
        """The entries :meth:`xattrs` decodes, in its order, with where each lies in the image."""
        if not ino.xattr_size:
            return []
        data = self.data
        nid = ino.nid
        refs, shared_count, pos = self._xattr_body(ino)
        end = ino.tail_offset
        found = []
        while pos + _XATTR_ENTRY_SIZE < end:
            name, value, next_pos = self._xattr_entry(pos, end, nid)
            found.append(XattrEntry(name, value, pos, pos + _XATTR_ENTRY_SIZE + data[pos], False))
            pos = next_pos
        if shared_count:
            shared = self._shared
            for ref in _refs_struct(shared_count).unpack_from(data, refs):
                name, value = shared.get(ref) or self._shared_xattr(ref, nid)
                offset = self.xattr_start + 4 * ref
                found.append(XattrEntry(name, value, offset, offset + _XATTR_ENTRY_SIZE + data[offset], True))
        return found

    def _xattr_body(self, ino: InodeView) -> tuple[int, int, int]:
        """Where an inode's shared references start, how many there are, and where its inline entries start."""
        body = ino.offset + ino.isize
        shared_count = self.data[body + 4]
        refs = body + _XATTR_BODY_HEADER_SIZE
        inline = refs + 4 * shared_count
        if inline > ino.tail_offset:
            raise ImageFormatError(f"inode {ino.nid}: shared xattr count overflows the body")
        return refs, shared_count, inline

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
        self._spend(next_pos - offset)
        entry = self._shared[ref] = (name, value)
        return entry

    # --- the walk -----------------------------------------------------------------

    def walk(
        self, filters: Collection[bytes] | None = None, top: int | None = None
    ) -> Iterator[tuple[int, bytes, int, InodeView | None]]:
        """Depth-first pre-order over the tree, children in dirent order.

        Yields ``(depth, name, nid, inode)``: first the root at depth 0 with
        an empty name, then every entry below it, with ``inode`` None when
        ``nid`` was met before (a hard link). Whiteout stubs (character
        devices with device number 0) are skipped; ``filters`` keeps only
        those root-level names. Each inode yielded has had its header and
        xattr body charged to the budget. ``top`` starts the walk at another
        inode than the root (which may then be of any type).
        """
        root = self.inode(self.root_nid if top is None else top)
        if root.ftype != _S_IFDIR:
            if top is None:
                raise ImageFormatError("the root inode is not a directory")
            self._spend(root.isize + root.xattr_size)
            yield 0, b"", root.nid, root
            return
        self._spend(root.isize + root.xattr_size)
        yield 0, b"", root.nid, root
        seen: set[int] = {root.nid}
        dirs: set[int] = {root.nid}
        stubs: set[int] = set()
        inode = self.inode
        spend = self._spend
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
                spend(ino.isize + ino.xattr_size)
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

    def _children(self, ino: InodeView, filters: Collection[bytes] | None) -> list[tuple[bytes, int]]:
        entries = self.dir_entries(ino)
        if filters is not None:
            entries = [entry for entry in entries if entry[0] in filters]
        return entries
