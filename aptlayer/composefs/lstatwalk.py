"""What a scan would see of a tree, from the ``lstat`` of every entry, on two cores when it can.

A store build first walks the source with ``lstat`` alone: that walk is
what tells an unchanged tree (or a few changed entries) from the rest, so
its time is most of what an unchanged rebuild costs.  On a Linux machine
most of it is the kernel's ``lstat``, one call per entry.

When the process is single-threaded and may run on two CPUs, the walk
forks one helper.  Both traverse every directory (listing names is cheap:
``getdents`` gives the type), and each ``lstat``-s the entries of the
directories it owns, chosen by a hash of the directory's path so that the
two agree on ownership without talking.  The helper sends its part back
as ``marshal`` data.  The parts must fit: every directory entry has
exactly one listing, taken of the same inode (device and number), and the
root is the one opened first.  Two traversals that saw different trees (a
directory made, removed or replaced meanwhile) do not fit, and the walk
reports that as it reports any tree it cannot vouch for: with None.

Only ``os``, ``marshal`` and ``zlib`` run in the helper, which ends with
``os._exit`` whatever happens, so it never runs the parent's cleanups.

:func:`walk` turns the walk into what the Store decides with: the tree's
fingerprint (the value a scan with a digest cache gives, see :mod:`.scan`),
every entry's key, the listings a scan can take instead of listing again,
and the scan's counts.  It imports nothing of the scan, so a build that
finds its tree unchanged never loads the scanner or the writer.
"""

from __future__ import annotations

import hashlib
import marshal
import os
import signal
import stat
import sys
import threading
import zlib
from dataclasses import dataclass
from typing import NamedTuple

from aptlayer.composefs.digestcache import Key, key_of

#: largest regular file whose content is inlined in the image
INLINE_MAX = 64
NAME_MAX = 255
REPRESENTABLE = frozenset(
    {stat.S_IFREG, stat.S_IFDIR, stat.S_IFLNK, stat.S_IFCHR, stat.S_IFBLK, stat.S_IFIFO, stat.S_IFSOCK}
)
OPEN_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
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


@dataclass(frozen=True)
class ScanOptions:
    """What a scan is asked to take; its ``repr`` is part of the fingerprint."""

    use_epoch: bool = False
    skip_xattrs: bool = False
    user_xattrs: bool = False
    skip_devices: bool = False


class Counts(NamedTuple):
    """Entries (the root included), regular files, their bytes, and those over INLINE_MAX bytes."""

    entries: int
    files: int
    bytes: int
    external: int


class LstatTree(NamedTuple):
    """What the walk saw."""

    #: every entry's key by path (``/``, ``/a/b``); b"" where its ctime is not
    #: before the settling limit (the key does not vouch for the content)
    keys: dict[bytes, Key]
    #: every directory's complete listing by path with a trailing slash, as
    #: (name, key) pairs in the order the directory gave them
    listings: dict[bytes, list[tuple[bytes, Key]]]
    counts: Counts


class TreeWalk(NamedTuple):
    """What an ``lstat`` walk of a tree saw (see :func:`walk`)."""

    #: the fingerprint :func:`.scan.scan` would give: None if some entry had not settled
    fingerprint: bytes | None
    #: every entry's cache key by path (``/``, ``/a/b``); b"" for an entry that
    #: had not settled: its key does not vouch for its content
    keys: dict[bytes, Key]
    #: complete directory listings by path with a trailing slash, as
    #: (name, key) pairs, for :func:`.scan.scan` and :func:`.scan.scan_entries`
    listings: dict[bytes, list[tuple[bytes, Key]]]
    #: entries, files, bytes and external files, as a scan would count them
    stats: ScanStats
    #: the options the keys were taken under (part of the fingerprint)
    options: bytes


def walk(
    source: str | bytes | os.PathLike,
    settled_before_ns: int,
    *,
    use_epoch: bool = False,
    skip_xattrs: bool = False,
    user_xattrs: bool = False,
    skip_devices: bool = False,
) -> TreeWalk | None:
    """Walk ``source`` with ``lstat`` alone: the fingerprint :func:`.scan.scan` would give, and more.

    ``settled_before_ns`` is the cache's settling limit: an entry whose ctime
    is not before it makes the fingerprint None (and its key b"").  The
    result is None for anything the scan would stop at (an unreadable
    directory, a name too long, a file type composefs cannot hold, a
    directory replaced while walked): the scan reports those.  Directories
    are opened relative to their parent with ``O_NOFOLLOW`` and checked
    against their listing, as in the scan; at most one fd per level is open.
    """
    opts = ScanOptions(use_epoch, skip_xattrs, user_xattrs, skip_devices)
    tree = lstat_tree(os.fsencode(source), settled_before_ns, skip_devices)
    if tree is None:
        return None
    options = repr(opts).encode()
    return TreeWalk(fingerprint_of(options, tree.keys), tree.keys, tree.listings, ScanStats(*tree.counts), options)


def fingerprint(source: str | bytes | os.PathLike, settled_before_ns: int, **options: bool) -> bytes | None:
    """The fingerprint :func:`.scan.scan` would give ``source``, from ``lstat`` alone (see :func:`walk`)."""
    walked = walk(source, settled_before_ns, **options)
    return None if walked is None else walked.fingerprint


def changed_paths(old: dict[bytes, Key], new: dict[bytes, Key]) -> list[bytes] | None:
    """The paths whose key differs between two walks' ``keys``; None if a path came or went.

    An entry whose key is b"" (not settled) counts as changed.
    """
    if len(old) != len(new):
        return None
    changed = []
    for path, key in new.items():
        was = old.get(path)
        if was is None:
            return None
        if was != key or not key:
            changed.append(path)
    return changed


