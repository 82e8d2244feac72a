"""The digest store: backing files named by their fs-verity digest.

Layout (the one mkcomposefs ``--digest-store`` and overlayfs ``datadir+=``
use): ``STORE/xx/yyyy...`` where ``xx`` is the first byte of the digest and
``yyyy...`` the other 31, in lower-case hex.  Objects are full copies with
mode 0644; identical content is stored once.

Writing an object (crash safety, see CRASH-SAFETY.md): copy into a temp file
in the store root named ``.tmp-<boot>-<pid>-<random>`` (so recovery can tell
a dead writer's leftovers from work in flight), ``fchmod`` 0644, ``fsync``,
try to enable fs-verity, ``rename`` into ``xx/``, then ``fsync`` ``xx/`` (and
the store root after creating ``xx/``).  A rename that meets an object
written meanwhile by someone else replaces it with identical bytes.

An object that already exists is a dedupe hit: it is not read or checked
(like mkcomposefs), but its mtime is refreshed so that a garbage collector
with a grace period spares it while the image that needs it is being made.

Every change to disk goes through :mod:`aptlayer.composefs.fsops`.
Removing objects is the garbage collector's job; this module only lists them.
"""

from __future__ import annotations

import errno
import os
import re
import secrets
import stat
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from aptlayer.composefs import fsops, fsverity
from aptlayer.composefs.fsverity import RawDigest

OBJECT_MODE = 0o644
DIR_MODE = 0o755
TEMP_PREFIX = ".tmp-"
_COPY_CHUNK = 1 << 20
_OBJECT_RE = re.compile(r"[0-9a-f]{2}/[0-9a-f]{62}")
_FANOUT_RE = re.compile(r"[0-9a-f]{2}")
_REST_RE = re.compile(r"[0-9a-f]{62}")
_TEMP_RE = re.compile(r"\.tmp-([0-9a-f]{8})-([0-9]+)-[0-9a-f]+")
#: errnos that mean "this copy method is not available here": try the next one
_NO_METHOD = frozenset(
    {errno.EOPNOTSUPP, errno.ENOTTY, errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EBADF}
)


class ObjectStoreError(Exception):
    """A source that cannot be imported."""


class UnsupportedSource(ObjectStoreError, ValueError):
    """The source is not a regular file (a symlink, a directory, a device...)."""


class SourceChanged(ObjectStoreError):
    """The source file changed while it was being hashed or copied."""


@dataclass(frozen=True)
class ImportResult:
    digest: RawDigest
    #: absolute path of the object in the store
    path: str
    #: False for a dedupe hit (the object was already there)
    created: bool
    #: whether the object has fs-verity enabled
    verity: bool
    size: int
    #: why fs-verity is off (None when it is on)
    verity_error: str | None = None


@dataclass(frozen=True)
class StoredObject:
    #: ``xx/yyyy...``, relative to the store
    relpath: str
    size: int
    mtime_ns: int


@dataclass(frozen=True)
class TempFile:
    path: str
    boot: str
    pid: int
    #: written by an earlier boot or by a process that no longer exists
    stale: bool


