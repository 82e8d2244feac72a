"""Build a :class:`Node` tree from a directory, as ``mkcomposefs DIR`` reads it.

What is taken from the source (composefs-format.md §14, §18):

* every entry is ``lstat``-ed, symlinks are never followed, the root's
  metadata comes from the source directory itself;
* mode, uid, gid, rdev and size from ``lstat``; mtimes with full ns
  precision (floor division, so -1.5 s is ``(-2, 500000000)``), or 0.0 for
  all with ``use_epoch``;
* nlink is 1 for every non-directory: hard links are *not* detected, each
  path becomes its own inode (the writer recomputes directory nlinks);
* xattrs via ``listxattr``/``getxattr`` without following symlinks, all of
  them, none (``skip_xattrs``) or only ``user.*`` (``user_xattrs``);
* regular files: size 0 stores nothing, 1..64 bytes are inlined, larger ones
  are external: digest = fs-verity of the content, payload = ``xx/yyyy...``,
  and with a digest store they are copied into it.

The walk opens everything relative to its parent directory's fd with
``O_NOFOLLOW``, so a symlink swapped in for a directory during the scan
cannot lead outside the source.  It keeps at most ``MAX_OPEN_DIRS`` of
those fds open and reopens an ancestor name by name (checking its inode)
when a deeper tree needs it again.  Xattrs of an entry are read through
``/proc/self/fd/DIRFD/NAME`` (the last part not followed), so ``/proc``
must be mounted.

Threads: hashing stays in the calling thread.  The Merkle tree hashes 4 KiB
blocks, and each ``hashlib`` call on one releases and retakes the GIL, so
two hashing threads contend and run no faster than one (measured on the
benchmark tree, 24,000 entries and 376 MB: a scan hashing in the walk took
0.71 s, one handing files to two hashing threads 0.79 s).  A second
process does share the work: with ``threads`` > 1, the files the scan will
hash are hashed ahead by this process and a forked helper
(:mod:`.prehash`; 0.47 s became 0.27 s there), and the scan takes those
digests.  With ``threads`` > 1 the copies of new objects into the store go to a pool in
chunks of up to ``_CHUNK_FILES`` files or ``_CHUNK_BYTES`` bytes, so a
small file costs no thread round trip of its own, and content already in
the store (checked in the calling thread) costs none at all.  The tree
never depends on the thread count.

Digest cache: with ``cache``, an entry whose ``lstat`` matches a cached
one (:func:`.digestcache.key_of`) takes its xattrs, symlink target, inline
content and digest from it unread; an external file's digest counts only
as long as the store still has its object, otherwise the file is read,
hashed and imported, and its entry refreshed.  The caller saves the cache.
A caller that remembers what a tree gave can skip the scan altogether by
the tree's fingerprint (:func:`.lstatwalk.walk`, ``lstat`` alone).
"""

from __future__ import annotations

import errno
import os
import stat
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, NamedTuple

from aptlayer.composefs import fsverity, prehash
from aptlayer.composefs.digestcache import DigestCache, Entry, Key, Lstat, key_of, lstat_of
from aptlayer.composefs.lstatwalk import (
    FS_ENCODING, FS_ERRORS, INLINE_MAX, NAME_MAX, OPEN_DIR, OPEN_FILE, REPRESENTABLE, ScanOptions, ScanStats,
    TreeWalk, walk,
)
from aptlayer.composefs.objectstore import ObjectStore, ObjectStoreError
from aptlayer.composefs.tree import Node
from aptlayer.linux import forked
from aptlayer.linux.listed import EntryChanged, open_as_listed

if TYPE_CHECKING:
    from concurrent.futures import Future, ThreadPoolExecutor

#: directory fds the walk keeps open at most; deeper trees reopen ancestors
MAX_OPEN_DIRS = 64
#: a chunk of work for the pool: at most this many files or bytes
_CHUNK_FILES = 32
_CHUNK_BYTES = 4 << 20
#: chunks queued or running per worker thread (each file holds an open fd)
_CHUNKS_PER_THREAD = 2


