"""Read-only questions to the projection, answered with typed rows.

Every query the rest of apt-layer asks of the store's state is a named
method here, so that SQL stays inside ``journal/`` (``tests/test_layers.py``
holds that rule). The rows are frozen dataclasses; they become dicts only at
the CLI's ``--json`` edge. ``Journal`` inherits these methods; gc, recovery,
watch and the Store call them on the journal they hold.
"""

from __future__ import annotations

import dataclasses
import json
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass

from .event import COLUMNS, Event


@dataclass(frozen=True, slots=True)
class Image:
    """A live image."""

    name: str
    digest: str
    size: int
    created_seq: int
    created_at: str
    tx: str


@dataclass(frozen=True, slots=True)
class Deployment:
    """What a deployment slot ("current" or "previous") holds."""

    slot: str
    image: str
    digest: str
    seq: int

    def ref(self) -> dict:
        """``{"image", "digest"}``: how events name a deployment."""
        return {"image": self.image, "digest": self.digest}


@dataclass(frozen=True, slots=True)
class Mount:
    mountpoint: str
    image: str
    digest: str
    boot_id: str
    state: str  # "mounted" or "lost"
    seq: int


@dataclass(frozen=True, slots=True)
class Transaction:
    id: str
    state: str  # "open", "committed" or "aborted"
    explicit: bool
    begun_seq: int
    begun_at: str
    ended_seq: int | None
    ended_at: str | None


@dataclass(frozen=True, slots=True)
class StagedOp:
    """An operation staged in a transaction; ``effective_seq`` is set once it took effect."""

    seq: int
    tx: str
    op: str  # "create", "delete" or "deploy"
    name: str
    digest: str
    data: dict
    effective_seq: int | None


@dataclass(frozen=True, slots=True)
class Usage:
    """How much the store holds, and how much of it gc could reclaim."""

    images: int
    image_bytes: int
    objects: int
    object_bytes: int
    reclaimable_objects: int
    reclaimable_bytes: int


def as_dict(row) -> dict:
    """A typed row as a plain dict (for ``--json``)."""
    return dataclasses.asdict(row)


_IMAGE = "SELECT name, digest, size, created_seq, created_at, tx FROM images"
_MOUNT = "SELECT mountpoint, image, digest, boot_id, state, seq FROM mounts"
_TX = "SELECT id, state, explicit, begun_seq, begun_at, ended_seq, ended_at FROM transactions"