def _boot_tag() -> str:
    """First 8 hex digits of this boot's id (it changes at every boot)."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip().replace("-", "")[:8]
    except OSError:
        return "00000000"


#: identifies this boot in temp file names
BOOT_TAG = _boot_tag()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _same_file(a: os.stat_result, b: os.stat_result) -> bool:
    return (a.st_dev, a.st_ino, a.st_size, a.st_mtime_ns, a.st_ctime_ns) == (
        b.st_dev,
        b.st_ino,
        b.st_size,
        b.st_mtime_ns,
        b.st_ctime_ns,
    )


def _copy(src: int, dst: int, size: int) -> None:
    """Copy ``size`` bytes: reflink, else ``copy_file_range``, else read/write."""
    try:
        fsops.clone(src, dst)
        return
    except OSError as e:
        if e.errno not in _NO_METHOD:
            raise
    off = 0
    try:
        while off < size:
            n = fsops.copy_range(src, dst, size - off, off)
            if n == 0:
                break
            off += n
    except OSError as e:
        if e.errno not in _NO_METHOD:
            raise
    buf = bytearray(_COPY_CHUNK)
    mv = memoryview(buf)
    while off < size:
        n = os.preadv(src, [mv[: min(_COPY_CHUNK, size - off)]], off)
        if n == 0:
            break
        done = 0
        while done < n:
            done += fsops.write(dst, mv[done:n], off + done)
        off += n
    if off != size:
        raise SourceChanged(f"source shrank while copying: {off} of {size} bytes")


class ObjectStore:
    """A digest store rooted at ``path`` (created on the first import).

    With ``defer_dir_sync`` the directory fsyncs after each rename are
    collected and done by :meth:`sync` instead, which halves the fsyncs of a
    large import; objects are then durable only after ``sync()`` returns.
    Safe to use from several threads.
    """

    def __init__(self, path: str | os.PathLike[str], *, defer_dir_sync: bool = False) -> None:
        self.path = os.path.abspath(os.fspath(path))
        self.defer_dir_sync = defer_dir_sync
        self._lock = threading.Lock()
        self._dirs_made: set[str] = set()
        self._dirty: set[str] = set()

    # -- queries ---------------------------------------------------------

    def path_of(self, digest: RawDigest) -> str:
        return os.path.join(self.path, fsverity.object_path(digest))

    def has(self, digest: RawDigest) -> bool:
        return _is_object(self.path_of(digest))

    def missing(self, object_paths: Iterable[str | bytes], *basedirs: str) -> list[str]:
        """The object paths (``xx/yyyy...``) found neither here nor in ``basedirs``.

        Sorted and unique.  A path that is not of the ``xx/yyyy...`` form can
        never be in a digest store and is reported missing.
        """
        roots = (self.path, *basedirs)
        out = set()
        for p in object_paths:
            rel = os.fsdecode(p)
            if not _OBJECT_RE.fullmatch(rel) or not any(
                _is_object(os.path.join(r, rel)) for r in roots
            ):
                out.add(rel)
        return sorted(out)

    def iter_objects(self) -> Iterator[StoredObject]:
        """Every object, in path order (temp files and stray names are skipped)."""
        for fan in _sorted_entries(self.path):
            if not (_FANOUT_RE.fullmatch(fan.name) and fan.is_dir(follow_symlinks=False)):
                continue
            for ent in _sorted_entries(fan.path):
                if not _REST_RE.fullmatch(ent.name):
                    continue
                st = ent.stat(follow_symlinks=False)
                if stat.S_ISREG(st.st_mode):
                    yield StoredObject(f"{fan.name}/{ent.name}", st.st_size, st.st_mtime_ns)

    def iter_temp_files(self) -> Iterator[TempFile]:
        """Temp files in the store root, each marked stale if its writer is gone."""
        for ent in _sorted_entries(self.path):
            m = _TEMP_RE.fullmatch(ent.name)
            if m:
                boot, pid = m.group(1), int(m.group(2))
                stale = boot != BOOT_TAG or not _pid_alive(pid)
                yield TempFile(ent.path, boot, pid, stale)

    # -- writing ---------------------------------------------------------

    def import_file(
        self,
        src: str | bytes | os.PathLike | int,
        digest: RawDigest | None = None,
        *,
        expect: os.stat_result | None = None,
    ) -> ImportResult:
        """Store a copy of a regular file, named by its fs-verity digest.

        ``src`` is a path (opened with ``O_NOFOLLOW``: a symlink is refused,
        never followed) or an open fd, which stays the caller's.  ``digest``,
        if given, is trusted to be the digest of the content; otherwise it is
        computed from the source.  ``expect`` is the source's ``fstat`` from
        when the caller hashed it: the copy must still match it (size, mtime,
        ctime, inode) before the object gets its name, so a file changed in
        between cannot be stored under a stale digest.  Raises ``UnsupportedSource`` for anything
        but a regular file, ``SourceChanged`` if the file changes meanwhile,
        and ``OSError`` for I/O errors.  Failing to enable fs-verity is not
        an error: the result says whether it worked.
        """
        if isinstance(src, int):
            return self._import_fd(src, digest, expect)
        try:
            fd = os.open(src, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise UnsupportedSource(f"{os.fsdecode(src)}: is a symbolic link") from e
            raise
        try:
            return self._import_fd(fd, digest, expect)
        finally:
            os.close(fd)

    def _import_fd(
        self, fd: int, digest: RawDigest | None, expect: os.stat_result | None
    ) -> ImportResult:
        before = os.fstat(fd)
        if not stat.S_ISREG(before.st_mode):
            raise UnsupportedSource(f"{fsops.fd_path(fd)}: not a regular file")
        if expect is not None:
            before = expect
        size = before.st_size
        if digest is None:
            try:
                digest = fsverity.digest_fd(fd, size)
            except ValueError as e:
                raise SourceChanged(str(e)) from e
        dest = self.path_of(digest)
        hit = self._refresh(dest, digest, size)
        if hit is not None:
            return hit
        self._ensure_dir(self.path, os.path.dirname(self.path))
        name = f"{TEMP_PREFIX}{BOOT_TAG}-{os.getpid()}-{secrets.token_hex(6)}"
        tmp = os.path.join(self.path, name)
        renamed = False
        try:
            out = fsops.create(tmp)
            try:
                _copy(fd, out, size)
                if not _same_file(before, os.fstat(fd)):
                    raise SourceChanged(f"{fsops.fd_path(fd)}: changed while it was copied")
                fsops.fchmod(out, OBJECT_MODE)
                fsops.fsync(out)
            finally:
                os.close(out)
            verity, why = _try_enable_verity(tmp)
            fan = os.path.dirname(dest)
            self._ensure_dir(fan, self.path)
            try:
                fsops.rename(tmp, dest)
            except FileNotFoundError:  # an empty xx/ was collected since we made it
                with self._lock:
                    self._dirs_made.discard(fan)
                self._ensure_dir(fan, self.path)
                fsops.rename(tmp, dest)
            renamed = True
        finally:
            if not renamed:
                try:
                    fsops.unlink(tmp)
                except FileNotFoundError:
                    pass
        self._synced(fan)
        return ImportResult(digest, dest, True, verity, size, why)

    def _refresh(self, dest: str, digest: RawDigest, size: int) -> ImportResult | None:
        """A dedupe hit's result after refreshing its mtime, or None if absent."""
        if not _is_object(dest):
            return None
        try:
            fsops.touch(dest)
        except FileNotFoundError:  # collected just now: write it again
            return None
        try:
            ofd = os.open(dest, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        try:
            verity = fsverity.measure(ofd) is not None
        finally:
            os.close(ofd)
        why = None if verity else "not enabled on the existing object"
        return ImportResult(digest, dest, False, verity, size, why)

    def _ensure_dir(self, path: str, parent: str) -> None:
        """Create ``path`` if needed and make its entry in ``parent`` durable.

        A directory found already there is synced too: another thread or
        process may have made it and not synced its parent yet.
        """
        if path in self._dirs_made:
            return
        try:
            fsops.mkdir(path, DIR_MODE)
        except FileExistsError:
            if not os.path.isdir(path) or os.path.islink(path):
                raise
        self._synced(parent)
        with self._lock:
            self._dirs_made.add(path)

    def _synced(self, directory: str) -> None:
        if self.defer_dir_sync:
            with self._lock:
                self._dirty.add(directory)
        else:
            fsops.fsync_dir(directory)

    def sync(self) -> None:
        """fsync the directories whose syncs were deferred (store root last)."""
        with self._lock:
            dirty, self._dirty = self._dirty, set()
        for d in sorted(dirty, key=len, reverse=True):
            fsops.fsync_dir(d)


def _try_enable_verity(path: str) -> tuple[bool, str | None]:
    """Enable fs-verity on a finished file; never fails, returns (on, reason if off)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as e:
        return False, f"cannot reopen: {e.strerror}"
    try:
        fsops.enable_verity(fd)
        return True, None
    except OSError as e:
        return False, str(e) if isinstance(e, fsverity.VerityUnsupported) else e.strerror
    finally:
        os.close(fd)


def _is_object(path: str) -> bool:
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except FileNotFoundError:
        return False
    except NotADirectoryError:
        return False


def _sorted_entries(path: str) -> list[os.DirEntry[str]]:
    try:
        with os.scandir(path) as it:
            return sorted(it, key=lambda e: e.name)
    except FileNotFoundError:
        return []
