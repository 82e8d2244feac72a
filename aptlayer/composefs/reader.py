"""Reading composefs images back into :class:`~aptlayer.composefs.tree.Node` trees.

The reader follows the rules of upstream ``composefs-info`` 1.0.8 so that a
tree printed by ``dumpfile.format_dump`` or ``listing`` matches the C tool byte
for byte:

* compact inodes take their mtime from the superblock's build time;
* character devices with device number 0 are the writer's whiteout stubs and
  are left out; escaped whiteouts (regular files) are turned back into them;
* the first depth-first occurrence of an inode, in dirent order, is the
  original and every later one becomes a hard-link node;
* the overlayfs xattrs the writer adds are stripped or unescaped, and xattrs
  keep the stored order: inline entries first, then shared references.

Images are hostile input: the reader sees them through
:class:`~aptlayer.composefs.imageview.ImageView`, which checks every offset
and size, bounds the walk and budgets the bytes read by the size of the
file. Every defect raises :class:`ImageFormatError`.
"""

from __future__ import annotations

import contextlib
import gc
import os
import stat
from collections.abc import Collection, Iterator

from . import format as fmt
from .imageview import ImageFormatError, ImageView, InodeView, guarded
from .tree import Node


class UnsafeRedirect(ImageFormatError):
    """An overlay redirect that could reach outside the object directories (:func:`check_redirects`)."""


class SymlinkLoopError(ImageFormatError):
    """A path lookup met more than :data:`MAX_SYMLINK_HOPS` symbolic links (``ELOOP``)."""


#: longest symlink target (PATH_MAX - 1)
MAX_SYMLINK_TARGET = 4095
#: largest inline content of a regular file (the C library refuses more)
MAX_INLINE_CONTENT = 5000
#: symbolic links :func:`read_path` follows in one lookup (the kernel's limit)
MAX_SYMLINK_HOPS = 40

_S_IFMT = 0o170000
# Hot-path copies of format constants (a module global is cheaper than an attribute).
_S_IFDIR = stat.S_IFDIR
_S_IFREG = stat.S_IFREG
_S_IFLNK = stat.S_IFLNK
_S_IFCHR = stat.S_IFCHR
_S_IFBLK = stat.S_IFBLK
_LAYOUT_CHUNK_BASED = fmt.LAYOUT_CHUNK_BASED
_XATTR_REDIRECT = fmt.XATTR_REDIRECT
_XATTR_METACOPY = fmt.XATTR_METACOPY
_METACOPY_SIZE = fmt.METACOPY_SIZE
_OVERLAY_PREFIXES = (fmt.OVERLAY_PREFIX, fmt.USER_OVERLAY_PREFIX)
#: overlay markers the C reader drops wherever they appear
_DROPPED_XATTRS = frozenset(
    (fmt.XATTR_ESCAPED_WHITEOUTS, fmt.XATTR_USER_WHITEOUT, fmt.XATTR_USER_WHITEOUTS)
)
_UNESCAPE_KEEP = len(b"trusted.")
_UNESCAPE_DROP = len(fmt.OVERLAY_PREFIX)


# --- from inodes to nodes ---------------------------------------------------------


def _apply_overlay_xattr(node: Node, name: bytes, value: bytes) -> None:
    """Apply one stored ``trusted.overlay.*``/``user.overlay.*`` xattr the way composefs-info does.

    The overlayfs xattrs the writer adds become node fields or are dropped;
    escaped ``trusted.overlay.overlay.*`` names are unescaped. The file type is
    checked at each step because an escaped whiteout turns the regular file
    into a character device part way through the list.
    """
    is_reg = node.mode & _S_IFMT == _S_IFREG
    if name == _XATTR_REDIRECT:
        if is_reg:
            # The C reader over-reads one byte here; the payload is value[1:].
            # Like its string copy, the payload ends at a NUL.
            payload = value[1:] if len(value) > 1 and value[:1] == b"/" else value
            node.payload = payload.partition(b"\0")[0]
    elif name == _XATTR_METACOPY:
        if is_reg and len(value) == _METACOPY_SIZE:
            node.digest = value[4:]
    elif name == fmt.XATTR_ESCAPED_WHITEOUT and is_reg:
        node.mode = stat.S_IFCHR | stat.S_IMODE(node.mode)
        node.rdev = 0
        node.size = 0
        if node.content is not None:
            # composefs-info keeps the content but prints it with the new size 0.
            node.content = b""
    elif name in _DROPPED_XATTRS:
        pass
    elif name.startswith(fmt.OVERLAY_ESCAPED_PREFIX):
        node.xattrs[name[:_UNESCAPE_KEEP] + name[_UNESCAPE_DROP:]] = value
    elif not name.startswith(fmt.OVERLAY_PREFIX):
        node.xattrs[name] = value


