"""The kernel's fs-verity ioctls: enable it on a file, ask the kernel for a file's digest.

They work only where the kernel has ``CONFIG_FS_VERITY`` and the file system
supports it (ext4, f2fs, btrfs with the feature on); elsewhere they answer
ENOTTY or EOPNOTSUPP.  ``enable`` asks for SHA-256 over 4096-byte Merkle
blocks with no salt, the parameters ``fsverity enable`` uses by default.
Computing a digest in user space is the caller's business.
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct

# ioctl numbers: _IOW('f', 133, struct fsverity_enable_arg) (128 bytes) and
# _IOWR('f', 134, struct fsverity_digest) (4-byte header).
FS_IOC_ENABLE_VERITY = 0x40806685
FS_IOC_MEASURE_VERITY = 0xC0046686

#: ``FS_VERITY_HASH_ALG_SHA256``: the algorithm number in the ioctls and the descriptor
HASH_ALG_SHA256 = 1
SHA256_SIZE = 32
#: the Merkle tree block size ``enable`` asks for
BLOCK_SIZE = 4096
#: the largest digest the kernel may return (SHA-512)
_MAX_DIGEST = 64

#: errnos meaning "this kernel or file system has no fs-verity"
UNSUPPORTED = frozenset({errno.ENOTTY, errno.EOPNOTSUPP, errno.ENOSYS})


class VerityUnsupported(OSError):
    """The kernel or the file system cannot enable fs-verity on this file."""


def measure_raw(fd: int) -> tuple[int, bytes]:
    """(hash algorithm, digest) the kernel holds for a verity file, whatever the algorithm.

    Raises the ioctl's ``OSError``: ENODATA for a file without verity, ENOTTY
    or EOPNOTSUPP where the kernel or file system has no fs-verity.
    """
    arg = bytearray(struct.pack("<HH", 0, _MAX_DIGEST) + bytes(_MAX_DIGEST))
    fcntl.ioctl(fd, FS_IOC_MEASURE_VERITY, arg, True)
    alg, size = struct.unpack_from("<HH", arg)
    return alg, bytes(arg[4 : 4 + size])


def measure(fd: int) -> bytes | None:
    """The SHA-256 digest the kernel holds for a verity file, or None if it has none.

    None covers "no verity on this file" (ENODATA), "no fs-verity in this
    kernel or file system" (ENOTTY, EOPNOTSUPP) and a file enabled with
    another algorithm; other errors are raised.
    """
    try:
        alg, digest = measure_raw(fd)
    except OSError as e:
        if e.errno in UNSUPPORTED or e.errno == errno.ENODATA:
            return None
        raise
    if alg != HASH_ALG_SHA256 or len(digest) != SHA256_SIZE:
        return None
    return digest


def enable(fd: int) -> bool:
    """Enable fs-verity on a file opened read-only with no writer left.

    Returns True if this call enabled it and False if the file already had
    it.  Raises ``VerityUnsupported`` when the kernel or file system lacks
    fs-verity, and ``OSError`` for anything else (e.g. ETXTBSY while a
    writable fd is open, EACCES, EROFS).
    """
    arg = bytearray(struct.pack("<IIIIQIIQ", 1, HASH_ALG_SHA256, BLOCK_SIZE, 0, 0, 0, 0, 0))
    arg += bytes(128 - len(arg))
    try:
        fcntl.ioctl(fd, FS_IOC_ENABLE_VERITY, arg, False)
    except OSError as e:
        if e.errno == errno.EEXIST:
            return False
        if e.errno in UNSUPPORTED:
            raise VerityUnsupported(e.errno, f"fs-verity not supported: {os.strerror(e.errno)}") from e
        raise
    return True


def supported(directory: str | bytes | os.PathLike) -> bool:
    """Whether files created in ``directory`` can get fs-verity.

    Tries it on an unnamed ``O_TMPFILE`` there, so nothing is left behind.
    File systems without ``O_TMPFILE`` report False.
    """
    try:
        wfd = os.open(directory, os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o600)
    except OSError:
        return False
    try:
        os.write(wfd, b"x")
        rfd = os.open(f"/proc/self/fd/{wfd}", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return False
    finally:
        os.close(wfd)
    try:
        enable(rfd)
        return True
    except OSError:
        return False
    finally:
        os.close(rfd)


def kernel_lacks_fsverity() -> bool:
    """Whether this kernel was built without ``CONFIG_FS_VERITY``, as far as can be told.

    ``/proc/config.gz`` says so when present; otherwise ext4 lists a
    ``verity`` feature in sysfs exactly when the kernel has fs-verity.
    """
    import gzip  # here, not at the top: only a failed mount asks

    try:
        with gzip.open("/proc/config.gz", "rt") as f:
            return "CONFIG_FS_VERITY=y\n" not in f.read()
    except OSError:
        return os.path.isdir("/sys/fs/ext4/features") and not os.path.exists("/sys/fs/ext4/features/verity")
