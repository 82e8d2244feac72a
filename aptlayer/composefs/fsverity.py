"""fs-verity digests computed in user space, and the digest store's object names.

composefs names every backing object by its fs-verity digest with fixed
parameters: SHA-256, 4096-byte Merkle blocks, no salt.  The Merkle tree hashes
each zero-padded 4096-byte block of the data (level 0), then hashes the
concatenated 32-byte hashes the same way, level after level, until one block
remains; its hash is the root.  The digest is SHA-256 of a 256-byte descriptor
that holds the data size and the root hash (see ``_descriptor``).

Raw digests are ``bytes`` (32 bytes) and hex digests ``str``, kept apart by the
``RawDigest`` / ``HexDigest`` aliases.

Empty data has no tree, so its root hash is all zeros: this is what the
kernel, fsverity-utils and composefs-rs report.  composefs C up to 1.0.8
hashed one zero block instead when it computed the digest itself, so
``composefs-info measure-file`` of an empty file without verity printed a
different value than the same file with verity enabled.  The functions here
use the kernel's value; ``legacy_empty=True`` reproduces the old C output for
callers that must print it.

The kernel's ioctls live in ``aptlayer.linux.verity``; ``measure_file``
asks the kernel first and computes when it cannot answer.
"""

from __future__ import annotations

import hashlib
import os
import re
import struct
import threading
from typing import BinaryIO, TypeAlias

from aptlayer.linux import verity

RawDigest: TypeAlias = bytes
HexDigest: TypeAlias = str

BLOCK_SIZE = 4096
DIGEST_SIZE = 32
_LOG_BLOCK_SIZE = 12
_HASHES_PER_BLOCK = BLOCK_SIZE // DIGEST_SIZE
#: bytes hashed per read when digesting a stream (a multiple of BLOCK_SIZE)
READ_SIZE = 1 << 20


_local = threading.local()


def _read_buffer() -> memoryview:
    """This thread's READ_SIZE buffer: allocating 1 MiB per file cost more than hashing a small one."""
    buf = getattr(_local, "buf", None)
    if buf is None:
        buf = _local.buf = memoryview(bytearray(READ_SIZE))
    return buf


def _descriptor(size: int, root: bytes) -> bytes:
    """The 256-byte fsverity_descriptor whose SHA-256 is the digest."""
    return struct.pack(
        "<BBBBIQ64s32s144x", 1, verity.HASH_ALG_SHA256, _LOG_BLOCK_SIZE, 0, 0, size, root, b""
    )


def _hash_blocks(data: memoryview) -> bytes:
    """Concatenated SHA-256 of each block of ``data``, the last one zero-padded."""
    sha = hashlib.sha256
    whole = len(data) - len(data) % BLOCK_SIZE
    out = b"".join([sha(data[i : i + BLOCK_SIZE]).digest() for i in range(0, whole, BLOCK_SIZE)])
    if whole < len(data):
        out += sha(bytes(data[whole:]).ljust(BLOCK_SIZE, b"\0")).digest()
    return out


class VerityHasher:
    """Incremental fs-verity digest: ``update()`` with the data, then ``digest()``.

    Only the level-0 hashes are kept in memory (32 bytes per 4 KiB of data,
    8 MiB per GiB); the upper levels are built at the end.
    """

    def __init__(self, *, legacy_empty: bool = False) -> None:
        self._level0 = bytearray()
        self._pending = bytearray()
        self._size = 0
        self._legacy_empty = legacy_empty

    @property
    def size(self) -> int:
        return self._size

    def update(self, data: bytes | bytearray | memoryview) -> None:
        mv = memoryview(data).cast("B")
        self._size += len(mv)
        if self._pending:
            take = min(BLOCK_SIZE - len(self._pending), len(mv))
            self._pending += mv[:take]
            mv = mv[take:]
            if len(self._pending) < BLOCK_SIZE:
                return
            self._level0 += hashlib.sha256(self._pending).digest()
            self._pending.clear()
        whole = len(mv) - len(mv) % BLOCK_SIZE
        if whole:
            self._level0 += _hash_blocks(mv[:whole])
        if whole < len(mv):
            self._pending += mv[whole:]

    def digest(self) -> RawDigest:
        level = bytes(self._level0)
        if self._pending:
            level += _hash_blocks(memoryview(self._pending))
        if not level:
            if self._legacy_empty:
                level = hashlib.sha256(bytes(BLOCK_SIZE)).digest()
            else:
                return hashlib.sha256(_descriptor(0, b"")).digest()
        while len(level) > DIGEST_SIZE:
            level = _hash_blocks(memoryview(level))
        return hashlib.sha256(_descriptor(self._size, level)).digest()

    def hexdigest(self) -> HexDigest:
        return self.digest().hex()