def make_node(image: ImageView, ino: InodeView) -> Node:
    ftype = ino.ftype
    rdev = ino.u if ftype == _S_IFCHR or ftype == _S_IFBLK else 0
    # Positional, in Node's field order (mode, uid, gid, nlink, rdev, size,
    # mtime_sec, mtime_nsec): measurably faster on large images.
    node = Node(ino.mode, ino.uid, ino.gid, ino.nlink, rdev, ino.size, ino.mtime_sec, ino.mtime_nsec)
    if ftype == _S_IFREG:
        if ino.size and ino.layout != _LAYOUT_CHUNK_BASED:
            if ino.size > MAX_INLINE_CONTENT:
                raise ImageFormatError(f"inode {ino.nid}: {ino.size} bytes of inline content")
            node.content = image.content(ino)
    elif ftype == _S_IFLNK:
        if not 0 < ino.size <= MAX_SYMLINK_TARGET:
            raise ImageFormatError(f"inode {ino.nid}: symlink target of {ino.size} bytes")
        target = image.content(ino)
        if b"\0" in target:
            raise ImageFormatError(f"inode {ino.nid}: NUL in symlink target")
        node.payload = target
    if ino.xattr_size:
        xattrs = node.xattrs
        for name, value in image.xattrs(ino):
            if name.startswith(_OVERLAY_PREFIXES):
                _apply_overlay_xattr(node, name, value)
            else:
                xattrs[name] = value
    return node


def _load(data: bytes | bytearray | memoryview | str | os.PathLike[str]) -> bytes:
    if isinstance(data, (str, os.PathLike)):
        with open(data, "rb") as f:
            return f.read()
    return bytes(data)


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    """Pause the cyclic garbage collector while a tree is built.

    A tree holds no reference cycles, yet the allocations of a large one set
    off collections that traverse it again and again for nothing (about a
    fifth of the reading time on a 64,000-entry image).
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def read_image(
    data: bytes | bytearray | memoryview | str | os.PathLike[str],
    *,
    filters: Collection[bytes] | None = None,
) -> Node:
    """Read an image (bytes, or a path to one) into a tree; return its root.

    ``filters`` keeps only the named root-level entries and, like
    ``composefs-info --filter``, applies while reading: a hard link whose
    first occurrence is filtered out becomes the original.

    Raises:
        ImageFormatError: the image is malformed, truncated or hostile.
        OSError: ``data`` is a path that cannot be read.
    """
    return _read_tree(_load(data), None if filters is None else frozenset(filters))


@guarded
def _read_tree(data: bytes, filters: frozenset[bytes] | None) -> Node:
    with _gc_paused():
        return _build_tree(ImageView(data), filters)


def _build_tree(image: ImageView, filters: frozenset[bytes] | None, top: int | None = None) -> Node:
    by_nid: dict[int, Node] = {}
    #: ``open_dirs[d]``: the children of the last directory met at depth ``d``,
    #: which in a pre-order walk is the parent of any entry at depth ``d + 1``
    open_dirs: list[dict[bytes, Node]] = []
    for depth, name, nid, ino in image.walk(filters, top):
        if ino is None:
            open_dirs[depth - 1][name] = Node.hardlink(by_nid[nid])
            continue
        node = by_nid[nid] = make_node(image, ino)
        if depth:
            open_dirs[depth - 1][name] = node
        if ino.ftype == _S_IFDIR:
            open_dirs[depth:] = (node.children,)
    return by_nid[image.root_nid if top is None else top]


def read_root(data: bytes | bytearray | memoryview | str | os.PathLike[str]) -> Node:
    """The image's root directory alone, without its entries (its owner, mode, times, xattrs)."""
    return _read_root(_load(data))


@guarded
def _read_root(data: bytes) -> Node:
    image = ImageView(data)
    return make_node(image, image.inode(image.root_nid))


def read_path(
    data: bytes | bytearray | memoryview | str | os.PathLike[str],
    path: bytes,
    *,
    follow_symlinks: bool = True,
) -> Node | None:
    """The entry at ``path`` in an image (bytes, or a path to one), or None if it has none.

    Reads only the directories on the way and the entry itself, with its
    subtree when it is a directory (hard links inside it as
    :func:`read_image` would give them with the entry as root). Symbolic
    links on the way, and at the end with ``follow_symlinks``, are resolved
    inside the image as in a chroot: an absolute target starts again at the
    image's root and ``..`` never climbs above it, so a hostile link cannot
    name anything outside. A component that is not a directory makes the
    path absent, as ``ENOTDIR`` would.

    Raises:
        ImageFormatError: the image is malformed or hostile.
        SymlinkLoopError: (an ImageFormatError) the lookup meets more than
            :data:`MAX_SYMLINK_HOPS` symbolic links.
        OSError: ``data`` is a path that cannot be read.
    """
    return _read_path(_load(data), path, follow_symlinks)


