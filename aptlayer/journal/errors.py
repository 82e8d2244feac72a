"""Exceptions of the journal layer.

The Store maps them onto ``aptlayer.errors`` (one exit code per kind); they
carry the data a caller needs (a sequence number, a version) as attributes.
"""

from __future__ import annotations


class JournalError(Exception):
    """Base class of every journal failure."""


class JournalVersionError(JournalError):
    """The journal was written by a newer apt-layer; nothing was touched."""

    def __init__(self, message: str, found: int, supported: int, unknown_features: tuple[str, ...] = ()):
        super().__init__(message)
        self.found = found
        self.supported = supported
        self.unknown_features = unknown_features


class JournalCorruptError(JournalError):
    """The file is not a readable SQLite database."""


class ProjectionError(JournalError):
    """An event does not fit the projected state (e.g. creating a name that is live).

    Raised inside the event's SQLite transaction, so the event is not recorded.
    """

    def __init__(self, message: str, seq: int | None = None, kind: str | None = None):
        super().__init__(message)
        self.seq = seq
        self.kind = kind


class ManifestConflict(JournalError):
    """An image digest was given a manifest different from the one on record."""


class ChainBroken(JournalError):
    """``verify`` found the first event (by sequence number) that was altered."""

    def __init__(self, seq: int, reason: str):
        super().__init__(f"journal chain broken at seq {seq}: {reason}")
        self.seq = seq
        self.reason = reason


class AuditRefused(JournalError):
    """An audit query tried something other than reading."""


class AuditQueryError(JournalError):
    """An audit query is not valid SQL for this journal (a typo, an unknown table)."""


class AuditLimit(JournalError):
    """An audit query ran past its time limit or its memory cap, and was stopped."""


class JournalStorageError(JournalError):
    """SQLite refused to open or write the journal: ``reason`` is "readonly", "full", "busy" or "other"."""

    def __init__(self, message: str, reason: str):
        super().__init__(message)
        self.reason = reason


_REASONS = (("SQLITE_READONLY", "readonly"), ("SQLITE_CANTOPEN", "readonly"), ("SQLITE_PERM", "readonly"),
            ("SQLITE_AUTH", "readonly"), ("SQLITE_FULL", "full"), ("SQLITE_BUSY", "busy"),
            ("SQLITE_LOCKED", "busy"))


def storage_error(e: Exception) -> JournalStorageError:
    """An ``sqlite3.OperationalError`` as a :class:`JournalStorageError`."""
    name = getattr(e, "sqlite_errorname", "")
    reason = next((r for prefix, r in _REASONS if name.startswith(prefix)), "other")
    return JournalStorageError(str(e), reason)
