"""An overlayfs upper directory as a delta on an image's tree, and the merged tree it gives.

A writable composefs mount (``upperdir=``, ``workdir=``; always
``metacopy=on,redirect_dir=on``, see mount.py) keeps every change in its
upper directory, in overlayfs's own encoding. Scanned as plain files, that
encoding gives a wrong image with no error: a chmod-ed file would lose its
data, a deleted one come back as a device, a renamed directory come back
empty. :func:`read_upper` interprets it into a typed :class:`Delta`, and
:func:`apply` lays that delta over the base image's tree
(:func:`aptlayer.composefs.reader.read_image`), giving the tree that
``mkcomposefs`` would read from the merged view: the same image bytes,
having read only the files the upper directory holds data for.

What this kernel (6.18) writes into the upper directory, observed through
``aptlayer.mounts.mount(..., upperdir=, workdir=)`` on an image:

=====================================  ===================================================================
operation in the mount                 upper directory
=====================================  ===================================================================
new file, dir, symlink, fifo, device   the entry itself; a new directory inside a merged one also
                                       gets ``opaque=y`` (so do directories ``dpkg`` makes)
write, append, truncate, ``touch``     a full copy of the file (data copy-up) with ``origin``
chmod, chown, setxattr on a file       a metadata-only copy: the file's size, holes only,
                                       ``metacopy`` (empty value without verity), ``origin``,
                                       all xattrs copied; the data stays in the lower layer
rename of a base file                  the metacopy copy under the new name with ``redirect``: the
                                       old name relative to the directory (``ren``), or absolute
                                       (``/mvsrc/in``) across directories; a whiteout at the old name
hard link to a base file               both names one upper inode: metacopy, ``redirect=/path``
rename of a base directory             the directory with ``redirect`` (relative or absolute) and
                                       no children; a whiteout at the old name; renamed back, it
                                       keeps ``redirect`` to its own name
rm, rmdir, ``rm -r``                   a whiteout: a 0/0 character device, mode 0; one inode
                                       hard-linked for all whiteouts of the mount
directory removed and made again       the new directory with ``opaque=y``
any change below a base directory      the directory copied up with ``origin`` and ``impure=y``
the upper root                         ``uuid`` (at mount), ``impure``; the mount shows the upper
                                       root's own mode, owner, mtime and xattrs
write after a metacopy rename          the data copied up; ``metacopy`` goes, ``redirect`` stays
xattr ``trusted.overlay.X`` set, or    stored escaped as ``trusted.overlay.overlay.X``
copied up from the base
=====================================  ===================================================================

(All the xattr names above are ``trusted.overlay.*``; ``origin`` and ``uuid``
are file handles and ids of no use here.) So:

* a 0/0 character device is a whiteout: the base entry goes (overlayfs
  refuses to make such a device through the mount, so it is never a file);
* a directory with ``opaque=y`` hides the base's directory there; one with
  ``redirect`` merges with the base directory it names (an absolute path
  from the base root, or a name in the parent's lower directory), one with
  neither merges with the base directory of its own name, if any;
* a regular file with ``metacopy`` takes its metadata from the upper
  directory and its data (inline content, or object and digest) from the
  base file that ``redirect`` names, or else the one of its own name in the
  parent's lower directory: that is where its data lives (the lower erofs
  entry itself redirects into the data-only object layer);
* every other entry is new and complete: only those regular files are read
  (hashed, and imported into the digest store when over 64 bytes);
* every ``trusted.overlay.*`` xattr is overlayfs's own and is dropped, except
  the escaped ``trusted.overlay.overlay.X``, which the merged view shows as
  ``trusted.overlay.X`` (the writer escapes it again); other xattrs
  (``user.*``, ``security.capability``, ACLs) are kept;
* the merged tree is a scan's: every non-directory has its own inode with
  nlink 1, as ``mkcomposefs DIR`` gives it (base hard links are split).

The merged root takes the upper root's metadata, as the mount shows it:
:func:`prepare_upper` gives a new upper directory the base root's, so an
untouched upper directory gives back the base image.

The upper directory is read without following any symlink (every open is
relative to its parent's fd with ``O_NOFOLLOW``, and each opened entry must
be the one listed), and a malformed one (a relative redirect with a ``/``,
a metacopy file without base data or of another size, an entry type
composefs cannot hold) is refused with :class:`UpperError`. A base image
that itself holds whiteouts is outside this model: the merged view shows
those as empty regular files carrying overlay xattrs.
"""

