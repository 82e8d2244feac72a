"""What a scan would see of a tree, from the ``lstat`` of every entry, on two cores when it can.

A store build first walks the source with ``lstat`` alone: that walk is
what tells an unchanged tree (or a few changed entries) from the rest, so
its time is most of what an unchanged rebuild costs.  On a Linux machine
most of it is the kernel's ``lstat``, one call per entry.

When the process is single-threaded and may run on two CPUs, the walk
forks one helper.  Both traverse every directory (listing names is cheap:
``getdents`` gives the type), and each ``lstat``-s the entries of the
directories it owns, chosen by a hash of the directory's path so that the
two agree on ownership without talking (:mod:`.forked` runs the helper).
The parts must fit: every directory entry has exactly one listing, taken
of the same inode (device and number), and the root is the one opened
first.  Two traversals that saw different trees (a directory made,
removed or replaced meanwhile) do not fit, and the walk reports that as
it reports any tree it cannot vouch for: with None.

Each listing travels and is kept as one bytes object, its entries sorted
by name, each the name, a NUL and the entry's key: an unchanged rebuild
needs no more than the fingerprint, which is hashed from these directly,
and the keys by path and the (name, key) pairs are unpacked only for a
build that reads the tree.

The fingerprint identifies the tree for the digest cache: a hash of the
options and of every directory's path and listing.  Two walks with the
same fingerprint saw the same tree, provided no entry changed within the
cache's settling time before the walk (its ctime says so); if one did,
the fingerprint is None.  Everything a scan takes from an entry is in its
key or changes its ctime (content, xattrs), so the same fingerprint means
the same scan.  The walk imports nothing of the scan: a build that finds
its tree unchanged never loads the scanner or the writer.
"""

from __future__ import annotations

import hashlib
import os
import stat
import sys
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property

from aptlayer.composefs.digestcache import KEY_SIZE, Key, key_of
from aptlayer.linux import forked

#: largest regular file whose content is inlined in the image
INLINE_MAX = 64
NAME_MAX = 255
REPRESENTABLE = frozenset(
    {stat.S_IFREG, stat.S_IFDIR, stat.S_IFLNK, stat.S_IFCHR, stat.S_IFBLK, stat.S_IFIFO, stat.S_IFSOCK}
)
OPEN_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
#: how a scan opens a file to read it (a FIFO swapped in must not block it)
OPEN_FILE = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
#: how os.fsencode encodes (scandir on an fd yields str names)
FS_ENCODING = sys.getfilesystemencoding()
FS_ERRORS = sys.getfilesystemencodeerrors()


@dataclass
class ScanStats:
    #: nodes in the tree, the root included
    entries: int = 0
    #: regular files and their total size
    files: int = 0
    bytes: int = 0
    #: regular files over INLINE_MAX bytes (backed by an object)
    external: int = 0
    #: with a store, when the scan ends: distinct objects this scan wrote into it,
    #: and the other external files (already there, or the same content again)
    objects_created: int = 0
    objects_deduped: int = 0
    #: before the scan proper: bytes hashed ahead so far, of how many (see :mod:`.prehash`)
    hashed_ahead: int = 0
    hash_ahead: int = 0


@dataclass(frozen=True)
class ScanOptions:
    """What a scan is asked to take; its ``repr`` is part of the fingerprint."""

    use_epoch: bool = False
    skip_xattrs: bool = False
    user_xattrs: bool = False
    skip_devices: bool = False


