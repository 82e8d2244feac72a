"""The event journal: append-only events with a hash chain, manifests, the
projection of the store's live state, verification and read-only audit.

It knows nothing of composefs: images are names and digests, manifests are
lists of (object id, size). ``docs/journal.md`` documents the public schema.
"""

from .audit import AuditResult, query as audit_query, readonly
from .errors import (
    AuditLimit,
    AuditQueryError,
    AuditRefused,
    ChainBroken,
    JournalCorruptError,
    JournalError,
    JournalStorageError,
    JournalVersionError,
    ManifestConflict,
    ProjectionError,
)
from .invariants import check_invariants
from .event import Event
from .kinds import EventData, EventDataError
from .log import RECORDED, Derived, Journal, Writer, canonical, chain_hash, default_actor
from .projection import APPLY, known_kind
from .schema import SCHEMA_VERSION
from .state import Deployment, Image, Mount, StagedOp, Transaction, Usage, as_dict

__all__ = [
    "APPLY",
    "RECORDED",
    "SCHEMA_VERSION",
    "AuditLimit",
    "AuditQueryError",
    "AuditRefused",
    "AuditResult",
    "ChainBroken",
    "Deployment",
    "Derived",
    "Event",
    "EventData",
    "EventDataError",
    "Image",
    "Journal",
    "JournalCorruptError",
    "JournalError",
    "JournalStorageError",
    "JournalVersionError",
    "ManifestConflict",
    "Mount",
    "ProjectionError",
    "StagedOp",
    "Transaction",
    "Usage",
    "Writer",
    "as_dict",
    "audit_query",
    "canonical",
    "chain_hash",
    "check_invariants",
    "default_actor",
    "known_kind",
    "readonly",
]