from __future__ import annotations

import errno
import os
import stat
from dataclasses import dataclass, field

from aptlayer.linux.listed import EntryChanged, open_as_listed

from . import format as fmt
from . import fsverity
from .build import BuildError
from .lstatwalk import INLINE_MAX, OPEN_DIR, OPEN_FILE, REPRESENTABLE, ScanStats
from .objectstore import ObjectStore, ObjectStoreError
from .tree import Node

#: most levels of directories read below the upper root (one fd stays open per level)
MAX_DEPTH = 512
_OPAQUE = b"y"


class UpperError(BuildError):
    """The upper directory cannot be read or does not make sense over the base."""


@dataclass
class Whiteout:
    """The base entry at ``path`` is gone."""

    path: bytes


@dataclass
class Directory:
    """A directory of the upper layer: new (``opaque``), renamed (``redirect``), or changed inside."""

    path: bytes
    #: its metadata (no children)
    meta: Node
    opaque: bool
    redirect: bytes | None


@dataclass
class MetaCopy:
    """A file whose metadata changed, and maybe its name; its data stays in the base."""

    path: bytes
    #: its metadata, size included (no data)
    meta: Node
    redirect: bytes | None
    #: the fs-verity digest the metacopy xattr records (only with ``verity=``), else None
    digest: bytes | None = None


@dataclass
class Added:
    """An entry with everything of its own: a new or rewritten file, a symlink, a device..."""

    path: bytes
    node: Node


Change = Whiteout | Directory | MetaCopy | Added


@dataclass
class Delta:
    """What an upper directory changes: the root's metadata and the changes, parents first."""

    root: Node
    changes: list[Change] = field(default_factory=list)
    #: what reading it cost: entries, the regular files read and their bytes, objects
    stats: ScanStats = field(default_factory=ScanStats)


# --- reading an upper directory ------------------------------------------------------


def read_upper(upper: str | bytes | os.PathLike, store: ObjectStore | None = None) -> Delta:
    """The delta of the upper directory ``upper``; new files over 64 bytes go into ``store``.

    With a batch ``store``, what it staged is discarded if the reading fails;
    the caller syncs it otherwise.
    """
    reading = _Reading(store)
    try:
        return reading.run(os.fsencode(upper))
    except BaseException:
        if store is not None:
            store.discard()
        raise