class TreeWalk:
    """What an ``lstat`` walk of a tree saw (see :func:`walk`)."""

    def __init__(self, options: bytes, root: Key, part: _Result) -> None:
        blobs, hashed, counts, _, _, unsettled, skipped = part
        #: the options the walk was taken under (part of the fingerprint)
        self.options = options
        #: entries, files, bytes and external files, as a scan would count them
        self.stats = ScanStats(counts[0] + 1, *counts[1:])
        self._root = root
        self._blobs: dict[bytes, bytes] = blobs
        self._unsettled: list[bytes] = unsettled
        self._skipped: list[bytes] = skipped
        #: identifies the tree (see the module docstring); None if some entry had not settled
        self.fingerprint: bytes | None = None
        if root and not unsettled:
            h = hashlib.sha256(options + b"\0" + root)
            h.update(b"".join([base + b"\0" + len(blob).to_bytes(8, "little") + blob
                               for base, blob in sorted(hashed.items())]))
            self.fingerprint = h.digest()

    def listing(self, base: bytes) -> list[tuple[bytes, Key]] | None:
        """A directory's complete listing, by its path with a trailing slash, as (name, key)
        pairs sorted by name; None for a path that is no directory of the tree."""
        blob = self._blobs.get(base)
        return None if blob is None else _unpack(blob)

    @property
    def state(self) -> tuple[Key, dict[bytes, bytes], list[bytes], list[bytes]]:
        """What :meth:`changed_since` compares a later walk with: plain data, for ``marshal``."""
        return self._root, self._blobs, self._unsettled, self._skipped

    def changed_since(self, state: object) -> list[bytes] | None:
        """The paths whose entry differs from the one an earlier walk saw (``state``), or had
        not settled in either walk, sorted; None if a path came or went, or ``state`` is no
        walk's.  Directories whose listing is byte for byte the same are not unpacked."""
        try:
            root, blobs, unsettled, _ = state  # type: ignore[misc]
            if not isinstance(root, bytes) or blobs.keys() != self._blobs.keys():
                return None
            changed = set(self._unsettled).union(unsettled)
            if root != self._root or not root or not self._root:
                changed.add(b"/")
            for base, blob in self._blobs.items():
                was = blobs[base]
                if was == blob:
                    continue
                now, then = _unpack(blob), _unpack(was)
                if [name for name, _ in now] != [name for name, _ in then]:
                    return None
                changed.update(base + name for (name, key), (_, old) in zip(now, then) if key != old)
        except (TypeError, ValueError, AttributeError, KeyError):
            return None
        return sorted(changed.difference(self._skipped))  # device nodes a scan skips are no entries

    def entries(self) -> Iterator[tuple[bytes, Key]]:
        """Every entry below the root as (path, key), from the listings: device nodes a scan
        skips included, and entries that had not settled with their key all the same."""
        for base, blob in self._blobs.items():
            for name, key in _unpack(blob):
                yield base + name, key

    @cached_property
    def keys(self) -> dict[bytes, Key]:
        """Every entry's key by path (``/``, ``/a/b``); b"" for one that had not settled
        (its key does not vouch for its content).  Device nodes a scan skips have none."""
        keys = {b"/": self._root}
        keys.update(self.entries())
        for path in self._skipped:
            del keys[path]
        for path in self._unsettled:
            keys[path] = b""
        return keys


def _unpack(blob: bytes) -> list[tuple[bytes, Key]]:
    """A listing's (name, key) pairs from its bytes."""
    out = []
    pos, end = 0, len(blob)
    find = blob.index
    while pos < end:
        nul = find(b"\0", pos)
        out.append((blob[pos:nul], blob[nul + 1:nul + 1 + KEY_SIZE]))
        pos = nul + 1 + KEY_SIZE
    return out


def walk(
    source: str | bytes | os.PathLike,
    settled_before_ns: int,
    *,
    use_epoch: bool = False,
    skip_xattrs: bool = False,
    user_xattrs: bool = False,
    skip_devices: bool = False,
) -> TreeWalk | None:
    """Walk ``source`` with ``lstat`` alone: its fingerprint, keys, listings and counts.

    ``settled_before_ns`` is the cache's settling limit: an entry whose ctime
    is not before it makes the fingerprint None (and its key b"").  The
    options are a scan's (:class:`ScanOptions`).  The result is None for
    anything a scan would stop at (an unreadable directory, a name longer
    than NAME_MAX, a file type composefs cannot hold, a directory replaced
    while walked): the scan reports those.  With ``skip_devices``, device
    nodes are listed but get no key and are not counted.  Directories are
    opened relative to their parent with ``O_NOFOLLOW``; at most one fd per
    level is open.
    """
    opts = ScanOptions(use_epoch, skip_xattrs, user_xattrs, skip_devices)
    try:
        root_fd = os.open(os.fsencode(source), OPEN_DIR)
    except OSError:
        return None
    try:
        root = os.fstat(root_fd)
        if forked.helper_allowed():
            part = _walk_split(root_fd, settled_before_ns, skip_devices)
        else:
            part = _Part(root_fd, 0, 1, settled_before_ns, skip_devices).walk()
    finally:
        os.close(root_fd)
    if part is None:
        return None
    expected, opened = part[3], part[4]
    expected[b"/"] = (root.st_dev, root.st_ino)
    if expected != opened:  # a directory no part listed, or not the one its parent's listing named
        return None
    root_key = key_of(root) if root.st_ctime_ns < settled_before_ns else b""
    return TreeWalk(repr(opts).encode(), root_key, part)


#: one process's part: the listings of its directories (bytes, see the module
#: docstring) and those the fingerprint hashes (the same but where device nodes
#: were skipped); counts (entries, files, bytes, external); the (dev, ino) each
#: directory's parent listing gave it, and the (dev, ino) of each directory as
#: opened and listed; the paths not settled; the device nodes skipped
_Result = tuple[dict, dict, list, dict, dict, list, list]


