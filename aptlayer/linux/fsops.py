"""The file system mutations of apt-layer's store, in one place.

Every change the store makes to disk goes through these functions, so a
crash-safety test can record the exact sequence (the ALICE method: replay
each prefix with unsynced operations dropped or reordered, then check that
recovery copes).  Set ``recorder`` to a callable to receive ``(op, args)``
after each operation that succeeded (a failed one changed nothing); it is
None in normal runs, where each function costs one test on top of the
system call.

Operations on an fd are recorded with the fd's path (read from
``/proc/self/fd`` only while recording), since fd numbers mean nothing in a
replay.  Ops: create, write, clone, chmod, enable_verity, fsync, syncfs,
rename, link, mkdir, unlink, rmdir, symlink, utime.  ``syncfs`` is recorded with
the path of the fd it was given; it makes durable every file's data and
every directory entry of that file system.
"""

from __future__ import annotations

import errno
import fcntl
import os
from collections.abc import Callable
from typing import Any

Path = str | bytes

#: called as ``recorder(op, args)`` after each successful operation when set
recorder: Callable[[str, tuple[Any, ...]], None] | None = None

FICLONE = 0x40049409


def fd_path(fd: int) -> str:
    """The path an fd refers to, for messages and recordings."""
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return f"fd:{fd}"


def create(path: Path, mode: int = 0o600) -> int:
    """Create a new file that must not exist yet; returns a write-only fd."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW, mode)
    if recorder is not None:
        recorder("create", (path, mode))
    return fd


def write(fd: int, data: bytes | memoryview, offset: int) -> int:
    """``pwrite``: the fd's own offset is neither used nor moved."""
    n = os.pwrite(fd, data, offset)
    if recorder is not None:
        recorder("write", (fd_path(fd), offset, n))
    return n


def clone(src_fd: int, dst_fd: int) -> None:
    """Reflink the whole of ``src_fd`` into ``dst_fd`` (FICLONE); OSError if unsupported."""
    fcntl.ioctl(dst_fd, FICLONE, src_fd)
    if recorder is not None:
        recorder("clone", (fd_path(src_fd), fd_path(dst_fd)))


def copy_range(src_fd: int, dst_fd: int, count: int, offset: int) -> int:
    """``copy_file_range`` from ``offset`` in src to the same offset in dst."""
    n = os.copy_file_range(src_fd, dst_fd, count, offset, offset)
    if recorder is not None:
        recorder("write", (fd_path(dst_fd), offset, n))
    return n


def fchmod(fd: int, mode: int) -> None:
    os.fchmod(fd, mode)
    if recorder is not None:
        recorder("chmod", (fd_path(fd), mode))


def enable_verity(fd: int) -> bool:
    """``verity.enable`` (it makes the file immutable, so it counts as a change)."""
    from . import verity

    result = verity.enable(fd)
    if recorder is not None:
        recorder("enable_verity", (fd_path(fd),))
    return result


def fsync(fd: int) -> None:
    os.fsync(fd)
    if recorder is not None:
        recorder("fsync", (fd_path(fd),))


def syncfs(fd: int) -> None:
    """``syncfs(2)``: write back the whole file system ``fd`` is on, then commit it.

    One journal commit for any number of files, where an ``fsync`` per file
    costs one each.  Since Linux 5.8 it reports a writeback error that
    happened on the file system after ``fd`` was opened, so open ``fd``
    before writing the files it must cover.
    """
    import ctypes  # here, not at the top: the boot path (recover) never needs it

    if ctypes.CDLL(None, use_errno=True).syncfs(fd) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    if recorder is not None:
        recorder("syncfs", (fd_path(fd),))