class ScanError(Exception):
    """A source entry that cannot be read or represented.

    ``path`` is the entry's path relative to the source (``/`` = the source
    itself), ``reason`` says why; the underlying ``OSError`` or
    ``ValueError``, if any, is the ``__cause__``.
    """

    def __init__(self, path: bytes, reason: str) -> None:
        super().__init__(f"{os.fsdecode(path)}: {reason}")
        self.path = path
        self.reason = reason


class ScanResult(NamedTuple):
    root: Node
    stats: ScanStats


def scan(
    source: str | bytes | os.PathLike,
    *,
    store: ObjectStore | None = None,
    use_epoch: bool = False,
    skip_xattrs: bool = False,
    user_xattrs: bool = False,
    skip_devices: bool = False,
    threads: int = 1,
    progress: Callable[[ScanStats], None] | None = None,
    cache: DigestCache | None = None,
    walked: TreeWalk | None = None,
) -> ScanResult:
    """Read the directory ``source`` into a tree, like ``mkcomposefs`` does.

    With ``store``, every external file is imported into it (mkcomposefs
    ``--digest-store``); if the scan fails, what it staged in a batch store
    is discarded.  ``threads`` > 1 hashes on two cores (:mod:`.prehash`)
    and copies new objects in worker threads, and
    ``cache`` lets unchanged entries skip reading (see the module docstring);
    the caller saves it.  ``walked`` is a :func:`.lstatwalk.walk` of
    ``source`` just made: its listings are used instead of listing again.
    ``progress``, if given, is called from the calling thread with the
    running stats after each regular file, and before that while files are
    hashed ahead (``hashed_ahead`` of ``hash_ahead`` bytes).  Raises
    ``ScanError`` for an entry that cannot be read or represented (the
    source itself must be a directory, not a symlink to one) and
    ``ValueError`` for ``skip_xattrs`` together with ``user_xattrs``.
    """
    if skip_xattrs and user_xattrs:
        raise ValueError("skip_xattrs and user_xattrs conflict")
    if threads < 1:
        raise ValueError(f"invalid thread count {threads}")
    opts = ScanOptions(use_epoch, skip_xattrs, user_xattrs, skip_devices)
    walker = _Walker(opts, store, cache, threads, progress, walked)
    if walker.can_hash_ahead():
        walker.walked = walked or walk(source, 0, skip_devices=skip_devices)
        if walker.walked is not None:
            walker.hash_ahead(source, walker.walked.entries())
    try:
        root = walker.run(os.fsencode(source))
    except BaseException:
        if store is not None:
            store.discard()
        raise
    return ScanResult(root, walker.stats)


def scan_entries(
    source: str | bytes | os.PathLike,
    walked: TreeWalk,
    paths: list[bytes],
    *,
    store: ObjectStore | None = None,
    use_epoch: bool = False,
    skip_xattrs: bool = False,
    user_xattrs: bool = False,
    threads: int = 1,
    cache: DigestCache | None = None,
) -> tuple[dict[bytes, Node], ScanStats]:
    """Read some entries of ``source`` as :func:`scan` reads them, by path (``/a/b``, not the root).

    ``walked`` is the :func:`.lstatwalk.walk` that saw them: each entry must still be
    the file its listing describes, and each directory on the way the one
    walked (both are checked: ``ScanError`` "changed during the scan").  A
    directory's node comes without children.  External files go into
    ``store`` as in a scan; on failure what a batch store staged is discarded.
    With ``cache``, entries are looked up and recorded in it as in a scan,
    and with ``threads`` > 1 files are hashed ahead as in a scan.
    Returns the nodes by path and the stats of these entries alone.
    """
    if skip_xattrs and user_xattrs:
        raise ValueError("skip_xattrs and user_xattrs conflict")
    by_dir: dict[bytes, dict[bytes, Key]] = {}

    def lstat(path: bytes) -> Lstat | None:
        """The entry's lstat in the walk, by way of its parent's listing."""
        parent, name = path.rsplit(b"/", 1)
        names = by_dir.get(parent)
        if names is None:
            names = by_dir[parent] = dict(walked.listing(parent + b"/") or ())
        key = names.get(name)
        return None if key is None else lstat_of(key)

    def ident(path: bytes) -> tuple[int, int] | None:
        st = lstat(path)
        return None if st is None else (st.st_dev, st.st_ino)

    listed = []
    for path in paths:
        st = lstat(path)
        if st is None:
            raise ScanError(path, "not in the walk")
        listed.append((path, st))
    walker = _Walker(ScanOptions(use_epoch, skip_xattrs, user_xattrs), store, cache, threads, None)
    if walker.can_hash_ahead():
        walker.hash_ahead(source, ((p, key_of(st)) for p, st in listed))
    try:
        nodes = walker.entries(os.fsencode(source), listed, ident)
    except BaseException:
        if store is not None:
            store.discard()
        raise
    return nodes, walker.stats


