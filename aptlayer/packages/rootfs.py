"""Reading files out of a root file system, a directory tree or a composefs image.

dpkg keeps its database at fixed paths of the root it manages, so reading a
package set means reading a few files of a root that is not ``/``. Both kinds
of root here resolve symbolic links *inside* the root, as a chroot would: an
absolute target starts again at the root and ``..`` stops there. A link in a
tree therefore never reaches the host, and an image is never mounted: it is
read with the composefs reader (:func:`~aptlayer.composefs.reader.read_path`),
which needs no privileges. A regular file of an image holds its content inline
(small files) or names a backing object by its payload (``xx/yyyy...``) under
the objects directory; an object is opened without following links, and its
size and fs-verity digest must match what the image records.

Roots are hostile input: every failure is one of the typed errors below,
subclasses of :mod:`aptlayer.errors`, never a traceback.
"""

from __future__ import annotations

import errno
import os
import stat

from aptlayer import errors
from aptlayer.composefs import fsverity
from aptlayer.composefs.reader import MAX_SYMLINK_HOPS, ImageFormatError, SymlinkLoopError, read_path
from aptlayer.composefs.tree import Node

#: largest file read (dpkg's status file of a big system is about 10 MiB)
MAX_FILE_SIZE = 256 << 20


class MissingFile(errors.NotFound):
    """The root has nothing at that path (or a component on the way is not a directory)."""


class NotAFile(errors.InvalidInput):
    """The path names something else than a regular file (a directory, a device, ...), or a huge one."""


class DamagedImage(errors.IntegrityError):
    """The image is malformed, or a backing object is missing or differs from the image's digest."""


def _oserror(e: OSError, where: str) -> errors.AptLayerError:
    if e.errno in (errno.ENOENT, errno.ENOTDIR):
        return MissingFile(f"{where}: no such file")
    if e.errno in (errno.EACCES, errno.EPERM):
        return errors.PermissionDenied(f"{where}: permission denied")
    return NotAFile(f"{where}: {e.strerror or e}")


