"""Opening a path below a directory fd without ever following a symlink: ``openat2(2)``.

``open_beneath(dir_fd, "images/objects")`` resolves every component of the
path relative to ``dir_fd`` and fails (ELOOP, EXDEV) rather than follow a
symlink or leave the directory: the kernel's RESOLVE_BENEATH |
RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS, checked during the one lookup,
so nothing can be swapped between a check and the open. Kernels before 5.6
lack openat2 (ENOSYS); there each component is opened in turn with
O_NOFOLLOW relative to the last, which refuses symlinks just as well (a
component swapped for one makes that step fail). Absolute paths and ``..``
are refused before any system call.
"""

from __future__ import annotations

import ctypes
import errno
import os

#: openat2's number, the same on every architecture (added after the syscall tables were unified)
SYS_OPENAT2 = 437
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_NO_SYMLINKS = 0x04
RESOLVE_BENEATH = 0x08


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


_libc = None
#: None until tried; then whether the kernel has openat2
_have_openat2: bool | None = None


def _syscall():
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
        _libc.syscall.restype = ctypes.c_long
    return _libc.syscall


def _check(path: str | bytes) -> bytes:
    raw = os.fsencode(path)
    parts = raw.split(b"/")
    if raw.startswith(b"/") or b".." in parts or not raw:
        raise OSError(errno.EXDEV, "not a path below the directory", os.fsdecode(raw))
    return raw


def open_beneath(dir_fd: int, path: str | bytes, flags: int = os.O_RDONLY | os.O_DIRECTORY, mode: int = 0) -> int:
    """An fd of ``path`` below ``dir_fd``, no component of which may be a symlink (OSError otherwise)."""
    global _have_openat2
    raw = _check(path)
    flags |= os.O_CLOEXEC
    if _have_openat2 is not False:
        how = _OpenHow(flags, mode, RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS)
        fd = _syscall()(ctypes.c_long(SYS_OPENAT2), ctypes.c_int(dir_fd), ctypes.c_char_p(raw),
                        ctypes.byref(how), ctypes.c_size_t(ctypes.sizeof(how)))
        if fd >= 0:
            _have_openat2 = True
            return fd
        err = ctypes.get_errno()
        if err not in (errno.ENOSYS, errno.EPERM) or _have_openat2:  # EPERM: a seccomp filter refusing it
            raise OSError(err, os.strerror(err), os.fsdecode(raw))
        _have_openat2 = False
    return _open_walking(dir_fd, raw, flags, mode)


def _open_walking(dir_fd: int, raw: bytes, flags: int, mode: int) -> int:
    """``open_beneath`` one component at a time, each with O_NOFOLLOW."""
    parts = [p for p in raw.split(b"/") if p and p != b"."]
    current = dir_fd
    try:
        for part in parts[:-1]:
            step = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=current)
            if current != dir_fd:
                os.close(current)
            current = step
        last = parts[-1] if parts else b"."
        return os.open(last, flags | os.O_NOFOLLOW, mode, dir_fd=current)
    finally:
        if current != dir_fd:
            os.close(current)


def open_dir_beneath(dir_fd: int, path: str | bytes) -> int:
    """``open_beneath`` of a directory."""
    return open_beneath(dir_fd, path, os.O_RDONLY | os.O_DIRECTORY)


def force_fallback(value: bool | None) -> None:
    """Tests: None to probe the kernel again, False to use the O_NOFOLLOW walk."""
    global _have_openat2
    _have_openat2 = value