class _Reading:
    def __init__(self, store: ObjectStore | None) -> None:
        self.store = store
        self.stats = ScanStats()
        self.created: set[bytes] = set()

    def run(self, upper: bytes) -> Delta:
        try:
            root_fd = os.open(upper, OPEN_DIR)
        except OSError as e:
            reason = "not a directory" if e.errno in (errno.ENOTDIR, errno.ELOOP) else e.strerror
            raise UpperError(f"upper directory {os.fsdecode(upper)}: {reason}") from e
        #: the directories being listed: (path, fd, the names left in reverse order)
        stack: list[tuple[bytes, int, list[bytes]]] = []
        try:
            st = os.fstat(root_fd)
            delta = Delta(self._meta(b"/", st, _clean(_xattrs(b"/", root_fd))), stats=self.stats)
            stack.append((b"", root_fd, _names(b"/", root_fd)))
            while stack:
                base, dfd, names = stack[-1]
                if not names:
                    os.close(stack.pop()[1])
                    continue
                name = names.pop()
                path = base + b"/" + name
                change, child_fd = self._entry(dfd, name, path)
                delta.changes.append(change)
                if child_fd is not None:
                    if len(stack) > MAX_DEPTH:
                        os.close(child_fd)
                        raise UpperError(f"{os.fsdecode(path)}: more than {MAX_DEPTH} levels deep")
                    stack.append((path, child_fd, _names(path, child_fd)))
        finally:
            for _, fd, _ in stack:
                os.close(fd)
        if self.store is not None:
            self.stats.objects_created = len(self.created)
            self.stats.objects_deduped = self.stats.external - len(self.created)
        return delta

    def _entry(self, dfd: int, name: bytes, path: bytes) -> tuple[Change, int | None]:
        """The change of one upper entry, and for a directory its open fd."""
        try:
            st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
        except OSError as e:
            raise UpperError(f"{os.fsdecode(path)}: cannot stat: {e.strerror}") from e
        kind = stat.S_IFMT(st.st_mode)
        if kind == stat.S_IFCHR and st.st_rdev == 0:
            return Whiteout(path), None
        if kind not in REPRESENTABLE:
            raise UpperError(f"{os.fsdecode(path)}: file type {kind:#o} cannot be represented")
        raw = _xattrs(path, f"/proc/self/fd/{dfd}/".encode() + name)
        node = self._meta(path, st, _clean(raw))
        if kind == stat.S_IFDIR:
            fd = _open(dfd, name, path, st, OPEN_DIR)
            return Directory(path, node, raw.get(fmt.XATTR_OPAQUE) == _OPAQUE, raw.get(fmt.XATTR_REDIRECT)), fd
        if kind == stat.S_IFREG and fmt.XATTR_METACOPY in raw:
            recorded = raw[fmt.XATTR_METACOPY]
            digest = recorded[4:] if len(recorded) == fmt.METACOPY_SIZE else None
            return MetaCopy(path, node, raw.get(fmt.XATTR_REDIRECT), digest), None
        if kind == stat.S_IFREG:
            self._read_file(dfd, name, path, st, node)
        elif kind == stat.S_IFLNK:
            try:
                node.payload = os.readlink(name, dir_fd=dfd)
            except OSError as e:
                raise UpperError(f"{os.fsdecode(path)}: cannot read symlink: {e.strerror}") from e
            node.size = len(node.payload)
        return Added(path, node), None

    def _meta(self, path: bytes, st: os.stat_result, xattrs: dict[bytes, bytes]) -> Node:
        """The node of an entry's metadata, as a scan takes it (nlink 1 but for directories)."""
        if st.st_rdev > 0xFFFFFFFF:
            raise UpperError(f"{os.fsdecode(path)}: device number {st.st_rdev:#x} does not fit in 32 bits")
        self.stats.entries += 1
        sec, nsec = divmod(st.st_mtime_ns, 1_000_000_000)
        return Node(mode=st.st_mode, uid=st.st_uid, gid=st.st_gid,
                    nlink=st.st_nlink if stat.S_ISDIR(st.st_mode) else 1,
                    rdev=st.st_rdev, size=st.st_size, mtime_sec=sec, mtime_nsec=nsec, xattrs=xattrs)

    def _read_file(self, dfd: int, name: bytes, path: bytes, st: os.stat_result, node: Node) -> None:
        """A new file's data: inline up to 64 bytes, else hashed (and imported into the store)."""
        self.stats.files += 1
        if not st.st_size:
            return
        self.stats.bytes += st.st_size
        fd = _open(dfd, name, path, st, OPEN_FILE)
        try:
            if st.st_size <= INLINE_MAX:
                node.content = os.pread(fd, INLINE_MAX + 1, 0)
                if len(node.content) != st.st_size:
                    raise UpperError(f"{os.fsdecode(path)}: changed while it was read")
                return
            self.stats.external += 1
            opened = os.fstat(fd)
            digest = fsverity.digest_fd(fd, st.st_size)
            node.digest = digest
            node.payload = fsverity.object_path(digest).encode()
            if self.store is not None and not self.store.claim(digest, st.st_size):
                if self.store.import_file(fd, digest, expect=opened).created:
                    self.created.add(digest)
        except (OSError, ValueError, ObjectStoreError) as e:
            raise UpperError(f"{os.fsdecode(path)}: cannot read: {e}") from e
        finally:
            os.close(fd)


