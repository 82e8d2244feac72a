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
written meanwhile by someone else replaces it with identical bytes.  A
batch (see :class:`ObjectStore`) keeps that order for many objects at once:
copy every temp file, one ``syncfs``, every rename, one ``syncfs``.

An object that already exists with the expected size is a dedupe hit: its
content is not read or checked (like mkcomposefs; ``fsck`` recomputes
digests, ``watch`` reports objects changed behind the store's back), but one
of another size is damaged and is written anew over it. A hit's mtime is refreshed so that a garbage collector
with a grace period spares it while the image that needs it is being made.
A caller whose collector cannot run meanwhile (the Store holds its lock)
turns that off with ``refresh_hits=False``: one ``utime`` per hit is most
of what an unchanged rebuild costs the file system.

Every change to disk goes through :mod:`aptlayer.linux.fsops`.
Removing objects is the garbage collector's job; this module only lists them.
"""

from __future__ import annotations

import dataclasses
import errno
import os
import re
import stat
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from aptlayer.composefs import fsverity
from aptlayer.composefs.fsverity import RawDigest
from aptlayer.linux import fsops, verity
from aptlayer.linux.boot import boot_id
from aptlayer.linux.process import pid_alive

OBJECT_MODE = 0o644
#: a batch commits by itself once this many objects, or bytes, wait for it
BATCH_OBJECTS = 4096
BATCH_BYTES = 512 << 20
DIR_MODE = 0o755
TEMP_PREFIX = ".tmp-"
_COPY_CHUNK = 1 << 20
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


#: identifies this boot in temp file names: the first 8 hex digits of its id
BOOT_TAG = (boot_id() or "00000000")[:8]


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

    With ``batch``, :meth:`import_file` only copies a new object into its
    temp file; :meth:`sync` makes all of them durable with one ``syncfs``,
    renames them into ``xx/``, and makes the renames durable with a second
    ``syncfs`` (two journal commits where one file at a time costs two per
    object).  An object's name still appears only after its data is durable,
    and every object of the batch is durable when ``sync()`` returns; before
    that, objects the batch created may be missing.  A batch also commits
    on its own once ``BATCH_OBJECTS`` objects or ``BATCH_BYTES`` bytes wait,
    to bound its temp files and dirty pages.  :meth:`discard` removes the
    temp files of a batch that will not be committed.  Identical content
    imported twice in one batch is copied once.  Safe to use from several
    threads.
    """

    def __init__(
        self, path: str | os.PathLike[str], *, batch: bool = False, refresh_hits: bool = True
    ) -> None:
        self.path = os.path.abspath(os.fspath(path))
        self.batch = batch
        self.refresh_hits = refresh_hits
        self._lock = threading.Lock()
        self._commit_lock = threading.Lock()
        self._dirs_made: set[str] = set()
        #: batch: objects claimed by an import (None while it copies), until they are named
        self._claimed: dict[str, ImportResult | None] = {}
        #: batch: (temp file, object path) of copies waiting for the commit
        self._staged: list[tuple[str, str]] = []
        self._staged_bytes = 0
        #: batch: directory entries made since the last syncfs
        self._unsynced = False
        #: batch: the store root, opened before the first temp file (see fsops.syncfs)
        self._root_fd: int | None = None
        #: why fs-verity cannot be enabled here, once the file system said so
        self._no_verity: str | None = None

    # -- queries ---------------------------------------------------------

    def path_of(self, digest: RawDigest) -> str:
        return f"{self.path}/{fsverity.object_path(digest)}"

    def has(self, digest: RawDigest) -> bool:
        return _is_file(self.path_of(digest))

    def missing(self, object_paths: Iterable[str | bytes], *basedirs: str) -> list[str]:
        """The object paths (``xx/yyyy...``) found neither here nor in ``basedirs``.

        Sorted and unique.  A path that is not of the ``xx/yyyy...`` form can
        never be in a digest store and is reported missing.
        """
        roots = (self.path, *basedirs)
        out = set()
        for p in object_paths:
            rel = os.fsdecode(p)
            if not fsverity.is_object_path(rel) or not any(
                _is_file(os.path.join(r, rel)) for r in roots
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
                stale = boot != BOOT_TAG or not pid_alive(pid)
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

    def claim(self, digest: RawDigest, size: int) -> bool:
        """Whether the object is already here (its mtime refreshed) or on its way in this batch.

        The cheap check of a dedupe hit, for a caller that needs no
        :class:`ImportResult`; False means it must be imported (also when an
        object of that name has another size than ``size``: it is damaged).
        """
        dest = self.path_of(digest)
        if self.batch and dest in self._claimed:
            return True
        if not _is_object(dest, size):
            return False
        if self.refresh_hits:
            try:
                fsops.touch(dest)
            except FileNotFoundError:  # collected just now
                return False
        return True

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
        if not self.batch:
            return self._write(fd, before, digest, dest)
        with self._lock:
            if dest in self._claimed:
                return self._batch_hit(dest, digest, size)
            self._claimed[dest] = None
        try:
            result = self._write(fd, before, digest, dest)
        except BaseException:
            with self._lock:
                del self._claimed[dest]
            raise
        with self._lock:
            self._claimed[dest] = result
        return result

    def _batch_hit(self, dest: str, digest: RawDigest, size: int) -> ImportResult:
        """The result for content this batch already imports (call with the lock held)."""
        first = self._claimed[dest]
        if first is None:
            return ImportResult(digest, dest, False, False, size, "being written by another import")
        return dataclasses.replace(first, created=False)

    def _write(self, fd: int, before: os.stat_result, digest: RawDigest, dest: str) -> ImportResult:
        """Copy into a temp file, then name it now or (batch) at the commit."""
        self._ensure_dir(self.path, os.path.dirname(self.path))
        if self.batch:
            self._open_root()
        tmp = os.path.join(self.path, f"{TEMP_PREFIX}{BOOT_TAG}-{os.getpid()}-{os.urandom(6).hex()}")
        placed = False
        try:
            self._fill(tmp, fd, before)
            has_verity, why = self._enable_verity(tmp)
            if self.batch:
                self._stage(tmp, dest, before.st_size)
            else:
                self._place(tmp, dest)
            placed = True
        finally:
            if not placed:
                _unlink_quietly(tmp)
        if not self.batch:
            fsops.fsync_dir(os.path.dirname(dest))
        return ImportResult(digest, dest, True, has_verity, before.st_size, why)

    def _fill(self, tmp: str, fd: int, before: os.stat_result) -> None:
        """Create ``tmp`` with the content of ``fd``, mode 0644; fsynced unless batched."""
        out = fsops.create(tmp)
        try:
            _copy(fd, out, before.st_size)
            if not _same_file(before, os.fstat(fd)):
                raise SourceChanged(f"{fsops.fd_path(fd)}: changed while it was copied")
            fsops.fchmod(out, OBJECT_MODE)
            if not self.batch:
                fsops.fsync(out)
        finally:
            os.close(out)

    def _enable_verity(self, tmp: str) -> tuple[bool, str | None]:
        """Try fs-verity on a finished temp file; never fails, returns (on, reason if off).

        Once the file system says it has no fs-verity, later files skip the try.
        """
        if self._no_verity is not None:
            return False, self._no_verity
        try:
            fd = os.open(tmp, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as e:
            return False, f"cannot reopen: {e.strerror}"
        try:
            fsops.enable_verity(fd)
            return True, None
        except verity.VerityUnsupported as e:
            self._no_verity = str(e)
            return False, self._no_verity
        except OSError as e:
            return False, e.strerror
        finally:
            os.close(fd)

    def _place(self, tmp: str, dest: str) -> None:
        """Rename a durable temp file to its object name, making ``xx/`` if needed."""
        fan = os.path.dirname(dest)
        self._ensure_dir(fan, self.path)
        try:
            fsops.rename(tmp, dest)
        except FileNotFoundError:  # an empty xx/ was collected since we made it
            with self._lock:
                self._dirs_made.discard(fan)
            self._ensure_dir(fan, self.path)
            fsops.rename(tmp, dest)

    def _stage(self, tmp: str, dest: str, size: int) -> None:
        with self._lock:
            self._staged.append((tmp, dest))
            self._staged_bytes += size
            full = len(self._staged) >= BATCH_OBJECTS or self._staged_bytes >= BATCH_BYTES
        if full:
            self._commit()

    def _open_root(self) -> None:
        with self._lock:
            if self._root_fd is None:
                self._root_fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)

    def _commit(self) -> None:
        """Make the staged copies durable (one syncfs), then give them their names."""
        with self._commit_lock:
            with self._lock:
                staged, self._staged, self._staged_bytes = self._staged, [], 0
            if not staged:
                return
            assert self._root_fd is not None
            placed = 0
            try:
                fsops.syncfs(self._root_fd)
                for tmp, dest in staged:
                    self._place(tmp, dest)
                    placed += 1
                    self._unsynced = True
            except BaseException:
                for tmp, _ in staged[placed:]:
                    _unlink_quietly(tmp)
                raise
            with self._lock:
                for _, dest in staged:
                    self._claimed.pop(dest, None)

    def _refresh(self, dest: str, digest: RawDigest, size: int) -> ImportResult | None:
        """A dedupe hit's result after refreshing its mtime, or None if absent (or damaged)."""
        if not _is_object(dest, size):
            return None
        if self.refresh_hits:
            try:
                fsops.touch(dest)
            except FileNotFoundError:  # collected just now: write it again
                return None
        try:
            ofd = os.open(dest, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        try:
            has_verity = verity.measure(ofd) is not None
        finally:
            os.close(ofd)
        why = None if has_verity else "not enabled on the existing object"
        return ImportResult(digest, dest, False, has_verity, size, why)

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
        if self.batch:
            self._unsynced = True
        else:
            fsops.fsync_dir(parent)
        with self._lock:
            self._dirs_made.add(path)

    def sync(self) -> None:
        """Batch: commit what is staged, then make every new name durable (one more syncfs)."""
        self._commit()
        with self._commit_lock:
            if self._unsynced:
                self._open_root()
                assert self._root_fd is not None
                fsops.syncfs(self._root_fd)
                self._unsynced = False
            self._close_root()

    def discard(self) -> None:
        """Batch: remove the temp files of staged copies that will not be committed."""
        with self._commit_lock:
            with self._lock:
                staged, self._staged, self._staged_bytes = self._staged, [], 0
                self._claimed.clear()
            for tmp, _ in staged:
                _unlink_quietly(tmp)
            self._close_root()

    def _close_root(self) -> None:
        if self._root_fd is not None:
            os.close(self._root_fd)
            self._root_fd = None


def _unlink_quietly(path: str) -> None:
    try:
        fsops.unlink(path)
    except FileNotFoundError:
        pass


def _is_file(path: str) -> bool:
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except (FileNotFoundError, NotADirectoryError):
        return False


def _is_object(path: str, size: int) -> bool:
    """A regular file of ``size`` bytes at ``path``."""
    try:
        st = os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):
        return False
    return stat.S_ISREG(st.st_mode) and st.st_size == size


def _sorted_entries(path: str) -> list[os.DirEntry[str]]:
    try:
        with os.scandir(path) as it:
            return sorted(it, key=lambda e: e.name)
    except FileNotFoundError:
        return []
