"""The fs-verity digests a scan is about to compute, computed ahead on two cores.

Hashing is most of a scan that reads its files (a create without a digest
cache, or into an empty store): about 0.47 s of 1 s for the benchmark's
376 MB.  In one process it runs on one core, and threads cannot share it
(see :mod:`.scan`).  So before such a scan, the files it will hash (regular
files over INLINE_MAX bytes without a digest in the cache) are split by
size between this process and a forked helper (:mod:`.forked`), in batches
with progress in between, and the scan takes each digest instead of hashing.

A digest is kept under the key of the file's ``fstat`` when it was hashed,
and only if that equals the key the walk listed.  The scan uses it for a
file whose ``fstat`` has that same key when the scan opens it: a file
changed meanwhile has a new ctime, and is hashed again.  Files are opened
by their path below the source without following a symlink in the last
component; a symlink swapped in higher up cannot lead elsewhere unnoticed,
since the file found must be the inode the walk listed.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable, Iterable

from aptlayer.composefs import fsverity
from aptlayer.composefs.digestcache import DigestCache, Key, key_of, mode_and_size
from aptlayer.composefs.lstatwalk import INLINE_MAX, OPEN_DIR, OPEN_FILE
from aptlayer.linux.beneath import open_beneath
from aptlayer.linux import forked

#: below this much to hash in all, a helper costs more than it saves
MIN_BYTES = 16 << 20
#: a batch holds at most this many bytes; progress is reported after each
BATCH_BYTES = 256 << 20

#: a file to hash: its path below the source (``/a/b``), the key the walk listed, its size
File = tuple[bytes, Key, int]


def wanted(entries: Iterable[tuple[bytes, Key]], cache: DigestCache | None) -> list[File]:
    """Which of these entries (path, key) a scan would hash: regular files over INLINE_MAX
    bytes whose key has no digest in ``cache``."""
    files = []
    for path, key in entries:
        hit = cache.get(key) if cache is not None else None
        if hit is not None and hit[0] is not None:
            continue
        mode, size = mode_and_size(key)
        if size > INLINE_MAX and stat.S_ISREG(mode):
            files.append((path, key, size))
    return files


def digests(source: str | bytes | os.PathLike, files: list[File],
            progress: Callable[[int, int], None] | None = None) -> dict[Key, bytes]:
    """The fs-verity digests of ``files`` by key, hashed here and in a helper; {} where a helper
    cannot run or would not pay.  A file that cannot be opened or hashed, or is no longer the
    file its key describes, is left out: the scan reads it and reports what is wrong.
    ``progress(bytes done, bytes in all)`` is called before the first batch and after each."""
    total = sum(size for _, _, size in files)
    if total < MIN_BYTES or not forked.helper_allowed():
        return {}
    root_fd = os.open(source, OPEN_DIR)
    try:
        found: dict[Key, bytes] = {}
        done = 0
        if progress is not None:
            progress(done, total)
        for batch in _batches(files):
            mine, theirs = _halves(batch)
            got, helped = forked.split(lambda: _hash(root_fd, theirs), lambda: _hash(root_fd, mine), keep=(root_fd,))
            found.update(got)
            found.update(helped or {})
            done += sum(size for _, _, size in batch)
            if progress is not None:
                progress(done, total)
        return found
    finally:
        os.close(root_fd)


def _batches(files: list[File]) -> list[list[File]]:
    batches: list[list[File]] = [[]]
    size = 0
    for f in files:
        if size >= BATCH_BYTES:
            batches.append([])
            size = 0
        batches[-1].append(f)
        size += f[2]
    return batches


def _halves(files: list[File]) -> tuple[list[File], list[File]]:
    """Two lists of about the same size in bytes (the largest files placed first)."""
    halves: tuple[list[File], list[File]] = ([], [])
    sizes = [0, 0]
    for f in sorted(files, key=lambda f: f[2], reverse=True):
        i = 0 if sizes[0] <= sizes[1] else 1
        halves[i].append(f)
        sizes[i] += f[2]
    return halves


def _hash(root_fd: int, files: list[File]) -> dict[Key, bytes]:
    found = {}
    for path, key, size in files:
        try:
            fd = open_beneath(root_fd, path.lstrip(b"/"), OPEN_FILE)  # no symlink on the way either
        except OSError:
            continue
        try:
            if key_of(os.fstat(fd)) == key:
                found[key] = fsverity.digest_fd(fd, size)
        except (OSError, ValueError):
            pass
        finally:
            os.close(fd)
    return found
