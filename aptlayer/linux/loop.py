"""Loop devices: a file attached to a free ``/dev/loopN`` in one ``LOOP_CONFIGURE``."""

from __future__ import annotations

import errno
import fcntl
import os
import struct

LOOP_CTL_GET_FREE = 0x4C82
LOOP_CONFIGURE = 0x4C0A
LO_FLAGS_READ_ONLY = 0x1
LO_FLAGS_AUTOCLEAR = 0x4
LO_FLAGS_DIRECT_IO = 0x10
#: struct loop_config: fd, block_size, then struct loop_info64 (device, inode,
#: rdevice, offset, sizelimit; number, encrypt_type, encrypt_key_size, flags;
#: file_name, crypt_name, encrypt_key, init[2]), then 64 reserved bytes
_LOOP_CONFIG = struct.Struct("<II 5Q 4I 64s64s32s 2Q 64x")
BLOCK_SIZE = 4096
#: how often to ask for another free device when others keep taking the one offered
TRIES = 16


class ConfigureError(OSError):
    """``LOOP_CONFIGURE`` refused the file; EBUSY: every free device offered was taken first."""


def _read_only_config(backing_fd: int) -> bytes:
    flags = LO_FLAGS_READ_ONLY | LO_FLAGS_AUTOCLEAR | LO_FLAGS_DIRECT_IO
    return _LOOP_CONFIG.pack(backing_fd, BLOCK_SIZE, 0, 0, 0, 0, 0, 0, 0, 0, flags, b"", b"", b"", 0, 0)


def attach_read_only(backing_fd: int) -> tuple[str, int]:
    """Attach a file to a free loop device: read-only, direct I/O, 4 KiB blocks.

    Returns the device's path and an fd of it.  The device clears itself
    (autoclear) once that fd and every mount of it let go.  Another process
    may grab the same free device first: then ask again.  Raises
    ``ConfigureError`` when the kernel refuses the file, ``OSError`` when
    ``/dev/loop-control`` or the device cannot be used at all.
    """
    with open("/dev/loop-control", "rb", buffering=0) as ctl:
        for _ in range(TRIES):
            n = fcntl.ioctl(ctl.fileno(), LOOP_CTL_GET_FREE)
            path = f"/dev/loop{n}"
            loop_fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                fcntl.ioctl(loop_fd, LOOP_CONFIGURE, _read_only_config(backing_fd))
            except OSError as e:
                os.close(loop_fd)
                if e.errno == errno.EBUSY:
                    continue
                raise ConfigureError(e.errno, e.strerror) from None
            return path, loop_fd
    raise ConfigureError(errno.EBUSY, "no free loop device")
