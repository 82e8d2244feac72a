"""A cache of what a scan read from each source entry, so an unchanged one is not read again.

Keyed by what ``lstat`` says of the entry: device, inode, mode, uid, gid,
nlink, rdev, size, mtime and ctime (seconds and nanoseconds: a time past
2262 does not fit in 64 bits of nanoseconds, and ext4 stores times to
2446).  Any write to a file, and any chmod, chown, rename, link or xattr
change, moves its ctime, and no user can set a ctime back, so the same key
means the same content.  An entry holds
what the scanner would otherwise read: the fs-verity digest of an external
file, the xattrs, and a symlink's target or a small file's inline content.

Two limits of that rule are handled here:

* timestamps come from a coarse clock, so a file changed twice within one
  tick keeps its ctime: an entry whose ctime is within ``settle_ns`` of the
  moment the cache was loaded (before the scan read anything) is not saved
  (git's "racy clean" rule); it is only kept in memory, so that a second
  read in the same build (a render after a refused patch) can take it;
* the cache says nothing about the digest store: the scanner still checks
  that a hit's object is there, and imports the file again (reading and
  hashing it) when it is not.

Beside it, :class:`TreeResults` remembers what recent whole trees gave: a
walk fingerprints every key it saw (see :mod:`.lstatwalk`), and a caller may
:meth:`~TreeResults.remember` what it made of that tree (an image digest)
to :meth:`~TreeResults.recall` it when the same fingerprint comes back.
What a recalled result names must still be checked by the caller; the file
only says which result to check.  It is small and separate, so that a
caller can ask it before loading the entries.  :class:`LastBuilds` keeps,
per set of options, what the walk of the last tree built saw and the image
it gave, so that the next build can tell which few entries changed.

The files (``cache/digests``, ``cache/trees``, ``cache/last`` in the store root) are a
magic line, a ``marshal`` blob and a SHA-256 of both.  A file that is
missing, truncated or fails its checksum is ignored: the cache starts empty
and is rewritten.  It is replaced atomically (temp file, rename), and the
entries file holds only the entries the last scan saw; neither is fsynced,
since losing them costs time, never correctness (a torn file fails its
checksum).
"""

from __future__ import annotations

import hashlib
import marshal
import os
import struct
import time
from typing import NamedTuple

from aptlayer.composefs.fsverity import RawDigest
from aptlayer.linux import fsops

MAGIC = b"apt-layer entry cache 3\n"
TREES_MAGIC = b"apt-layer tree results 2\n"
LAST_MAGIC = b"apt-layer last builds 3\n"
_KEY = struct.Struct("<QQIIIQQQqIqI")
#: the length of every key
KEY_SIZE = _KEY.size
#: entries changed this recently (ns) before the cache was loaded are not saved
SETTLE_NS = 2_000_000_000
#: tree results kept (the most recently remembered)
MAX_TREES = 32
#: option sets whose last build is kept
MAX_SCOPES = 4

Key = bytes


#: What a scan read from one source entry, as a plain tuple (it is stored with marshal):
#: (fs-verity digest of an external regular file or None,
#:  sorted (name, value) xattr pairs or None if the scan did not read them,
#:  a symlink's target or a small regular file's content, or None)
Entry = tuple[RawDigest | None, tuple[tuple[bytes, bytes], ...] | None, bytes | None]


class Lstat(NamedTuple):
    """The part of an ``os.stat_result`` a key holds, under the same names."""

    st_dev: int
    st_ino: int
    st_mode: int
    st_uid: int
    st_gid: int
    st_nlink: int
    st_rdev: int
    st_size: int
    st_mtime_ns: int
    st_ctime_ns: int


def key_of(st: os.stat_result | Lstat) -> Key:
    """The cache key of an entry's ``lstat`` result: everything a scan takes from it."""
    mtime, mtime_ns = divmod(st.st_mtime_ns, 1_000_000_000)
    ctime, ctime_ns = divmod(st.st_ctime_ns, 1_000_000_000)
    return _KEY.pack(st.st_dev, st.st_ino, st.st_mode, st.st_uid, st.st_gid, st.st_nlink,
                     st.st_rdev, st.st_size, mtime, mtime_ns, ctime, ctime_ns)


_MODE_AND_SIZE = struct.Struct("<16xI24xQ24x")


def mode_and_size(key: Key) -> tuple[int, int]:
    """The mode and size a key holds (cheaper than :func:`lstat_of` when nothing else is wanted)."""
    return _MODE_AND_SIZE.unpack(key)


def lstat_of(key: Key) -> Lstat:
    """The ``lstat`` result a key was made of (:func:`key_of` undone)."""
    *head, mtime, mtime_ns, ctime, ctime_ns = _KEY.unpack(key)
    return Lstat(*head, mtime * 1_000_000_000 + mtime_ns, ctime * 1_000_000_000 + ctime_ns)


class _CacheFile:
    """What both files share: where they are, and the clock that says what has settled."""

    def __init__(self, path: str | os.PathLike[str], settle_ns: int) -> None:
        self.path = os.fspath(path)
        #: the load time less ``settle_ns``: ctimes from then on are too fresh to trust
        self.settled_before_ns = time.time_ns() - settle_ns

    def settled(self, st: os.stat_result) -> bool:
        """Whether the entry last changed long enough before the load to be trusted later."""
        return st.st_ctime_ns < self.settled_before_ns