@guarded
def _read_path(data: bytes, path: bytes, follow_symlinks: bool) -> Node | None:
    nid = _lookup(ImageView(data), path, follow_symlinks)
    if nid is None:
        return None
    # The lookup read each directory on the way once; the subtree is read
    # through a view of its own, with a budget of its own, so a lookup plus
    # a walk reads at most twice the file.
    with _gc_paused():
        return _build_tree(ImageView(data), None, nid)


def _lookup(image: ImageView, path: bytes, follow_symlinks: bool) -> int | None:
    """The nid that ``path`` names, symlinks resolved inside the image; None if absent.

    Resolution works as in a chroot: an absolute target starts again at the
    root and ``..`` stops there. Each directory is read once (its entries
    are kept), so the view's budget bounds a lookup as it bounds a walk.
    """
    root = image.root_nid
    trail = [root]  # the nids from the root down to the entry reached so far
    pending = path.split(b"/")[::-1]  # components left, the next one last
    entries: dict[int, dict[bytes, int]] = {}
    hops = 0
    while pending:
        name = pending.pop()
        parent = image.inode(trail[-1])
        if parent.ftype != _S_IFDIR:
            return None  # ENOTDIR, also for "file/" and "file/."
        if name in (b"", b"."):
            continue
        if name == b"..":
            if len(trail) > 1:
                trail.pop()
            continue
        if parent.nid not in entries:
            entries[parent.nid] = dict(image.dir_entries(parent))
        nid = entries[parent.nid].get(name)
        if nid is None:
            return None
        ino = image.inode(nid)
        if ino.ftype == _S_IFCHR and ino.u == 0:
            return None  # a whiteout stub is not an entry
        if ino.ftype == _S_IFLNK and (pending or follow_symlinks):
            hops += 1
            if hops > MAX_SYMLINK_HOPS:
                raise SymlinkLoopError(f"{path!r}: more than {MAX_SYMLINK_HOPS} symbolic links")
            if not 0 < ino.size <= MAX_SYMLINK_TARGET:
                raise ImageFormatError(f"inode {nid}: symlink target of {ino.size} bytes")
            target = image.content(ino)
            if target.startswith(b"/"):
                del trail[1:]
            pending.extend(target.split(b"/")[::-1])
            continue
        trail.append(nid)
    return trail[-1]


def image_objects(
    data: bytes | bytearray | memoryview | str | os.PathLike[str],
    *,
    filters: Collection[bytes] | None = None,
) -> list[bytes]:
    """The backing-object payloads (``xx/yyyy...``) an image references, sorted and unique.

    Equal to what ``composefs-info objects`` prints, without building the tree:
    only regular files' xattrs are decoded.

    Raises:
        ImageFormatError: the image is malformed, truncated or hostile.
    """
    return _collect_objects(_load(data), None if filters is None else frozenset(filters))


@guarded
def _collect_objects(data: bytes, filters: frozenset[bytes] | None) -> list[bytes]:
    image = ImageView(data)
    objects: set[bytes] = set()
    for _depth, _name, _nid, ino in image.walk(filters):
        if ino is None or ino.ftype != stat.S_IFREG or not ino.xattr_size:
            continue
        node = Node(mode=ino.mode)
        for name, value in image.xattrs(ino):
            if name.startswith(_OVERLAY_PREFIXES):
                _apply_overlay_xattr(node, name, value)
        if node.payload is not None and stat.S_ISREG(node.mode):
            objects.add(node.payload)
    return sorted(objects)


def check_redirects(data: bytes | bytearray | memoryview | str | os.PathLike[str]) -> int:
    """Refuse an image whose overlay redirects could reach outside the object directories.

    overlayfs follows ``trusted.overlay.redirect`` to find a file's data in
    the basedirs: a hostile image could name ``/../../etc/shadow`` or an
    absolute path of its own making. Every redirect must be on a regular
    file and name a path below the basedir: non-empty components, none of
    them ``.`` or ``..``. Returns how many redirects were checked.

    Raises:
        UnsafeRedirect: a redirect breaks the rule.
        ImageFormatError: the image is malformed.
    """
    return _check_redirects(_load(data))


@guarded
def _check_redirects(data: bytes) -> int:
    image = ImageView(data)
    checked = 0
    for _depth, name, nid, ino in image.walk(None):
        if ino is None or not ino.xattr_size:
            continue
        for xname, value in image.xattrs(ino):
            if xname != _XATTR_REDIRECT:
                continue
            checked += 1
            what = f"inode {nid} ({name.decode(errors='replace') or '/'})"
            if ino.ftype != _S_IFREG:
                raise UnsafeRedirect(f"{what}: an overlay redirect on something other than a regular file "
                                       "(composefs images only redirect files to their objects)")
            target = value.partition(b"\0")[0]
            parts = target.removeprefix(b"/").split(b"/")
            if any(p in (b"", b".", b"..") for p in parts):
                raise UnsafeRedirect(f"{what}: overlay redirect {target.decode(errors='replace')!r} does not "
                                       "name a path below the object directories (empty, '.' or '..' part)")
    return checked