def _walk_split(root_fd: int, settled_before_ns: int, skip_devices: bool) -> _Result | None:
    """Walk with a forked helper; the two parts merged, or None if either failed."""

    def theirs() -> _Result | None:
        # its own open file description: a shared one would share the listing position
        fd = os.open(".", OPEN_DIR, dir_fd=root_fd)
        return _Part(fd, 1, 2, settled_before_ns, skip_devices).walk()

    mine, helped = forked.split(theirs, _Part(root_fd, 0, 2, settled_before_ns, skip_devices).walk, keep=(root_fd,))
    return None if mine is None or helped is None else _merge(mine, helped)


def _merge(a: _Result, b: _Result) -> _Result:
    """Two parts as one (their dicts have no key in common: every directory has one owner)."""
    blobs, hashed, counts, expected, opened, unsettled, skipped = a
    blobs.update(b[0])
    hashed.update(b[1])
    expected.update(b[3])
    opened.update(b[4])
    return blobs, hashed, [x + y for x, y in zip(counts, b[2])], expected, opened, unsettled + b[5], skipped + b[6]


class _Part:
    """One process's share of the walk: it lists every directory and ``lstat``-s those it owns."""

    def __init__(self, root_fd: int, me: int, parts: int, limit: int, skip_devices: bool) -> None:
        self.root_fd = root_fd
        self.me = me
        self.parts = parts
        self.limit = limit
        self.skip_devices = skip_devices
        self.blobs: dict[bytes, bytes] = {}
        self.hashed: dict[bytes, bytes] = {}
        self.counts = [0, 0, 0, 0]
        self.expected: dict[bytes, tuple[int, int]] = {}
        self.opened: dict[bytes, tuple[int, int]] = {}
        self.unsettled: list[bytes] = []
        self.skipped: list[bytes] = []

    def walk(self) -> _Result | None:
        #: (fd, path with a trailing slash, subdirectory names still to walk)
        stack: list[tuple[int, bytes, list[bytes]]] = []
        try:
            sub = self._list(self.root_fd, b"/")
            if sub is None:
                return None
            stack.append((-1, b"/", sub))
            while stack:
                fd, base, todo = stack[-1]
                if not todo:
                    if fd >= 0:
                        os.close(fd)
                    stack.pop()
                    continue
                name = todo.pop()
                try:
                    cfd = os.open(name, OPEN_DIR, dir_fd=fd if fd >= 0 else self.root_fd)
                except OSError:
                    return None
                path = base + name + b"/"
                stack.append((cfd, path, []))
                sub = self._list(cfd, path)
                if sub is None:
                    return None
                stack[-1][2].extend(sub)
        finally:
            for fd, _, _ in stack:
                if fd >= 0:
                    os.close(fd)
        return (self.blobs, self.hashed, self.counts, self.expected, self.opened,
                self.unsettled, self.skipped)

    def _list(self, fd: int, base: bytes) -> list[bytes] | None:
        """List a directory, ``lstat``-ing it if it is ours; its subdirectory names, or None."""
        if zlib.crc32(base) % self.parts != self.me:
            try:
                with os.scandir(fd) as it:
                    return [e.name.encode(FS_ENCODING, FS_ERRORS) for e in it if e.is_dir(follow_symlinks=False)]
            except OSError:
                return None
        # The hot loop: one lstat per entry and as little Python around it as will do.
        subdirs = []
        items = []
        skipped = []
        expected = self.expected
        limit = self.limit
        entries = files = size = external = 0
        try:
            with os.scandir(fd) as it:
                for entry in it:
                    name = entry.name.encode(FS_ENCODING, FS_ERRORS)
                    if len(name) > NAME_MAX:
                        return None
                    st = entry.stat(follow_symlinks=False)
                    item = name + b"\0" + key_of(st)
                    items.append(item)
                    kind = stat.S_IFMT(st.st_mode)
                    if kind == stat.S_IFREG:
                        files += 1
                        size += st.st_size
                        if st.st_size > INLINE_MAX:
                            external += 1
                    elif kind == stat.S_IFDIR:
                        subdirs.append(name)
                        expected[base + name + b"/"] = (st.st_dev, st.st_ino)
                    elif kind not in REPRESENTABLE:
                        return None
                    elif self.skip_devices and kind in (stat.S_IFCHR, stat.S_IFBLK):
                        skipped.append(item)
                        continue
                    entries += 1
                    if st.st_ctime_ns >= limit:
                        self.unsettled.append(base + name)
            here = os.fstat(fd)
        except OSError:
            return None
        self.opened[base] = (here.st_dev, here.st_ino)
        items.sort()  # by name: a NUL ends each name, and sorts before any byte of a longer one
        self.blobs[base] = self.hashed[base] = b"".join(items)
        if skipped:
            self.hashed[base] = b"".join([i for i in items if i not in skipped])
            self.skipped += [base + i[:i.index(b"\0")] for i in skipped]
        counts = self.counts
        counts[0] += entries
        counts[1] += files
        counts[2] += size
        counts[3] += external
        return subdirs