def fingerprint_of(options: bytes, keys: dict[bytes, Key]) -> bytes | None:
    """The fingerprint of a tree's keys by path, or None if some entry had not settled."""
    if b"" in keys.values():
        return None
    h = hashlib.sha256(options)
    # by path: the walk order does not matter
    h.update(b"".join(sorted([path + b"\0" + key for path, key in keys.items()])))
    return h.digest()


def lstat_tree(source: bytes, settled_before_ns: int, skip_devices: bool = False) -> LstatTree | None:
    """``lstat`` every entry below ``source``; None where a scan would stop or the tree moved.

    A scan stops at an unreadable directory, a name longer than NAME_MAX, a
    file type composefs cannot hold, or a directory replaced while walked.
    With ``skip_devices``, device nodes are listed but get no key and are
    not counted.  Directories are opened relative to their parent with
    ``O_NOFOLLOW``; at most one fd per level is open.
    """
    try:
        root_fd = os.open(source, OPEN_DIR)
    except OSError:
        return None
    try:
        root = os.fstat(root_fd)
        if _helper_allowed():
            part = _walk_split(root_fd, settled_before_ns, skip_devices)
        else:
            part = _Part(root_fd, 0, 1, settled_before_ns, skip_devices).walk()
    finally:
        os.close(root_fd)
    if part is None:
        return None
    keys, listings, counts, expected, opened = part
    expected[b"/"] = (root.st_dev, root.st_ino)
    if expected != opened:  # a directory no part listed, or not the one its parent's listing named
        return None
    keys[b"/"] = key_of(root) if root.st_ctime_ns < settled_before_ns else b""
    return LstatTree(keys, listings, Counts(counts[0] + 1, *counts[1:]))


def _helper_allowed() -> bool:
    """Whether to fork: two CPUs to run on, and no other thread whose locks the child could inherit."""
    return threading.active_count() == 1 and len(os.sched_getaffinity(0)) > 1


#: one process's part: keys, listings, counts (entries, files, bytes, external),
#: the (dev, ino) each directory's parent listing gave it, and the (dev, ino)
#: of each directory as opened and listed
_Result = tuple[dict, dict, list, dict, dict]


def _walk_split(root_fd: int, settled_before_ns: int, skip_devices: bool) -> _Result | None:
    """Walk with a forked helper; the two parts merged, or None if either failed."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the helper
        status = 1
        try:
            os.close(r)
            # its own open file description: a shared one would share the listing position
            fd = os.open(".", OPEN_DIR, dir_fd=root_fd)
            data = marshal.dumps(_Part(fd, 1, 2, settled_before_ns, skip_devices).walk())
            with os.fdopen(w, "wb") as out:
                out.write(data)
            status = 0
        finally:
            os._exit(status)
    os.close(w)
    with os.fdopen(r, "rb") as pipe:
        try:
            mine = _Part(root_fd, 0, 2, settled_before_ns, skip_devices).walk()
            data = pipe.read()
            _, status = os.waitpid(pid, 0)
            pid = 0
        finally:
            if pid:  # interrupted: the helper is of no use any more
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
    theirs = marshal.loads(data) if status == 0 else None
    if mine is None or theirs is None:
        return None
    return _merge(mine, theirs)


def _merge(a: _Result, b: _Result) -> _Result:
    """Two parts as one (their dicts have no key in common: every directory has one owner)."""
    keys, listings, counts, expected, opened = a
    keys.update(b[0])
    listings.update(b[1])
    expected.update(b[3])
    opened.update(b[4])
    return keys, listings, [x + y for x, y in zip(counts, b[2])], expected, opened


class _Part:
    """One process's share of the walk: it lists every directory and ``lstat``-s those it owns."""

    def __init__(self, root_fd: int, me: int, parts: int, limit: int, skip_devices: bool) -> None:
        self.root_fd = root_fd
        self.me = me
        self.parts = parts
        self.limit = limit
        self.skip_devices = skip_devices
        self.keys: dict[bytes, Key] = {}
        self.listings: dict[bytes, list[tuple[bytes, Key]]] = {}
        self.counts = [0, 0, 0, 0]
        self.expected: dict[bytes, tuple[int, int]] = {}
        self.opened: dict[bytes, tuple[int, int]] = {}

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
                parent_fd = fd if fd >= 0 else self.root_fd
                try:
                    cfd = os.open(name, OPEN_DIR, dir_fd=parent_fd)
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
        return self.keys, self.listings, self.counts, self.expected, self.opened

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
        listing = []
        keys = self.keys
        expected = self.expected
        limit = self.limit
        entries = files = size = external = 0
        try:
            with os.scandir(fd) as it:
                for entry in it:
                    name = entry.name.encode(FS_ENCODING, FS_ERRORS)
                    st = entry.stat(follow_symlinks=False)
                    key = key_of(st)
                    listing.append((name, key))
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
                        continue
                    entries += 1
                    keys[base + name] = key if st.st_ctime_ns < limit else b""
            here = os.fstat(fd)
        except OSError:
            return None
        if any(len(name) > NAME_MAX for name, _ in listing):
            return None
        self.opened[base] = (here.st_dev, here.st_ino)
        self.listings[base] = listing
        counts = self.counts
        counts[0] += entries
        counts[1] += files
        counts[2] += size
        counts[3] += external
        return subdirs