class TreeRoot:
    """A root file system as a directory tree on the host (``/``, or a staged root)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)

    def __repr__(self) -> str:
        return f"TreeRoot({self.path!r})"

    def where(self, path: str) -> str:
        """``path`` as error messages name it."""
        return os.path.join(self.path, path.lstrip("/"))

    def _open(self, path: str, *, directory: bool) -> int:
        """An fd of ``path`` (a directory or a regular file as asked), links resolved inside the root."""
        try:
            trail = [os.open(self.path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)]
        except OSError as e:
            raise _oserror(e, self.path) from None
        pending = path.split("/")[::-1]
        hops = 0
        try:
            while pending:
                name = pending.pop()
                if name in ("", "."):
                    continue
                if name == "..":
                    if len(trail) > 1:
                        os.close(trail.pop())
                    continue
                st = os.stat(name, dir_fd=trail[-1], follow_symlinks=False)
                if stat.S_ISLNK(st.st_mode):
                    hops += 1
                    if hops > MAX_SYMLINK_HOPS:
                        raise NotAFile(f"{self.where(path)}: more than {MAX_SYMLINK_HOPS} symbolic links")
                    target = os.readlink(name, dir_fd=trail[-1])
                    if target.startswith("/"):
                        while len(trail) > 1:
                            os.close(trail.pop())
                    pending.extend(target.split("/")[::-1])
                elif stat.S_ISDIR(st.st_mode):
                    trail.append(os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                                         dir_fd=trail[-1]))
                elif pending:
                    raise MissingFile(f"{self.where(path)}: no such file")  # ENOTDIR, also for "file/"
                else:
                    if directory or not stat.S_ISREG(st.st_mode):
                        break
                    # O_NONBLOCK: a FIFO swapped in since the stat does not hang the open.
                    fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                                 dir_fd=trail[-1])
                    if not stat.S_ISREG(os.fstat(fd).st_mode):
                        os.close(fd)
                        break
                    return fd
            else:
                if directory:
                    return trail.pop()
            kind = "a directory" if directory else "a regular file"
            raise NotAFile(f"{self.where(path)}: not {kind}")
        except OSError as e:
            raise _oserror(e, self.where(path)) from None
        finally:
            for fd in trail:
                os.close(fd)

    def read_file(self, path: str) -> bytes:
        """The bytes of the regular file at ``path`` (relative to the root or absolute in it)."""
        fd = self._open(path, directory=False)
        try:
            return _read_fd(fd, self.where(path))
        finally:
            os.close(fd)

    def read_dir_files(self, path: str, suffix: str) -> dict[str, bytes]:
        """Name -> bytes of the files in directory ``path`` whose names end in ``suffix``.

        An absent directory has none; an entry that is a link is resolved in
        the root, and one that is not a regular file raises :class:`NotAFile`.
        """
        try:
            dfd = self._open(path, directory=True)
        except MissingFile:
            return {}
        found: dict[str, bytes] = {}
        try:
            for name in os.listdir(dfd):
                if not name.endswith(suffix):
                    continue
                full = f"{path.rstrip('/')}/{name}"
                try:
                    fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dfd)
                except OSError as e:
                    if e.errno != errno.ELOOP:
                        raise _oserror(e, self.where(full)) from None
                    found[name] = self.read_file(full)
                    continue
                try:
                    if not stat.S_ISREG(os.fstat(fd).st_mode):
                        raise NotAFile(f"{self.where(full)}: not a regular file")
                    found[name] = _read_fd(fd, self.where(full))
                finally:
                    os.close(fd)
        finally:
            os.close(dfd)
        return found


def _read_fd(fd: int, where: str) -> bytes:
    data = bytearray()
    while len(data) <= MAX_FILE_SIZE:
        chunk = os.read(fd, 1 << 20)
        if not chunk:
            return bytes(data)
        data += chunk
    raise NotAFile(f"{where}: more than the {MAX_FILE_SIZE} bytes read at most")


class ImageRoot:
    """A root file system as a composefs image file and the objects directory it draws on."""

    def __init__(self, image: str | os.PathLike[str], objects: str | os.PathLike[str]) -> None:
        self.image = os.fspath(image)
        self.objects = os.fspath(objects)
        try:
            with open(self.image, "rb") as f:
                self._data = f.read()
        except OSError as e:
            raise _oserror(e, self.image) from None

    def __repr__(self) -> str:
        return f"ImageRoot({self.image!r}, {self.objects!r})"

    def where(self, path: str) -> str:
        """``path`` as error messages name it."""
        return f"{self.image}:/{path.lstrip('/')}"

    def _lookup(self, path: str) -> Node | None:
        try:
            return read_path(self._data, os.fsencode(path))
        except SymlinkLoopError as e:
            raise NotAFile(f"{self.where(path)}: {e}") from None
        except ImageFormatError as e:
            raise DamagedImage(f"{self.where(path)}: {e}") from None

    def read_file(self, path: str) -> bytes:
        """The bytes of the regular file at ``path`` in the image."""
        node = self._lookup(path)
        if node is None:
            raise MissingFile(f"{self.where(path)}: no such file")
        return self._content(node, path)

    def read_dir_files(self, path: str, suffix: str) -> dict[str, bytes]:
        """Name -> bytes of the files in directory ``path`` whose names end in ``suffix`` (see TreeRoot)."""
        directory = self._lookup(path)
        if directory is None:
            return {}
        if not directory.is_dir:
            raise NotAFile(f"{self.where(path)}: not a directory")
        wanted = os.fsencode(suffix)
        found: dict[str, bytes] = {}
        for raw, child in directory.children.items():
            if not raw.endswith(wanted):
                continue
            name = os.fsdecode(raw)
            full = f"{path.rstrip('/')}/{name}"
            node = child.resolve()
            found[name] = self._content(node, full) if node.is_reg else self.read_file(full)
        return found

    def _content(self, node: Node, path: str) -> bytes:
        if not node.is_reg:
            raise NotAFile(f"{self.where(path)}: not a regular file")
        if node.size > MAX_FILE_SIZE:
            raise NotAFile(f"{self.where(path)}: {node.size} bytes, more than the {MAX_FILE_SIZE} read at most")
        if node.content is not None:
            data = node.content
        elif node.payload is not None:
            data = self._object(node.payload, node.size, path)
        elif node.size == 0:
            data = b""
        else:
            raise DamagedImage(f"{self.where(path)}: {node.size} bytes but no content and no backing object")
        if len(data) != node.size:
            raise DamagedImage(f"{self.where(path)}: {len(data)} bytes where the image says {node.size}")
        if node.digest is not None and fsverity.digest_bytes(data) != node.digest:
            raise DamagedImage(f"{self.where(path)}: content differs from the image's fs-verity digest")
        return data

    def _object(self, payload: bytes, size: int, path: str) -> bytes:
        """The backing object ``payload`` names, opened beneath the objects directory only."""
        parts = payload.split(b"/")
        shown = f"{self.where(path)}: backing object {os.fsdecode(payload)!r}"
        if payload.startswith(b"/") or any(p in (b"", b".", b"..") for p in parts):
            raise DamagedImage(f"{shown} is not a path below the objects directory")
        fd = -1
        try:
            fd = os.open(self.objects, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            for i, part in enumerate(parts):
                last = i == len(parts) - 1
                flags = os.O_NONBLOCK if last else os.O_DIRECTORY
                parent, fd = fd, -1
                try:
                    fd = os.open(part, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | flags, dir_fd=parent)
                finally:
                    os.close(parent)
        except OSError as e:
            if fd >= 0:
                os.close(fd)
            if e.errno in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP):
                raise DamagedImage(f"{shown} is missing under {self.objects}") from None
            raise _oserror(e, f"{self.objects}/{os.fsdecode(payload)}") from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_size != size:
                raise DamagedImage(f"{shown} is not a regular file of {size} bytes")
            return _read_fd(fd, shown)
        finally:
            os.close(fd)
