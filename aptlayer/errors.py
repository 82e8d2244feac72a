"""The error vocabulary of apt-layer's operations, one exit code per kind.

Lower layers raise their own exceptions (``DumpError``, ``ImageFormatError``,
``MountError``, journal errors); the Store translates them into these, and
the CLI turns each into a one-line message and its exit code. The codes are
a public interface, documented in the README.
"""

from __future__ import annotations


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
