"""A cache of fs-verity digests, so an unchanged source file is not read again.

Keyed by what ``lstat`` says of the file: device, inode, size, mtime and
ctime (in ns).  Any write to a file, and any chmod, rename or xattr change,
moves its ctime, and no user can set a ctime back, so the same key means
the same content.  Two limits of that rule are handled here:

* timestamps come from a coarse clock, so a file changed twice within one
  tick keeps its ctime: an entry whose ctime is within ``settle_ns`` of the
  moment the cache was loaded (before the scan read anything) is not saved
  (git's "racy clean" rule);
* the cache says nothing about the digest store: the scanner still checks
  that a hit's object is there, and imports the file again (reading and
  hashing it) when it is not.

The file (``cache/digests`` in the store root) is a header, then fixed-size
records sorted by key, then a SHA-256 of everything before it.  A file that
is missing, truncated or fails its checksum is ignored: the cache starts
empty and is rewritten.  It is replaced atomically (temp file, rename) after
a successful scan and holds only the files that scan saw; it is not
fsynced, since losing it costs time, never correctness (a torn file fails
its checksum).
"""

from __future__ import annotations

import hashlib
import os
import secrets
import struct
import time

from aptlayer.composefs import fsops
from aptlayer.composefs.fsverity import DIGEST_SIZE, RawDigest

MAGIC = b"apt-layer digest cache 1\n"
_KEY = struct.Struct("<QQQqq")
_RECORD = _KEY.size + DIGEST_SIZE
#: entries changed this recently (ns) before the cache was loaded are not saved
SETTLE_NS = 2_000_000_000

Key = bytes


def key_of(st: os.stat_result) -> Key:
    """The cache key of a file's ``stat`` result."""
    return _KEY.pack(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


class DigestCache:
    """Digests by file identity; :meth:`get` during a scan, :meth:`put` what was hashed, then :meth:`save`.

    Safe to share between a scan's threads (each call is one dict operation).
    """

    def __init__(self, path: str | os.PathLike[str], *, settle_ns: int = SETTLE_NS) -> None:
        self.path = os.fspath(path)
        self.settle_ns = settle_ns
        #: time of the load: ctimes from then on (less settle_ns) are too fresh to save
        self.loaded_ns = time.time_ns()
        self._old = _read(self.path)
        self._new: dict[Key, RawDigest] = {}

    def __len__(self) -> int:
        return len(self._old)

    def get(self, st: os.stat_result) -> RawDigest | None:
        """The digest recorded for this exact file state, or None; a hit is kept for the next save."""
        key = key_of(st)
        digest = self._old.get(key)
        if digest is not None:
            self._new[key] = digest
        return digest

    def put(self, st: os.stat_result, digest: RawDigest) -> None:
        """Record the digest of the content read from a file whose ``fstat`` was ``st``."""
        if st.st_ctime_ns < self.loaded_ns - self.settle_ns:
            self._new[key_of(st)] = digest

    def save(self) -> None:
        """Replace the file with the entries seen since the load (unless they are the same)."""
        if self._new == self._old:
            return
        directory = os.path.dirname(self.path)
        try:
            fsops.mkdir(directory, 0o755)
        except FileExistsError:
            pass
        body = bytearray(MAGIC)
        body += struct.pack("<Q", len(self._new))
        for key in sorted(self._new):
            body += key
            body += self._new[key]
        body += hashlib.sha256(body).digest()
        tmp = f"{self.path}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
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
        fsops.rename(tmp, self.path)
        self._old = dict(self._new)


def _read(path: str) -> dict[Key, RawDigest]:
    """The entries of a cache file; empty if it is missing or damaged in any way."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError:
        return {}
    head = len(MAGIC) + 8
    if len(data) < head + DIGEST_SIZE or not data.startswith(MAGIC):
        return {}
    (count,) = struct.unpack_from("<Q", data, len(MAGIC))
    end = head + count * _RECORD
    if len(data) != end + DIGEST_SIZE or hashlib.sha256(memoryview(data)[:end]).digest() != data[end:]:
        return {}
    k = _KEY.size
    return {data[i : i + k]: data[i + k : i + _RECORD] for i in range(head, end, _RECORD)}