class DigestCache(_CacheFile):
    """Entries by file identity: :meth:`get` during a scan, :meth:`put` what was read, then :meth:`save`.

    Safe to share between a scan's threads (each call is one dict operation).
    """

    def __init__(self, path: str | os.PathLike[str], *, settle_ns: int = SETTLE_NS) -> None:
        super().__init__(path, settle_ns)
        self._old = _read(self.path, MAGIC)
        self._new: dict[Key, Entry] = {}
        #: entries read since the load that had not settled: for this process only
        self._fresh: dict[Key, Entry] = {}

    def __len__(self) -> int:
        return len(self._old)

    def get(self, key: Key) -> Entry | None:
        """The entry recorded for this exact key, or None; a hit on the file is kept for the next save."""
        entry = self._old.get(key)
        if entry is not None:
            self._new[key] = entry
            return entry
        return self._fresh.get(key)

    def put(self, st: os.stat_result, entry: Entry) -> None:
        """Record what was read from an entry whose ``lstat`` (or ``fstat``) was ``st``.

        Saved only if it has settled; until then it is known to this object alone.
        """
        if self.settled(st):
            self._new[key_of(st)] = entry
        else:
            self._fresh[key_of(st)] = entry

    def save(self) -> None:
        """Replace the file with the entries seen since the load (unless they are the same)."""
        if self._new == self._old:
            return
        _write(self.path, MAGIC, self._new)
        self._old = dict(self._new)


class _Recent(_CacheFile):
    """A small dict file of the most recent values by key: :meth:`_get`, :meth:`_put`, :meth:`save`."""

    MAGIC: bytes
    #: values kept; putting one more drops the oldest
    LIMIT: int

    def __init__(self, path: str | os.PathLike[str], *, settle_ns: int = SETTLE_NS) -> None:
        super().__init__(path, settle_ns)
        self._values: dict[bytes, object] = _read(self.path, self.MAGIC)
        self._changed = False

    def _get(self, key: bytes) -> object | None:
        return self._values.get(key)

    def _put(self, key: bytes, value: object) -> None:
        if self._values.get(key) == value:
            return
        self._values.pop(key, None)
        self._values[key] = value
        while len(self._values) > self.LIMIT:
            del self._values[next(iter(self._values))]
        self._changed = True

    def save(self) -> None:
        if self._changed:
            _write(self.path, self.MAGIC, self._values)
            self._changed = False


class TreeResults(_Recent):
    """Image digests by tree fingerprint: :meth:`recall`, :meth:`remember`, then :meth:`save`.

    ``settled_before_ns`` is the limit to take a fingerprint with.
    """

    MAGIC = TREES_MAGIC
    LIMIT = MAX_TREES

    def recall(self, fingerprint: bytes) -> RawDigest | None:
        """The image digest remembered for a tree fingerprint, or None."""
        value = self._get(fingerprint)
        return value if isinstance(value, bytes) and len(value) == 32 else None

    def remember(self, fingerprint: bytes, digest: RawDigest) -> None:
        """Keep the image ``digest`` the tree ``fingerprint`` gave; the oldest of MAX_TREES is dropped."""
        self._put(fingerprint, digest)


class LastBuilds(_Recent):
    """Per set of options, the last tree built: what its walk saw, and the image it gave.

    The walk's state (:attr:`.lstatwalk.TreeWalk.state`: the listings and
    which entries had not settled) is kept as the walk gives it; a caller
    that finds a few entries changed since can read just those and patch
    that image (:mod:`.patch`).  Kept apart from :class:`TreeResults`
    because it holds every listing, and an unchanged tree never needs it.
    """

    MAGIC = LAST_MAGIC
    LIMIT = MAX_SCOPES

    def get(self, scope: bytes) -> tuple[RawDigest, object] | None:
        """(image digest, walk state) of the last build under ``scope``, or None."""
        value = self._get(scope)
        if isinstance(value, tuple) and len(value) == 2 and isinstance(value[0], bytes) and len(value[0]) == 32:
            return value
        return None

    def put(self, scope: bytes, digest: RawDigest, state: object) -> None:
        """Record a build; the oldest of MAX_SCOPES scopes is dropped."""
        self._put(scope, (digest, state))


def _write(path: str, magic: bytes, value: dict) -> None:
    """Replace ``path`` atomically with ``value`` (not fsynced: see the module docstring)."""
    try:
        fsops.mkdir(os.path.dirname(path), 0o755)
    except FileExistsError:
        pass
    body = magic + marshal.dumps(value)
    body += hashlib.sha256(body).digest()
    tmp = f"{path}.tmp-{os.getpid()}-{os.urandom(4).hex()}"
    fd = fsops.create(tmp, 0o644)
    try:
        view = memoryview(body)
        done = 0
        while done < len(view):
            done += fsops.write(fd, view[done:], done)
    except BaseException:
        os.close(fd)
        fsops.unlink(tmp)
        raise
    os.close(fd)
    fsops.rename(tmp, path)


def _read(path: str, magic: bytes) -> dict:
    """The dict a file holds; empty if it is missing or damaged in any way.

    The checksum is verified before ``marshal`` sees a byte, so only a file
    this module wrote completely is decoded.
    """
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError:
        return {}
    end = len(data) - hashlib.sha256().digest_size
    if end < len(magic) or not data.startswith(magic):
        return {}
    if hashlib.sha256(memoryview(data)[:end]).digest() != data[end:]:
        return {}
    try:
        value = marshal.loads(memoryview(data)[len(magic) : end])
    except (ValueError, TypeError, EOFError):
        return {}
    return value if isinstance(value, dict) else {}