def _names(path: bytes, dfd: int) -> list[bytes]:
    """The names in an open directory, in reverse byte order (popped from the end)."""
    try:
        return sorted((os.fsencode(n) for n in os.listdir(dfd)), reverse=True)
    except OSError as e:
        raise UpperError(f"{os.fsdecode(path)}: cannot read directory: {e.strerror}") from e


def _open(dfd: int, name: bytes, path: bytes, st: os.stat_result, flags: int) -> int:
    """Open an entry relative to its directory; it must be the one ``st`` describes."""
    try:
        return open_as_listed(dfd, name, st, flags)[0]
    except OSError as e:
        raise UpperError(f"{os.fsdecode(path)}: cannot open: {e.strerror}") from e
    except EntryChanged:
        raise UpperError(f"{os.fsdecode(path)}: changed while it was read") from None


def _xattrs(path: bytes, target: bytes | int) -> dict[bytes, bytes]:
    """Every xattr of an entry (an fd, or a path whose last part is not followed), by name."""
    follow = isinstance(target, int)
    try:
        names = os.listxattr(target, follow_symlinks=follow)
    except OSError as e:
        if e.errno in (errno.ENOTSUP, errno.EOPNOTSUPP):
            return {}
        raise UpperError(f"{os.fsdecode(path)}: cannot list xattrs: {e.strerror}") from e
    found = {}
    for name in sorted(os.fsencode(n) for n in names):
        try:
            found[name] = os.getxattr(target, name, follow_symlinks=follow)
        except OSError as e:
            if e.errno != errno.ENODATA:
                raise UpperError(f"{os.fsdecode(path)}: cannot read xattr {os.fsdecode(name)}: "
                                 f"{e.strerror}") from e
    return found


def _clean(xattrs: dict[bytes, bytes]) -> dict[bytes, bytes]:
    """The xattrs the merged view shows: overlayfs's own dropped, escaped ones unescaped."""
    shown = {}
    for name, value in xattrs.items():
        if name.startswith(fmt.OVERLAY_ESCAPED_PREFIX):
            shown[fmt.OVERLAY_PREFIX + name[len(fmt.OVERLAY_ESCAPED_PREFIX):]] = value
        elif not name.startswith(fmt.OVERLAY_PREFIX):
            shown[name] = value
    return shown


# --- laying a delta over a base tree -------------------------------------------------


def apply(base: Node, delta: Delta, dropped: list[Node] | None = None, *, split_links: bool = True) -> Node:
    """The merged tree: ``base`` (a tree from the reader, which this consumes) with ``delta`` over it.

    Entries the delta does not touch keep the base's nodes (their digests,
    payloads and inline data unread); ``base`` must not be used afterwards.
    The base nodes that the merged tree no longer shows at their own names
    (whited out, replaced, hidden below an opaque directory: the roots of
    those subtrees) are appended to ``dropped``: only what they hold can
    be gone from the base's objects. Without ``split_links``, base nodes
    are left in place, shared or hard-linked as they are (for
    :mod:`.relocate`, which checks that none is).
    """
    dropped = [] if dropped is None else dropped
    root = _with_meta(delta.root, Node())
    root.children = dict(base.children)
    merged: dict[bytes, Node] = {b"": root}
    #: the base directory each merged directory lays over (None: none, or hidden)
    lower: dict[bytes, Node | None] = {b"": base}
    for change in delta.changes:
        parent, _, name = change.path.rpartition(b"/")
        into = merged.get(parent)
        if into is None:
            raise UpperError(f"{os.fsdecode(change.path)}: parent not in the upper directory")
        under = lower[parent]
        was = into.children.get(name)
        if isinstance(change, Whiteout):
            into.children.pop(name, None)
        elif isinstance(change, Directory):
            found = None if change.opaque else _lookup(base, under, change.redirect or name, change.path)
            below = found if found is not None and found.is_dir else None
            node = into.children[name] = _with_meta(change.meta, Node())
            node.children = dict(below.children) if below is not None else {}
            merged[change.path], lower[change.path] = node, below
            if was is below:
                continue  # the same directory, its entries kept
        elif isinstance(change, MetaCopy):
            into.children[name] = _with_data(change, _lookup(base, under, change.redirect or name, change.path))
        else:
            into.children[name] = change.node
        if was is not None:
            dropped.append(was)
    if split_links:
        _split_links(root)
    return root