def digest_bytes(data: bytes | bytearray | memoryview, *, legacy_empty: bool = False) -> RawDigest:
    """fs-verity digest of in-memory data."""
    h = VerityHasher(legacy_empty=legacy_empty)
    h.update(data)
    return h.digest()


def digest_stream(f: BinaryIO, *, legacy_empty: bool = False) -> RawDigest:
    """fs-verity digest of everything left to read in a binary stream."""
    h = VerityHasher(legacy_empty=legacy_empty)
    buf = bytearray(READ_SIZE)
    mv = memoryview(buf)
    while n := f.readinto(mv):  # type: ignore[attr-defined]
        h.update(mv[:n])
    return h.digest()


def digest_fd(fd: int, size: int | None = None, *, legacy_empty: bool = False) -> RawDigest:
    """fs-verity digest of an open file, read with ``pread`` from offset 0.

    ``size`` (e.g. from an earlier ``fstat``) bounds the read; the file must
    then hold at least that many bytes, or ``ValueError`` is raised, so a
    file truncated while it is hashed cannot pass for its old self.  The file
    offset is not used or changed, so the fd can be shared with a copy.
    """
    h = VerityHasher(legacy_empty=legacy_empty)
    mv = _read_buffer()
    pos = 0
    while size is None or pos < size:
        want = READ_SIZE if size is None else min(READ_SIZE, size - pos)
        n = os.preadv(fd, [mv[:want]], pos)
        if n == 0:
            break
        h.update(mv[:n])
        pos += n
    if size is not None and pos != size:
        raise ValueError(f"file shrank while hashing: {pos} of {size} bytes")
    return h.digest()


def digest_file(path: str | bytes | os.PathLike, *, legacy_empty: bool = False) -> RawDigest:
    """fs-verity digest of a file's content, computed in user space."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return digest_fd(fd, legacy_empty=legacy_empty)
    finally:
        os.close(fd)


def measure_file(path: str | bytes | os.PathLike, *, legacy_empty: bool = False) -> RawDigest:
    """Digest of a file as ``composefs-info measure-file`` gives it.

    The kernel's value when the file has fs-verity, else computed.
    ``legacy_empty`` only changes the computed value of an empty file (see
    the module docstring); the kernel's value is never altered.
    """
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        got = verity.measure(fd)
        return got if got is not None else digest_fd(fd, legacy_empty=legacy_empty)
    finally:
        os.close(fd)


def object_path(digest: RawDigest) -> str:
    """The digest store path of an object: ``xx/yyyy...`` (2 + 62 hex digits)."""
    if len(digest) != DIGEST_SIZE:
        raise ValueError(f"fs-verity digest must be {DIGEST_SIZE} bytes, got {len(digest)}")
    h = digest.hex()
    return f"{h[:2]}/{h[2:]}"


_OBJECT_PATH = re.compile(r"[0-9a-f]{2}/[0-9a-f]{62}")
#: what :func:`is_object_path` accepts, for error messages
OBJECT_PATH_RULE = "an object path is 2 lowercase hex digits, '/', then 62 lowercase hex digits"


def is_object_path(name: str) -> bool:
    """Whether ``name`` is of the form :func:`object_path` gives (``xx/yyyy...``).

    Nothing else names an object of a digest store: an absolute path or one
    with ``..``, joined onto the store, would name a file outside it.
    """
    return _OBJECT_PATH.fullmatch(name) is not None