class _Job(NamedTuple):
    """A hashed file to copy into the store: its open fd is closed by whoever runs the job."""

    fd: int
    path: bytes
    digest: bytes
    #: fstat of ``fd``
    opened: os.stat_result


@dataclass
class _Dir:
    """A directory on the walk's stack."""

    name: bytes
    path: bytes
    #: (st_dev, st_ino) when listed, to check a reopened fd
    ident: tuple[int, int]
    #: None while closed to stay under MAX_OPEN_DIRS
    fd: int | None
    #: subdirectories still to list
    pending: list[tuple[bytes, Node, os.stat_result]] = field(default_factory=list)


def _limit_open_dirs(stack: list[_Dir]) -> None:
    """Close the fds of the shallowest directories (not the root, not the top) past the limit."""
    open_ = [d for d in stack[1:-1] if d.fd is not None]
    for d in open_[: max(0, len(open_) + 2 - MAX_OPEN_DIRS)]:
        assert d.fd is not None
        os.close(d.fd)
        d.fd = None


def _open_source(source: bytes) -> int:
    """The fd of the source directory, which must not be a symlink."""
    try:
        return os.open(source, OPEN_DIR)
    except OSError as e:
        reason = "Not a directory" if e.errno in (errno.ENOTDIR, errno.ELOOP) else e.strerror
        raise ScanError(b"/", f"cannot open source {os.fsdecode(source)}: {reason}") from e


def _descend(open_dirs: list[tuple[bytes, int]], path: bytes,
             idents: Callable[[bytes], tuple[int, int] | None]) -> int:
    """The fd of the directory ``path``, from the open directories of the last one.

    Those not on the way are closed; the rest of the way is opened name by
    name with ``O_NOFOLLOW``, each step checked against the walk's (device,
    inode).  At most MAX_OPEN_DIRS levels.
    """
    while open_dirs[-1][0] and path != open_dirs[-1][0] and not path.startswith(open_dirs[-1][0] + b"/"):
        os.close(open_dirs.pop()[1])
    here, fd = open_dirs[-1]
    if here == path:
        return fd
    for name in path[len(here) + 1 :].split(b"/"):
        here += b"/" + name
        if len(open_dirs) >= MAX_OPEN_DIRS:
            raise ScanError(here, f"more than {MAX_OPEN_DIRS} levels deep")
        try:
            fd = os.open(name, OPEN_DIR, dir_fd=fd)
        except OSError as e:
            raise ScanError(here, f"cannot open: {e.strerror}") from e
        open_dirs.append((here, fd))
        st = os.fstat(fd)
        if (st.st_dev, st.st_ino) != idents(here):
            raise ScanError(here, "changed during the scan")
    return fd


