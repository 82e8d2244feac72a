"""The kernel's mount system calls, through ctypes.

The new mount API (Linux 5.2+): ``fsopen`` makes a file system context,
``fsconfig`` sets its parameters one by one (the kernel explains a refusal
in messages read from the context fd), ``fsmount`` makes a detached mount
of it, ``mount_setattr`` changes a detached mount (an idmap) and
``move_mount`` attaches it at a path.  The legacy ``mount(2)`` with its
option string and ``umount2(2)`` serve older kernels and unmounting.

Every call raises ``OSError`` with the kernel's errno; ENOSYS also where the
syscall numbers of this architecture are not known.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import struct

#: Most architectures share the generic numbers of the new mount API
#: (open_tree 428 ... mount_setattr 442); alpha is offset by 110.
_GENERIC_ARCHES = frozenset(
    {"x86_64", "aarch64", "arm64", "i386", "i686", "armv7l", "armv8l", "riscv64",
     "ppc64le", "ppc64", "s390x", "loongarch64"}
)
_ARCH_OFFSET = {"alpha": 110}
_NR = {"move_mount": 429, "fsopen": 430, "fsconfig": 431, "fsmount": 432, "mount_setattr": 442}

FSOPEN_CLOEXEC = 0x1
FSMOUNT_CLOEXEC = 0x1
FSCONFIG_SET_FLAG = 0
FSCONFIG_SET_STRING = 1
FSCONFIG_SET_FD = 5
FSCONFIG_CMD_CREATE = 6
MOUNT_ATTR_RDONLY = 0x1
MOUNT_ATTR_NOSUID = 0x2
MOUNT_ATTR_NODEV = 0x4
MOUNT_ATTR_IDMAP = 0x100000
MOVE_MOUNT_F_EMPTY_PATH = 0x4
AT_FDCWD = -100
AT_EMPTY_PATH = 0x1000
MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MNT_DETACH = 0x2

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


def _check(ret: int) -> int:
    if ret < 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))
    return ret


def _carg(a: int | bytes | ctypes.Array[ctypes.c_char] | None) -> object:
    """A syscall argument; ints widened to long, as the variadic syscall() reads them."""
    if isinstance(a, int):
        return ctypes.c_long(a)
    if isinstance(a, ctypes.Array):
        return a
    return ctypes.c_char_p(a)


def _syscall(name: str, *args: int | bytes | ctypes.Array[ctypes.c_char] | None) -> int:
    """Call a mount-API syscall by name; OSError(ENOSYS) where its number is unknown."""
    machine = platform.machine()
    if machine not in _GENERIC_ARCHES and machine not in _ARCH_OFFSET:
        raise OSError(errno.ENOSYS, f"mount API syscall numbers unknown on {machine}")
    nr = _NR[name] + _ARCH_OFFSET.get(machine, 0)
    return _check(_libc.syscall(ctypes.c_long(nr), *(_carg(a) for a in args)))


def move_mount(mnt: int, target: str) -> None:
    """Attach the detached mount ``mnt`` (an fd from ``fsmount``) at the path ``target``."""
    _syscall("move_mount", mnt, b"", AT_FDCWD, os.fsencode(target), MOVE_MOUNT_F_EMPTY_PATH)


def set_idmap(mnt: int, userns: int) -> None:
    """Make a detached mount idmapped with the mapping of a user namespace (an fd of ``/proc/PID/ns/user``)."""
    attr = ctypes.create_string_buffer(struct.pack("<QQQQ", MOUNT_ATTR_IDMAP, 0, 0, userns), 32)
    _syscall("mount_setattr", mnt, b"", AT_EMPTY_PATH, attr, 32)


def set_attrs(target: str, attrs: int) -> None:
    """``mount_setattr(2)``: set ``MOUNT_ATTR_*`` flags (nosuid, nodev...) on the mount at ``target``."""
    attr = ctypes.create_string_buffer(struct.pack("<QQQQ", attrs, 0, 0, 0), 32)
    _syscall("mount_setattr", AT_FDCWD, os.fsencode(target), 0, attr, 32)


def legacy_mount(source: str, target: str, fstype: str, flags: int, data: str) -> None:
    """``mount(2)``: ``flags`` are ``MS_*``, ``data`` the file system's option string."""
    _check(_libc.mount(os.fsencode(source), os.fsencode(target), fstype.encode(),
                       ctypes.c_ulong(flags), os.fsencode(data)))


def umount(target: str, flags: int = 0) -> None:
    """``umount2(2)`` of the topmost mount at ``target``; ``MNT_DETACH`` unmounts it even while busy."""
    _check(_libc.umount2(os.fsencode(target), ctypes.c_int(flags)))


class FsContext:
    """An ``fsopen`` file system context: set parameters, create, mount detached.

    The caller closes it; the mount it made lives on.
    """

    def __init__(self, fstype: str) -> None:
        self.fd = _syscall("fsopen", fstype.encode(), FSOPEN_CLOEXEC)

    def close(self) -> None:
        os.close(self.fd)

    def _config(self, cmd: int, key: str | None, value: bytes | None, aux: int) -> None:
        _syscall("fsconfig", self.fd, cmd, key.encode() if key else None, value, aux)

    def flag(self, key: str) -> None:
        self._config(FSCONFIG_SET_FLAG, key, None, 0)

    def string(self, key: str, value: str) -> None:
        self._config(FSCONFIG_SET_STRING, key, os.fsencode(value), 0)

    def fd_param(self, key: str, fd: int) -> None:
        self._config(FSCONFIG_SET_FD, key, None, fd)

    def create(self) -> None:
        self._config(FSCONFIG_CMD_CREATE, None, None, 0)

    def mount(self, attrs: int) -> int:
        """A detached mount of the created file system (``MOUNT_ATTR_*``); returns its fd."""
        return _syscall("fsmount", self.fd, FSMOUNT_CLOEXEC, attrs)

    def log(self) -> str:
        """The kernel's messages for this context (``e overlay: ...`` lines), if any."""
        lines = []
        while True:
            try:
                lines.append(os.read(self.fd, 4096).decode(errors="replace").strip())
            except OSError:
                return "; ".join(line for line in lines if line)
