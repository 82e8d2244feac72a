"""The error vocabulary of apt-layer's operations, one exit code per kind.

Lower layers raise their own exceptions (``DumpError``, ``ImageFormatError``,
``MountError``, journal errors); the functions at the end translate them
(and the OS's) into these, and the CLI turns each into a one-line message
and its exit code. The codes are
a public interface, documented in the README.
"""

from __future__ import annotations

import errno
import os


class AptLayerError(Exception):
    """Base class: an operation failed for a reason the user can act on."""

    exit_code = 1


class InvalidInput(AptLayerError):
    """A bad name, a malformed file, a value out of range."""

    exit_code = 2


class NotFound(AptLayerError):
    """An image, transaction, source or mountpoint that does not exist."""

    exit_code = 3


class Conflict(AptLayerError):
    """The operation clashes with the store's state (name taken, image in use, ...)."""

    exit_code = 4


class StoreVersionError(AptLayerError):
    """The store was written by a newer apt-layer (or needs a feature we lack)."""

    exit_code = 5


class StoreCorrupt(AptLayerError):
    """The journal or the store is damaged; nothing was changed."""

    exit_code = 6


class PermissionDenied(AptLayerError):
    """The operation needs privileges the caller does not have (usually root)."""

    exit_code = 7


class NoSpace(AptLayerError):
    """The file system ran out of space; staged work was discarded."""

    exit_code = 8


class Unsupported(AptLayerError):
    """The kernel or file system lacks a feature the operation needs."""

    exit_code = 9


class IntegrityError(AptLayerError):
    """A check (fsck, journal verify) found damage; the report says where."""

    exit_code = 10


class UnsafePermissions(AptLayerError):
    """A store path (or a parent of the store) that a user other than root can change."""

    exit_code = 11


class TransferFailed(AptLayerError):
    """Copying an image to or from a registry failed (network, authentication, a refused or damaged blob)."""

    exit_code = 12


# --- translation: the errors of the OS and of lower layers, as these kinds ---------------

#: errors writing into the store (not reading the source): full disk, quota, read-only store
_STORE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS)


def from_os_error(e: OSError, what: str) -> AptLayerError:
    """An OSError met while doing ``what``, as the kind the user can act on."""
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return NoSpace(f"{what}: no space left on device")
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return PermissionDenied(f"{what}: {e.strerror}")
    if e.errno == errno.ENOENT:
        return NotFound(f"{what}: {e.strerror}")
    return AptLayerError(f"{what}: {e.strerror or e}")


def os_error_behind(e: BaseException) -> OSError | None:
    """The OSError a wrapped error (BuildError <- ScanError <- OSError) came from, if any."""
    seen = 0
    while e is not None and seen < 8:
        if isinstance(e, OSError):
            return e
        e = e.__cause__ or e.__context__
        seen += 1
    return None


def from_build_error(e: Exception, what: str) -> AptLayerError:
    """A failed image build: the store's own disk failing (full, read-only), or bad input."""
    cause = os_error_behind(e)
    if cause is not None and cause.errno in _STORE_ERRNOS:
        return from_os_error(cause, what)
    return InvalidInput(str(e))


def from_journal_storage(reason: str, message: str, what: str) -> AptLayerError:
    """The journal's database refusing a write (see ``journal.JournalStorageError``)."""
    if reason == "readonly":
        return PermissionDenied(f"{what}: {message} (not writable by uid {os.geteuid()}; run as root?)")
    if reason == "full":
        return NoSpace(f"{what}: no space left on device")
    if reason == "busy":
        return Conflict(f"{what}: the journal is busy (another apt-layer is writing)")
    return AptLayerError(f"{what}: {message}")


def from_mount_error(e: OSError) -> AptLayerError:
    """A failed mount or unmount (``MountError``, an OSError), by what its errno says."""
    message = e.strerror or str(e)
    if e.errno in (errno.EPERM, errno.EACCES):
        return PermissionDenied(message)
    if e.errno in (errno.ENODEV, errno.EOPNOTSUPP, errno.ENOTTY, errno.ENOSYS):
        return Unsupported(message)
    if e.errno == errno.ENOENT:
        return NotFound(message)
    if e.errno in (errno.EBUSY, errno.EEXIST):
        return Conflict(message)
    if e.errno == errno.EBADMSG:  # an image refused as hostile before any mount
        return InvalidInput(message)
    return AptLayerError(message)