def _lookup(base: Node, under: Node | None, redirect: bytes, path: bytes) -> Node | None:
    """The base entry a name or redirect names: absolute from the base root, else in ``under``.

    As overlayfs looks it up: name by name, through directories only.
    """
    if redirect.startswith(b"/"):
        node: Node | None = base
        names = [n for n in redirect.split(b"/") if n]
    else:
        if b"/" in redirect or not redirect:
            raise UpperError(f"{os.fsdecode(path)}: invalid redirect {redirect!r}")
        node, names = under, [redirect]
    for name in names:
        if node is None or not node.is_dir:
            return None
        node = node.children.get(name)
    return None if node is None else node.resolve()


def _with_meta(meta: Node, node: Node) -> Node:
    """``node`` with the metadata of ``meta`` (not its data or children)."""
    node.mode, node.uid, node.gid, node.nlink, node.rdev = meta.mode, meta.uid, meta.gid, meta.nlink, meta.rdev
    node.size, node.mtime_sec, node.mtime_nsec = meta.size, meta.mtime_sec, meta.mtime_nsec
    node.xattrs = dict(meta.xattrs)
    return node


def _with_data(change: MetaCopy, data: Node | None) -> Node:
    """A metacopy file: its metadata from the upper directory, its data from the base file."""
    where = os.fsdecode(change.path)
    if data is None or not data.is_reg:
        raise UpperError(f"{where}: metadata-only copy without its data in the base"
                         f"{f' (redirect {change.redirect!r})' if change.redirect else ''}")
    if data.size != change.meta.size:
        raise UpperError(f"{where}: metadata-only copy of {change.meta.size} bytes over base data of {data.size}")
    if change.digest is not None and change.digest != data.digest:
        raise UpperError(f"{where}: metadata-only copy records another digest than its base data")
    node = _with_meta(change.meta, Node())
    node.payload, node.content, node.digest = data.payload, data.content, data.digest
    return node


def _split_links(root: Node) -> None:
    """Give every entry its own node, non-directories nlink 1: the tree a scan of the merged view gives.

    Base hard links, and a base subtree reached twice (a redirect whose
    source was not whited out), become copies.
    """
    seen: set[int] = {id(root)}
    stack = [root]
    while stack:
        parent = stack.pop()
        for name, child in parent.children.items():
            if child.link is not None or id(child) in seen:
                child = parent.children[name] = _copy(child.resolve())
            seen.add(id(child))
            if child.is_dir:
                stack.append(child)
            else:
                child.nlink = 1


def _copy(node: Node) -> Node:
    copy = _with_meta(node, Node())
    copy.payload, copy.content, copy.digest = node.payload, node.content, node.digest
    copy.children = dict(node.children)
    return copy


# --- a new upper directory ---------------------------------------------------------------


def prepare_upper(upper: str | bytes | os.PathLike, base_root: Node) -> None:
    """Give the (new, empty) upper directory the base root's owner, mode, xattrs and mtime.

    The mount shows the upper root's own metadata as its root's, so without
    this the new image's root would be the staging directory's.
    """
    fd = os.open(os.fsencode(upper), OPEN_DIR)
    try:
        os.fchown(fd, base_root.uid, base_root.gid)
        os.fchmod(fd, stat.S_IMODE(base_root.mode))
        for name, value in base_root.xattrs.items():
            os.setxattr(fd, _escaped(name), value)
        os.utime(fd, ns=(base_root.mtime_sec * 1_000_000_000 + base_root.mtime_nsec,) * 2)
    finally:
        os.close(fd)


def _escaped(name: bytes) -> bytes:
    """How overlayfs stores an xattr the merged view shows as ``name``."""
    if name.startswith(fmt.OVERLAY_PREFIX):
        return fmt.OVERLAY_ESCAPED_PREFIX + name[len(fmt.OVERLAY_PREFIX):]
    return name