class StateQueries:
    """The named queries; mixed into ``Journal``, which provides ``conn``."""

    conn: sqlite3.Connection

    # --- images -------------------------------------------------------------

    def image(self, name: str) -> Image | None:
        row = self.conn.execute(_IMAGE + " WHERE name = ?", (name,)).fetchone()
        return Image(*row) if row else None

    def images(self) -> list[Image]:
        """Every live image, by name."""
        return [Image(*row) for row in self.conn.execute(_IMAGE + " ORDER BY name")]

    def images_with_manifests(self) -> list[tuple[Image, int, int]]:
        """Every live image, by name, with its manifest's object count and content bytes (0, 0 if none)."""
        return [(Image(*row[:6]), row[6] or 0, row[7] or 0) for row in self.conn.execute(
            "SELECT i.name, i.digest, i.size, i.created_seq, i.created_at, i.tx, m.objects, m.size "
            "FROM images i LEFT JOIN images_manifest m ON m.digest = i.digest ORDER BY i.name")]

    def images_with_digest(self, digest: str) -> list[str]:
        """Names of the live images recorded with ``digest``, sorted."""
        return [r[0] for r in self.conn.execute("SELECT name FROM images WHERE digest = ? ORDER BY name", (digest,))]

    def images_needing(self, obj: str) -> list[str]:
        """Names of the live images whose manifest lists ``obj``."""
        return [r[0] for r in self.conn.execute(
            "SELECT i.name FROM image_objects io JOIN images i ON i.digest = io.digest "
            "WHERE io.object = ? ORDER BY i.name", (obj,))]

    def last_image_event(self, name: str) -> Event | None:
        """The newest ``image.created`` or ``image.deleted`` event of ``name``."""
        row = self.conn.execute(
            f"SELECT {COLUMNS} FROM events WHERE subject = ? AND kind IN ('image.created', 'image.deleted') "
            "ORDER BY seq DESC LIMIT 1", (name,)).fetchone()
        return Event.from_row(row) if row else None

    def event(self, seq: int) -> Event | None:
        row = self.conn.execute(f"SELECT {COLUMNS} FROM events WHERE seq = ?", (seq,)).fetchone()
        return Event.from_row(row) if row else None

    # --- deployments and mounts ------------------------------------------------

    def deployments(self) -> dict[str, Deployment]:
        """The slots that are set, by slot name."""
        return {row[0]: Deployment(*row) for row in self.conn.execute(
            "SELECT slot, image, digest, seq FROM deployments ORDER BY slot")}

    def mounts(self, state: str | None = None) -> list[Mount]:
        """Recorded mounts (of one ``state`` if given), by mount point."""
        if state is None:
            rows = self.conn.execute(_MOUNT + " ORDER BY mountpoint")
        else:
            rows = self.conn.execute(_MOUNT + " WHERE state = ? ORDER BY mountpoint", (state,))
        return [Mount(*row) for row in rows]

    def mount(self, mountpoint: str) -> Mount | None:
        row = self.conn.execute(_MOUNT + " WHERE mountpoint = ?", (mountpoint,)).fetchone()
        return Mount(*row) if row else None

    def mounts_of(self, image: str) -> list[str]:
        """Mount points where the image ``image`` is recorded as mounted."""
        return [r[0] for r in self.conn.execute(
            "SELECT mountpoint FROM mounts WHERE image = ? AND state = 'mounted' ORDER BY mountpoint", (image,))]

    # --- transactions ------------------------------------------------------------

    def transaction_row(self, tx: str) -> Transaction | None:
        row = self.conn.execute(_TX + " WHERE id = ?", (tx,)).fetchone()
        return _transaction(row) if row else None

    def transactions(self, state: str | None = None) -> list[Transaction]:
        """Transactions (in one ``state`` if given), oldest first."""
        if state is None:
            rows = self.conn.execute(_TX + " ORDER BY begun_seq")
        else:
            rows = self.conn.execute(_TX + " WHERE state = ? ORDER BY begun_seq", (state,))
        return [_transaction(row) for row in rows]

    def transaction_state(self, tx: str) -> str | None:
        """'open', 'committed', 'aborted', or None for an unknown id."""
        row = self.conn.execute("SELECT state FROM transactions WHERE id = ?", (tx,)).fetchone()
        return row[0] if row else None

    def open_transactions(self) -> list[tuple[Transaction, Event]]:
        """Every open transaction with its ``tx.begun`` event, oldest first."""
        cols = ", ".join("e." + c for c in COLUMNS.split(", "))
        tx_cols = ", ".join("t." + c for c in ("id", "state", "explicit", "begun_seq", "begun_at",
                                                 "ended_seq", "ended_at"))
        return [(_transaction(row[:7]), Event.from_row(row[7:])) for row in self.conn.execute(
            f"SELECT {tx_cols}, {cols} FROM transactions t JOIN events e ON e.seq = t.begun_seq "
            "WHERE t.state = 'open' ORDER BY t.begun_seq")]

    def staged_ops(self, tx: str) -> list[StagedOp]:
        """Operations staged in ``tx``, in order."""
        return [StagedOp(s, t, op, n, d, json.loads(data), eff) for s, t, op, n, d, data, eff in self.conn.execute(
            "SELECT seq, tx, op, name, digest, data, effective_seq FROM tx_ops WHERE tx = ? ORDER BY seq", (tx,))]

    def staging_tx_of(self, name: str) -> str | None:
        """The open transaction that stages a create of ``name`` not yet effective, if any."""
        row = self.conn.execute(
            "SELECT o.tx FROM tx_ops o JOIN transactions t ON t.id = o.tx "
            "WHERE o.op = 'create' AND o.name = ? AND o.effective_seq IS NULL AND t.state = 'open'",
            (name,)).fetchone()
        return row[0] if row else None

    # --- manifests and objects -------------------------------------------------------

    def manifest_summary(self, digest: str) -> tuple[int, int] | None:
        """(objects, total size) of the manifest recorded for an image digest, or None."""
        return self.conn.execute(
            "SELECT objects, size FROM images_manifest WHERE digest = ?", (digest,)).fetchone()

    def manifest_objects(self, digest: str) -> int:
        """How many objects the manifest recorded for an image digest lists (0 if none is)."""
        row = self.manifest_summary(digest)
        return row[0] if row else 0

    def manifest_has(self, digest: str, obj: str) -> bool:
        """Whether the manifest recorded for an image digest lists ``obj``."""
        return self.conn.execute(
            "SELECT 1 FROM image_objects WHERE digest = ? AND object = ?", (digest, obj)).fetchone() is not None

    def manifest(self, digest: str) -> list[tuple[str, int]]:
        """The (object, size) rows recorded for an image digest, sorted."""
        return self.conn.execute(
            "SELECT object, size FROM image_objects WHERE digest = ? ORDER BY object", (digest,)
        ).fetchall()

    def garbage(self) -> list[tuple[str, int]]:
        """(object, size) of the objects whose refcount reached 0 and no ``gc.swept`` removed yet."""
        return self.conn.execute("SELECT object, size FROM object_refs WHERE refcount = 0 ORDER BY object").fetchall()

    def referenced(self) -> Iterator[str]:
        """Every object some root holds (refcount above 0), sorted."""
        return (r[0] for r in self.conn.execute("SELECT object FROM object_refs WHERE refcount > 0 ORDER BY object"))

    def referenced_count(self) -> int:
        return self.conn.execute("SELECT count(*) FROM object_refs WHERE refcount > 0").fetchone()[0]

    def referenced_in(self, fanout: str) -> list[str]:
        """The objects some root holds whose path starts with ``fanout + "/"``."""
        return [r[0] for r in self.conn.execute(  # "xx/" < "xx/..." < "xx0"
            "SELECT object FROM object_refs WHERE refcount > 0 AND object > ? AND object < ? ORDER BY object",
            (fanout + "/", fanout + "0"))]

    def is_referenced(self, obj: str) -> bool:
        row = self.conn.execute("SELECT refcount FROM object_refs WHERE object = ?", (obj,)).fetchone()
        return bool(row and row[0] > 0)

    def holders_of(self, obj: str) -> list[str]:
        """The roots (``image:NAME``, ``deploy:SLOT``, ``mount:PATH``, ``staged:TX:NAME``) that need ``obj``."""
        return [r[0] for r in self.conn.execute(
            "SELECT DISTINCT r.holder FROM image_objects io JOIN roots r ON r.digest = io.digest "
            "WHERE io.object = ? ORDER BY r.holder", (obj,))]

    def usage(self) -> Usage:
        images, image_bytes = self.conn.execute("SELECT count(*), coalesce(sum(size), 0) FROM images").fetchone()
        live, live_bytes = self.conn.execute(
            "SELECT count(*), coalesce(sum(size), 0) FROM object_refs WHERE refcount > 0").fetchone()
        garbage, garbage_bytes = self.conn.execute(
            "SELECT count(*), coalesce(sum(size), 0) FROM object_refs WHERE refcount = 0").fetchone()
        return Usage(images, image_bytes, live, live_bytes, garbage, garbage_bytes)

    # --- the chain -------------------------------------------------------------------

    def hash_at(self, seq: int) -> str | None:
        """The chain hash of event ``seq``, or None if there is no such event."""
        row = self.conn.execute("SELECT hash FROM events WHERE seq = ?", (seq,)).fetchone()
        return row[0] if row else None


def _transaction(row: tuple) -> Transaction:
    id_, state, explicit, begun_seq, begun_at, ended_seq, ended_at = row
    return Transaction(id_, state, bool(explicit), begun_seq, begun_at, ended_seq, ended_at)