def fsync_dir(path: Path) -> None:
    """Make the entries of a directory durable (new names, renames, removals)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    if recorder is not None:
        recorder("fsync", (path,))


def link(src: Path, dst: Path) -> None:
    """A new name ``dst`` (which must not exist) for the file ``src``; symlinks are not followed."""
    os.link(src, dst, follow_symlinks=False)
    if recorder is not None:
        recorder("link", (src, dst))


def rename(src: Path, dst: Path) -> None:
    os.rename(src, dst)
    if recorder is not None:
        recorder("rename", (src, dst))


def rename_at(src_fd: int, src: Path, dst_fd: int, dst: Path) -> None:
    """``renameat``: names relative to directory fds, so no symlink on the way to them is followed."""
    os.rename(src, dst, src_dir_fd=src_fd, dst_dir_fd=dst_fd)
    if recorder is not None:
        recorder("rename", (os.path.join(fd_path(src_fd), os.fsdecode(src)),
                            os.path.join(fd_path(dst_fd), os.fsdecode(dst))))


def unlink_at(dir_fd: int, name: Path) -> None:
    """``unlinkat``: remove the entry ``name`` of the directory open as ``dir_fd``."""
    os.unlink(name, dir_fd=dir_fd)
    if recorder is not None:
        recorder("unlink", (os.path.join(fd_path(dir_fd), os.fsdecode(name)),))


def mkdir(path: Path, mode: int = 0o755) -> None:
    os.mkdir(path, mode)
    if recorder is not None:
        recorder("mkdir", (path, mode))


def unlink(path: Path) -> None:
    os.unlink(path)
    if recorder is not None:
        recorder("unlink", (path,))


def rmdir(path: Path) -> None:
    os.rmdir(path)
    if recorder is not None:
        recorder("rmdir", (path,))


_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def open_dir(path: Path, dir_fd: int | None = None) -> int:
    """An fd of the directory ``path`` itself: OSError (ELOOP, ENOTDIR) if it is a symlink."""
    return os.open(path, _DIR_FLAGS, dir_fd=dir_fd)


def remove_tree(path: Path) -> None:
    """Remove a directory and everything under it, never following a symlink.

    ``path`` itself must be a directory, not a symlink to one (OSError
    otherwise: ELOOP or ENOTDIR, and nothing is removed). Below it, a
    symlink is removed as the link it is. Entries that vanish meanwhile are
    skipped; the parent is not fsynced (the caller does it once for all its
    removals).
    """
    parent, name = os.path.split(os.fspath(path).rstrip("/") if isinstance(path, str) else path.rstrip(b"/"))
    parent_fd = open_dir(parent or ".")
    try:
        remove_tree_at(parent_fd, name)
    finally:
        os.close(parent_fd)


def remove_tree_at(parent_fd: int, name: Path) -> None:
    """``remove_tree`` of the entry ``name`` of the directory open as ``parent_fd``.

    Every step is relative to an fd opened with O_NOFOLLOW, so a directory
    swapped for a symlink meanwhile makes the removal fail rather than reach
    outside the tree; a directory on another file system (a mount point)
    makes it fail too, rather than empty what is mounted there.
    """
    try:
        fd = open_dir(name, parent_fd)
    except FileNotFoundError:
        return
    try:
        if os.fstat(fd).st_dev != os.fstat(parent_fd).st_dev:
            raise OSError(errno.EBUSY, f"{fd_path(fd)} is a mount point: not removing across it")
        with os.scandir(fd) as it:
            entries = [(e.name, e.is_dir(follow_symlinks=False)) for e in it]
        for child, is_dir in entries:
            if is_dir:
                remove_tree_at(fd, child)
                continue
            try:
                os.unlink(child, dir_fd=fd)
            except FileNotFoundError:
                continue
            if recorder is not None:
                recorder("unlink", (os.path.join(fd_path(fd), child),))
    finally:
        os.close(fd)
    try:
        os.rmdir(name, dir_fd=parent_fd)
    except FileNotFoundError:
        return
    if recorder is not None:
        recorder("rmdir", (os.path.join(fd_path(parent_fd), os.fsdecode(name)),))


def symlink(target: Path, path: Path) -> None:
    os.symlink(target, path)
    if recorder is not None:
        recorder("symlink", (target, path))


def symlink_at(target: Path, dir_fd: int, name: Path) -> None:
    """``symlinkat``: a new link ``name`` in the directory open as ``dir_fd``."""
    os.symlink(target, name, dir_fd=dir_fd)
    if recorder is not None:
        recorder("symlink", (target, os.path.join(fd_path(dir_fd), os.fsdecode(name))))


def touch(path: Path) -> None:
    """Set a file's mtime to now without following a symlink."""
    os.utime(path, follow_symlinks=False)
    if recorder is not None:
        recorder("utime", (path,))


def write_file_atomic(path: str | os.PathLike, data: bytes, mode: int = 0o644) -> None:
    """Write ``path`` so that it is either absent/old or complete: never half-written.

    A temp file next to it is filled, fsynced and renamed over it; the
    directory is then fsynced so the new name survives a power loss.
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(directory, f".{os.path.basename(path)}.tmp-{os.getpid()}")
    fd = create(tmp, mode)
    try:
        view = memoryview(data)
        offset = 0
        while offset < len(view):
            offset += write(fd, view[offset:], offset)
        fchmod(fd, mode)
        fsync(fd)
    except BaseException:
        os.close(fd)
        os.unlink(tmp)
        raise
    os.close(fd)
    try:
        rename(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    fsync_dir(directory)