class _Walker:
    def __init__(
        self,
        opts: ScanOptions,
        store: ObjectStore | None,
        cache: DigestCache | None,
        threads: int,
        progress: Callable[[ScanStats], None] | None,
        walked: TreeWalk | None = None,
    ) -> None:
        self.opts = opts
        self.walked = walked
        #: digests hashed ahead, by the key of the file when it was hashed
        self.prehashed: dict[Key, bytes] = {}
        self.store = store
        self.cache = cache
        self.threads = threads
        self.progress = progress
        self.stats = ScanStats()
        #: digests of the objects this scan created (added by the workers)
        self.created: set[bytes] = set()
        self.pool: ThreadPoolExecutor | None = None
        self.chunk: list[_Job] = []
        self.chunk_bytes = 0
        self.inflight: deque[tuple[Future[None], list[_Job]]] = deque()

    def can_hash_ahead(self) -> bool:
        """Whether files are hashed ahead (:mod:`.prehash`): with threads, where a helper may run."""
        return self.threads > 1 and forked.helper_allowed()

    def hash_ahead(self, source: str | bytes | os.PathLike, entries: Iterable[tuple[bytes, Key]]) -> None:
        """Hash ahead those of ``entries`` (path, key) the scan would hash, reporting progress."""
        self.prehashed = prehash.digests(source, prehash.wanted(entries, self.cache),
                                         self._hashed_ahead if self.progress is not None else None)

    def _hashed_ahead(self, done: int, total: int) -> None:
        """Progress of the hashing ahead, as stats."""
        self.stats.hashed_ahead, self.stats.hash_ahead = done, total
        self.progress(self.stats)

    def _lookup(self, st: os.stat_result) -> Entry | None:
        """The cached entry for ``st`` (None without a cache)."""
        return None if self.cache is None else self.cache.get(key_of(st))

    def run(self, source: bytes) -> Node:
        root_fd = _open_source(source)
        self._start_pool()
        stack: list[_Dir] = []
        try:
            st = os.fstat(root_fd)
            hit = self._lookup(st)
            xattrs, pairs = self._xattrs(b"/", root_fd, hit)
            root = self._node(b"/", st, xattrs)
            root.nlink = st.st_nlink
            self._keep(st, hit, (None, pairs, None))
            stack.append(_Dir(b"", b"/", (st.st_dev, st.st_ino), root_fd))
            stack[0].pending = self._list(root_fd, b"/", root)
            while stack:
                top = stack[-1]
                if not top.pending:
                    if top.fd is not None:
                        os.close(top.fd)
                    stack.pop()
                    continue
                name, node, st = top.pending.pop()
                child = top.path.rstrip(b"/") + b"/" + name
                cfd, _ = self._open(self._dir_fd(stack, len(stack) - 1), name, child, st, OPEN_DIR)
                stack.append(_Dir(name, child, (st.st_dev, st.st_ino), cfd))
                stack[-1].pending = self._list(cfd, child, node)
                _limit_open_dirs(stack)
            self._finish_jobs()
        finally:
            for d in stack:
                if d.fd is not None:
                    os.close(d.fd)
            self._shutdown()
        self._count_objects()
        return root

    def entries(self, source: bytes, entries: list[tuple[bytes, os.stat_result]],
                idents: Callable[[bytes], tuple[int, int] | None]) -> dict[bytes, Node]:
        """The nodes of single entries below the root of ``source``; see :func:`scan_entries`."""
        root_fd = _open_source(source)
        self._start_pool()
        nodes: dict[bytes, Node] = {}
        #: the open directories from the root down to the last one used, as (path, fd)
        open_dirs: list[tuple[bytes, int]] = [(b"", root_fd)]
        try:
            for path, st in sorted(entries):  # siblings together: each directory is opened once
                parent, name = path.rsplit(b"/", 1)
                dfd = _descend(open_dirs, parent, idents)
                nodes[path] = self._entry(dfd, f"/proc/self/fd/{dfd}/".encode(), name, path, st)
            self._finish_jobs()
        finally:
            for _, fd in open_dirs:
                os.close(fd)
            self._shutdown()
        self._count_objects()
        return nodes

    def _start_pool(self) -> None:
        if self.threads > 1 and self.store is not None:
            from concurrent.futures import ThreadPoolExecutor

            self.pool = ThreadPoolExecutor(self.threads)

    def _finish_jobs(self) -> None:
        """Hand over the last chunk and wait for every copy."""
        self._submit()
        while self.inflight:
            self.inflight.popleft()[0].result()

    def _count_objects(self) -> None:
        if self.store is not None:
            self.stats.objects_created = len(self.created)
            self.stats.objects_deduped = self.stats.external - self.stats.objects_created

    def _shutdown(self) -> None:
        """Stop the pool; close the fds of jobs that never ran (after a failure)."""
        unrun = list(self.chunk)
        if self.pool is not None:
            unrun += [job for fut, jobs in self.inflight if fut.cancel() for job in jobs]
            self.pool.shutdown(wait=True)
        for job in unrun:
            os.close(job.fd)

    def _dir_fd(self, stack: list[_Dir], i: int) -> int:
        """The fd of ``stack[i]``, reopened from its nearest open ancestor if it was closed.

        Each step opens one name with ``O_NOFOLLOW`` and must find the same
        directory (device and inode) as when it was listed.
        """
        if stack[i].fd is not None:
            return stack[i].fd
        j = i
        while stack[j].fd is None:
            j -= 1
        fd = stack[j].fd
        for d in stack[j + 1 : i + 1]:
            try:
                nfd = os.open(d.name, OPEN_DIR, dir_fd=fd)
            except OSError as e:
                raise ScanError(d.path, f"cannot reopen: {e.strerror}") from e
            finally:
                if fd != stack[j].fd:
                    os.close(fd)
            st = os.fstat(nfd)
            if (st.st_dev, st.st_ino) != d.ident:
                os.close(nfd)
                raise ScanError(d.path, "changed during the scan")
            fd = nfd
        stack[i].fd = fd
        _limit_open_dirs(stack)
        return fd

    def _list(self, dfd: int, path: bytes, node: Node) -> list[tuple[bytes, Node, os.stat_result]]:
        """Fill ``node.children``; returns the subdirectories still to list."""
        base = path.rstrip(b"/") + b"/"
        listed = self.walked.listing(base) if self.walked is not None else None
        entries: list[tuple[bytes, os.DirEntry | Key]]
        if listed is not None:
            entries = listed  # sorted by name
        else:
            try:
                with os.scandir(dfd) as it:
                    entries = [(e.name.encode(FS_ENCODING, FS_ERRORS), e) for e in it]
                entries.sort()
            except OSError as e:
                raise ScanError(path, f"cannot read directory: {e.strerror}") from e
        subdirs = []
        proc = f"/proc/self/fd/{dfd}/".encode()
        skip_devices = self.opts.skip_devices
        children = node.children
        for name, entry in entries:
            child = base + name
            if len(name) > NAME_MAX:
                raise ScanError(child, f"name longer than {NAME_MAX} bytes")
            if listed is None:
                try:
                    st = entry.stat(follow_symlinks=False)
                except OSError as e:
                    raise ScanError(child, f"cannot stat: {e.strerror}") from e
            else:
                st = lstat_of(entry)
            kind = stat.S_IFMT(st.st_mode)
            if kind not in REPRESENTABLE:
                raise ScanError(child, f"file type {kind:#o} cannot be represented")
            if skip_devices and kind in (stat.S_IFCHR, stat.S_IFBLK):
                continue
            cnode = children[name] = self._entry(dfd, proc, name, child, st)
            if kind == stat.S_IFDIR:
                subdirs.append((name, cnode, st))
        subdirs.reverse()
        return subdirs

    def _entry(self, dfd: int, proc: bytes, name: bytes, path: bytes, st: os.stat_result) -> Node:
        """The node of entry ``name`` of the open directory ``dfd`` (``proc``: its /proc/self/fd path).

        A directory's children are not listed here.
        """
        kind = stat.S_IFMT(st.st_mode)
        hit = self._lookup(st)
        xattrs, pairs = self._xattrs(path, proc + name, hit)
        node = self._node(path, st, xattrs)
        data = None
        if kind == stat.S_IFREG:
            self._file(dfd, name, path, st, node, hit)
            data = node.content
        elif kind == stat.S_IFDIR:
            node.nlink = st.st_nlink
        elif kind == stat.S_IFLNK:
            if hit is not None and hit[2] is not None:
                node.payload = hit[2]
            else:
                try:
                    node.payload = os.readlink(name, dir_fd=dfd)
                except OSError as e:
                    raise ScanError(path, f"cannot read symlink: {e.strerror}") from e
            node.size = len(node.payload)
            data = node.payload
        if self.cache is not None:
            self._keep(st, hit, (node.digest, pairs, data))
        return node

    def _node(self, path: bytes, st: os.stat_result, xattrs: dict[bytes, bytes]) -> Node:
        if st.st_rdev > 0xFFFFFFFF:
            raise ScanError(path, f"device number {st.st_rdev:#x} does not fit in 32 bits")
        sec, nsec = (0, 0) if self.opts.use_epoch else divmod(st.st_mtime_ns, 1_000_000_000)
        self.stats.entries += 1
        return Node(
            mode=st.st_mode,
            uid=st.st_uid,
            gid=st.st_gid,
            nlink=1,
            rdev=st.st_rdev,
            size=st.st_size,
            mtime_sec=sec,
            mtime_nsec=nsec,
            xattrs=xattrs,
        )

    def _keep(self, st: os.stat_result, hit: Entry | None, entry: Entry) -> None:
        """Record what the scan now knows of an entry, unless the cache already has exactly that."""
        if self.cache is not None and entry != hit:
            self.cache.put(st, entry)

    def _xattrs(
        self, path: bytes, target: bytes | int, hit: Entry | None
    ) -> tuple[dict[bytes, bytes], tuple[tuple[bytes, bytes], ...] | None]:
        """The entry's xattrs as the options select them, and all of them for the cache.

        ``target`` is an fd, or a path whose last part is not followed.  The
        second value is None when they were not read (``skip_xattrs`` and no
        cached ones).
        """
        opts = self.opts
        if hit is not None and hit[1] is not None:
            pairs = hit[1]
        elif opts.skip_xattrs:
            return {}, None
        else:
            # Without a cache only the selected ones are read; the cache wants all of them.
            pairs = self._read_xattrs(path, target, opts.user_xattrs and self.cache is None)
        if not pairs or opts.skip_xattrs:
            return {}, pairs
        if opts.user_xattrs:
            return {n: v for n, v in pairs if n.startswith(b"user.")}, pairs
        return dict(pairs), pairs

    def _read_xattrs(
        self, path: bytes, target: bytes | int, only_user: bool
    ) -> tuple[tuple[bytes, bytes], ...]:
        follow = isinstance(target, int)
        try:
            names = os.listxattr(target, follow_symlinks=follow)
        except OSError as e:
            if e.errno in (errno.ENOTSUP, errno.EOPNOTSUPP):
                return ()
            raise ScanError(path, f"cannot list xattrs: {e.strerror}") from e
        if not names:
            return ()
        out = []
        for name in sorted(os.fsencode(n) for n in names):
            if only_user and not name.startswith(b"user."):
                continue
            try:
                out.append((name, os.getxattr(target, name, follow_symlinks=follow)))
            except OSError as e:
                if e.errno == errno.ENODATA:  # removed since it was listed
                    continue
                raise ScanError(path, f"cannot read xattr {os.fsdecode(name)}: {e.strerror}") from e
        return tuple(out)

    def _open(
        self, dfd: int, name: bytes, path: bytes, st: os.stat_result, flags: int
    ) -> tuple[int, os.stat_result]:
        """Open an entry relative to its directory; it must still be the file ``st`` describes.

        Returns the fd and its ``fstat``.
        """
        try:
            return open_as_listed(dfd, name, st, flags)
        except OSError as e:
            raise ScanError(path, f"cannot open: {e.strerror}") from e
        except EntryChanged:
            raise ScanError(path, "changed during the scan") from None

    def _file(
        self, dfd: int, name: bytes, path: bytes, st: os.stat_result, node: Node, hit: Entry | None
    ) -> None:
        self.stats.files += 1
        self.stats.bytes += st.st_size
        if st.st_size > INLINE_MAX:
            self.stats.external += 1
            if not self._known(hit, st, node):
                self._hash(dfd, name, path, st, node)
        elif st.st_size:
            if hit is not None and hit[2] is not None:
                node.content = hit[2]
            else:
                node.content = self._read_inline(dfd, name, path, st)
        if self.progress is not None:
            self.progress(self.stats)

    def _read_inline(self, dfd: int, name: bytes, path: bytes, st: os.stat_result) -> bytes:
        fd, _ = self._open(dfd, name, path, st, OPEN_FILE)
        try:
            data = os.pread(fd, INLINE_MAX + 1, 0)
        except OSError as e:
            raise ScanError(path, f"cannot read: {e.strerror}") from e
        finally:
            os.close(fd)
        if len(data) != st.st_size:
            raise ScanError(path, "changed during the scan")
        return data

    def _known(self, hit: Entry | None, st: os.stat_result, node: Node) -> bool:
        """Take the digest from the cache entry, or else from those hashed ahead for this very
        ``lstat``, if there is one and the store has its object (the file is then not opened)."""
        digest = hit[0] if hit is not None else None
        if digest is None:
            digest = self.prehashed.get(key_of(st))
        if digest is None or (self.store is not None and not self.store.claim(digest, st.st_size)):
            return False
        node.digest = digest
        node.payload = fsverity.object_path(digest).encode()
        return True

    def _hash(self, dfd: int, name: bytes, path: bytes, st: os.stat_result, node: Node) -> None:
        """Read and hash an external file; hand it to the store unless its object is there."""
        fd, opened = self._open(dfd, name, path, st, OPEN_FILE)
        digest = self.prehashed.get(key_of(opened))
        if digest is None:
            try:
                digest = fsverity.digest_fd(fd, opened.st_size)
            except (OSError, ValueError) as e:
                os.close(fd)
                raise ScanError(path, f"cannot hash: {e}") from e
        node.digest = digest
        node.payload = fsverity.object_path(digest).encode()
        if self.store is None or self.store.claim(digest, opened.st_size):
            os.close(fd)
        else:
            self._dispatch(_Job(fd, path, digest, opened))

    def _dispatch(self, job: _Job) -> None:
        """Run the job now (one thread) or add it to the chunk for the pool."""
        if self.pool is None:
            self._run_jobs([job])
            return
        self.chunk.append(job)
        self.chunk_bytes += job.opened.st_size
        if len(self.chunk) >= _CHUNK_FILES or self.chunk_bytes >= _CHUNK_BYTES:
            self._submit()

    def _submit(self) -> None:
        """Hand the chunk to the pool, first waiting for the oldest if enough are queued."""
        if not self.chunk:
            return
        assert self.pool is not None
        if len(self.inflight) >= self.threads * _CHUNKS_PER_THREAD:
            self.inflight.popleft()[0].result()
        jobs, self.chunk, self.chunk_bytes = self.chunk, [], 0
        self.inflight.append((self.pool.submit(self._run_jobs, jobs), jobs))

    def _run_jobs(self, jobs: list[_Job]) -> None:
        """Import each file; every job's fd is closed, also after a failure."""
        done = 0
        try:
            for job in jobs:
                done += 1
                try:
                    self._import(job)
                finally:
                    os.close(job.fd)
        finally:
            for job in jobs[done:]:
                os.close(job.fd)

    def _import(self, job: _Job) -> None:
        assert self.store is not None
        try:
            res = self.store.import_file(job.fd, job.digest, expect=job.opened)
        except OSError as e:  # the reason only: a Python errno repr or a temporary file's name says nothing
            raise ScanError(job.path, f"cannot store in the digest store: {e.strerror or e}") from e
        except ObjectStoreError as e:
            raise ScanError(job.path, f"cannot store: {e}") from e
        if res.created:
            self.created.add(job.digest)
