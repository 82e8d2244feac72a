"""The event log: append with a blake3 hash chain, manifests, verify, replay.

Each event row is hashed as ``blake3(previous hash || canonical row)``: the
previous hash as 32 raw bytes (32 zero bytes before the first event), the
row as the compact, sorted-key, UTF-8 JSON object
``{"actor", "at", "data", "kind", "seq", "subject", "tx"}``. The ``data`` and
``actor`` columns hold exactly the canonical JSON of their values, so the
canonical row is assembled from the stored text and any edit of it, even a
re-spacing, breaks the chain.

An append runs in ``BEGIN IMMEDIATE``: the write lock is taken before the last
hash is read, so concurrent writers queue (``busy_timeout``) instead of
forking the chain, and the event, its manifest and the projection change
commit together or not at all.
"""

from __future__ import annotations

import functools
import json
import os
import pwd
import sqlite3
import sys
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone

import blake3

from ..names import boot_id
from . import kinds, projection, schema
from .event import COLUMNS, Event
from .errors import ChainBroken, JournalError, ManifestConflict, ProjectionError, storage_error
from .invariants import check_invariants
from .state import StateQueries

GENESIS = "00" * 32
Manifest = Iterable[tuple[str, int]]


class _Recorded:
    def __repr__(self) -> str:
        return "RECORDED"


#: ``manifest=RECORDED``: the image ``data["digest"]`` names has a manifest recorded
#: already; the event takes its hash instead of being given the rows again.
RECORDED = _Recorded()


@dataclass(frozen=True)
class Derived:
    """``manifest=Derived(...)``: the manifest recorded for image ``base``, less ``removed``, plus ``added``.

    For an image made by changing a few files of another: the rows are
    copied inside SQLite instead of being handed over and inserted one by
    one, and only the added objects are checked against other manifests.
    The manifest and its hash are exactly those of the full list.
    """

    base: str
    removed: frozenset[str]
    added: tuple[tuple[str, int], ...]


def canonical(value: object) -> str:
    """The canonical JSON text of a value: compact, sorted keys, UTF-8."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def chain_hash(prev: str, seq: int, at: str, tx: str, kind: str, subject: str, data: str, actor: str) -> str:
    """Hash of one row given the previous hash and the stored ``data``/``actor`` text."""
    row = (
        f'{{"actor":{actor},"at":{canonical(at)},"data":{data},"kind":{canonical(kind)},'
        f'"seq":{seq},"subject":{canonical(subject)},"tx":{canonical(tx)}}}'
    )
    return blake3.blake3(bytes.fromhex(prev) + row.encode("utf-8")).hexdigest()


def utc_now() -> str:
    """UTC ISO-8601 with microseconds, e.g. ``2026-11-25T17:54:44.123456Z``."""
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@functools.cache
def _host_facts() -> dict:
    uid = os.getuid()
    try:
        user = pwd.getpwuid(uid).pw_name
    except KeyError:
        user = str(uid)
    return {"uid": uid, "user": user, "host": os.uname().nodename, "boot_id": boot_id()}


def default_actor() -> dict:
    """Who is acting: uid, user, pid, argv, host, boot id."""
    return {**_host_facts(), "pid": os.getpid(), "argv": list(sys.argv)}


def manifest_rows(manifest: Manifest) -> tuple[list[tuple[str, int]], str]:
    """Sorted unique (object, size) rows and their hash (blake3 of their canonical JSON)."""
    sizes: dict[str, int] = {}
    for obj, size in manifest:
        if sizes.setdefault(obj, size) != size:
            raise ManifestConflict(f"object {obj} listed with sizes {sizes[obj]} and {size}")
    rows = sorted(sizes.items())
    return rows, blake3.blake3(canonical(rows).encode("utf-8")).hexdigest()


class Writer:
    """Appends events inside one open SQLite write transaction (see Journal.transaction)."""

    def __init__(self, conn: sqlite3.Connection):
        self._conn = conn

    def append(
        self,
        kind: str,
        subject: str,
        data: dict,
        tx: str,
        actor: dict | None = None,
        manifest: Manifest | _Recorded | Derived | None = None,
    ) -> Event:
        """Record one event (and its manifest) and apply it to the projection.

        With ``manifest``, ``data["digest"]`` names the image and
        ``data["manifest"]`` is set to the manifest's hash, so the chain also
        protects the manifest rows (``RECORDED``: the rows recorded for
        that digest before, a JournalError if there are none; :class:`Derived`:
        another image's rows changed by a few). An object id is a content digest, so it
        has one size in every manifest; a different one is a ManifestConflict.
        A refused event leaves no trace, even if the caller catches the error
        and goes on with the transaction (each append is a savepoint).
        """
        if not projection.known_kind(kind):
            raise ProjectionError(f"unknown event kind {kind!r}", kind=kind)
        self._conn.execute("SAVEPOINT append_event")
        try:
            event = self._append(kind, subject, data, tx, actor, manifest)
        except BaseException:
            self._conn.execute("ROLLBACK TO append_event")
            self._conn.execute("RELEASE append_event")
            raise
        self._conn.execute("RELEASE append_event")
        return event

    def append_event(
        self,
        event: kinds.EventData,
        tx: str,
        actor: dict | None = None,
        manifest: Manifest | _Recorded | Derived | None = None,
    ) -> Event:
        """Record a typed event (:mod:`.kinds`): its kind, subject and ``to_data()``, as :meth:`append`."""
        return self.append(event.kind, event.subject, event.to_data(), tx, actor, manifest)

    def _append(
        self, kind: str, subject: str, data: dict, tx: str, actor: dict | None,
        manifest: Manifest | _Recorded | Derived | None,
    ) -> Event:
        conn = self._conn
        last = conn.execute("SELECT seq, hash FROM events ORDER BY seq DESC LIMIT 1").fetchone()
        seq, prev = (last[0] + 1, last[1]) if last else (1, GENESIS)
        rows: list[tuple[str, int]] | None = None
        if manifest is RECORDED:
            known = conn.execute("SELECT hash FROM images_manifest WHERE digest = ?", (data.get("digest"),)).fetchone()
            if known is None:
                raise JournalError(f"no manifest recorded for image {data.get('digest')}")
            data = {**data, "manifest": known[0]}
        elif isinstance(manifest, Derived):
            rows, mhash = manifest_rows(self._derive(manifest))
            data = {**data, "manifest": mhash}
        elif manifest is not None:
            rows, mhash = manifest_rows(manifest)
            data = {**data, "manifest": mhash}
        at = utc_now()
        data_text = canonical(data)
        actor_value = {**default_actor(), **(actor or {})}
        actor_text = canonical(actor_value)
        digest = chain_hash(prev, seq, at, tx, kind, subject, data_text, actor_text)
        conn.execute(
            f"INSERT INTO events ({COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (seq, at, tx, kind, subject, data_text, actor_text, digest),
        )
        if rows is not None:
            self._record_manifest(data, rows, seq, manifest if isinstance(manifest, Derived) else None)
        event = Event(seq, at, tx, kind, subject, json.loads(data_text), actor_value, digest)
        projection.apply(conn, event)
        return event

    def _derive(self, derived: Derived) -> list[tuple[str, int]]:
        """The full rows of a derived manifest."""
        base = self._conn.execute(
            "SELECT object, size FROM image_objects WHERE digest = ?", (derived.base,)).fetchall()
        if not base:
            raise JournalError(f"no manifest recorded for image {derived.base}")
        removed = derived.removed
        return [row for row in base if row[0] not in removed] + list(derived.added)

    def _record_manifest(self, data: dict, rows: list[tuple[str, int]], seq: int, derived: Derived | None) -> None:
        image = data.get("digest")
        if not isinstance(image, str):
            raise JournalError("an event with a manifest needs data['digest']")
        known = self._conn.execute("SELECT hash FROM images_manifest WHERE digest = ?", (image,)).fetchone()
        if known is not None:
            if known[0] != data["manifest"]:
                raise ManifestConflict(f"image {image}: manifest differs from the one recorded")
            return
        self._conn.execute(
            "INSERT INTO images_manifest (digest, seq, objects, size, hash) VALUES (?, ?, ?, ?, ?)",
            (image, seq, len(rows), sum(size for _, size in rows), data["manifest"]),
        )
        if derived is None:
            self._conn.executemany(
                "INSERT INTO image_objects (digest, object, size) VALUES (?, ?, ?)",
                ((image, obj, size) for obj, size in rows),
            )
            checked = "n.digest = ?"
            args: tuple = (image,)
        else:  # the base's rows agree with every manifest already; only the added ones are new
            self._conn.execute(
                "INSERT INTO image_objects (digest, object, size) SELECT ?, object, size FROM image_objects "
                "WHERE digest = ? AND object NOT IN (SELECT value FROM json_each(?))",
                (image, derived.base, json.dumps(sorted(derived.removed | {obj for obj, _ in derived.added}))),
            )
            self._conn.executemany(
                "INSERT INTO image_objects (digest, object, size) VALUES (?, ?, ?)",
                ((image, obj, size) for obj, size in derived.added),
            )
            checked = "n.digest = ? AND n.object IN (SELECT value FROM json_each(?))"
            args = (image, json.dumps([obj for obj, _ in derived.added]))
        clash = self._conn.execute(
            "SELECT n.object, n.size, o.size FROM image_objects AS n JOIN image_objects AS o "
            f"ON o.object = n.object AND o.digest != n.digest AND o.size != n.size WHERE {checked} LIMIT 1",
            args,
        ).fetchone()
        if clash is not None:
            raise ManifestConflict(f"object {clash[0]} has size {clash[1]} here but {clash[2]} in another manifest")

    def commit_tx(self, tx: str, actor: dict | None = None, closing: Sequence[kinds.EventData] = ()) -> list[Event]:
        """Make every staged operation of ``tx`` effective, then record ``tx.committed``.

        Staged creates become ``image.created``, staged deletes
        ``image.deleted`` and staged deploys ``deployed``, in staging order;
        then the ``closing`` events (an ``undeployed`` for an image the
        transaction both replaced and deleted).
        """
        ops = self._conn.execute(
            "SELECT op, name, digest, data FROM tx_ops WHERE tx = ? AND effective_seq IS NULL ORDER BY seq",
            (tx,),
        ).fetchall()
        events = []
        for op, name, digest, data in ops:
            effective: kinds.EventData
            if op == "create":  # the staged data, manifest hash included
                effective = kinds.ImageCreated.from_data(name, json.loads(data))
            elif op == "delete":
                effective = kinds.ImageDeleted(subject=name, digest=digest)
            else:
                row = self._conn.execute("SELECT image, digest FROM deployments WHERE slot = 'current'").fetchone()
                effective = kinds.Deployed(subject=name, current=kinds.Slot(name, digest),
                                           previous=kinds.Slot(*row) if row else None)
            events.append(self.append_event(effective, tx, actor))
        events += [self.append_event(event, tx, actor) for event in closing]
        events.append(self.append_event(kinds.TxCommitted(subject=tx, ops=len(ops)), tx, actor))
        return events


class Journal(StateQueries):
    """The journal file: events, manifests, projection. ``Journal.open(path)``."""

    def __init__(self, conn: sqlite3.Connection, path: str):
        self.conn = conn
        self.path = path

    @classmethod
    def open(cls, path: str | os.PathLike, readonly: bool = False) -> Journal:
        """Open (creating or upgrading) the journal; ``readonly`` only reads, for users other than root."""
        try:
            if readonly:
                return cls(schema.connect_readonly(path), os.fspath(path))
            return cls(schema.connect(path), os.fspath(path))
        except sqlite3.OperationalError as e:
            raise storage_error(e) from None

    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> Journal:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- writing ----------------------------------------------------------

    @contextmanager
    def transaction(self) -> Iterator[Writer]:
        """One SQLite write transaction for several events: all or none commit.

        SQLite's refusals (read-only file, full disk, busy) come out as
        :class:`JournalStorageError`.
        """
        if self.conn.in_transaction:
            raise JournalError("a journal transaction is already open on this connection")
        try:
            self.conn.execute("BEGIN IMMEDIATE")
            try:
                yield Writer(self.conn)
                self.conn.execute("COMMIT")
            except BaseException:
                if self.conn.in_transaction:
                    self.conn.execute("ROLLBACK")
                raise
        except sqlite3.OperationalError as e:
            raise storage_error(e) from None

    def append(
        self,
        kind: str,
        subject: str,
        data: dict,
        tx: str,
        actor: dict | None = None,
        manifest: Manifest | _Recorded | Derived | None = None,
    ) -> Event:
        """Append one event in its own SQLite transaction (see Writer.append)."""
        with self.transaction() as w:
            return w.append(kind, subject, data, tx, actor, manifest)

    def append_event(
        self,
        event: kinds.EventData,
        tx: str,
        actor: dict | None = None,
        manifest: Manifest | _Recorded | Derived | None = None,
    ) -> Event:
        """Append one typed event in its own SQLite transaction (see Writer.append_event)."""
        with self.transaction() as w:
            return w.append_event(event, tx, actor, manifest)

    def commit_tx(self, tx: str, actor: dict | None = None) -> list[Event]:
        """Commit an explicit transaction in one SQLite transaction (see Writer.commit_tx)."""
        with self.transaction() as w:
            return w.commit_tx(tx, actor)

    # --- reading the log --------------------------------------------------

    def events(
        self,
        subject: str | None = None,
        kind: str | None = None,
        tx: str | None = None,
        since: str | None = None,
        until: str | None = None,
        newest_first: bool = False,
        limit: int | None = None,
    ) -> Iterator[Event]:
        """Events matching every filter given.

        ``kind`` may end in ``*`` to match a family (``recover.*``); ``since``
        and ``until`` are inclusive bounds on ``at``, as ISO-8601 UTC strings
        or prefixes of one (``until="2026-11-25"`` includes that whole day).
        """
        where, params = [], []
        for column, value in (("subject", subject), ("tx", tx)):
            if value is not None:
                where.append(f"{column} = ?")
                params.append(value)
        if kind is not None:
            where.append("kind GLOB ?" if kind.endswith("*") else "kind = ?")
            params.append(kind)
        if since is not None:
            where.append("at >= ?")
            params.append(since)
        if until is not None:
            where.append("substr(at, 1, length(?)) <= ?")
            params += [until, until]
        sql = f"SELECT {COLUMNS} FROM events"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY seq DESC" if newest_first else " ORDER BY seq"
        if limit is not None:
            sql += f" LIMIT {int(limit)}"
        for row in self.conn.execute(sql, params):
            yield Event.from_row(row)

    def last_seq(self) -> int:
        return self.conn.execute("SELECT coalesce(max(seq), 0) FROM events").fetchone()[0]

    def verify(self, after: int = 0) -> int:
        """Recompute the chain and the manifest hashes; return the number of events checked.

        Raises ChainBroken naming the first bad seq: a row whose hash does not
        follow (edited, reordered, inserted), a gap (deleted), a tail missing
        behind the projection's ``applied_seq`` (truncated), or the event
        that introduced a manifest whose rows were altered.

        ``after`` > 0 checks only the events after that seq (and manifests
        they introduced), trusting the stored hash of event ``after``: a quick
        check of what was appended since an earlier full verification.
        """
        prev, expected = GENESIS, 1
        if after > 0:
            row = self.conn.execute("SELECT hash FROM events WHERE seq = ?", (after,)).fetchone()
            if row is None:
                raise ChainBroken(after, "event missing")
            prev, expected = row[0], after + 1
        for seq, at, tx, kind, subject, data, actor, digest in self.conn.execute(
            f"SELECT {COLUMNS} FROM events WHERE seq > ? ORDER BY seq", (after,)
        ):
            if seq != expected:
                raise ChainBroken(expected, f"event missing (next stored event is {seq})")
            if chain_hash(prev, seq, at, tx, kind, subject, data, actor) != digest:
                raise ChainBroken(seq, "hash does not match: event edited, reordered or inserted")
            prev, expected = digest, expected + 1
        applied, applied_hash = self.conn.execute("SELECT applied_seq, applied_hash FROM meta").fetchone()
        if applied >= expected:
            raise ChainBroken(expected, f"events missing: the projection was applied up to seq {applied}")
        if applied == expected - 1 and applied > 0 and applied_hash != prev:
            raise ChainBroken(applied, "last event differs from the one the projection applied")
        self._verify_manifests(after)
        return expected - 1 - after

    def _verify_manifests(self, after: int) -> None:
        recorded = self.conn.execute(
            "SELECT m.digest, m.seq, m.hash, json_extract(e.data, '$.manifest') "
            "FROM images_manifest AS m LEFT JOIN events AS e ON e.seq = m.seq WHERE m.seq > ?",
            (after,),
        ).fetchall()
        for image, seq, mhash, event_hash in recorded:
            rows = self.conn.execute(
                "SELECT object, size FROM image_objects WHERE digest = ? ORDER BY object", (image,)
            ).fetchall()
            if manifest_rows(rows)[1] != mhash or mhash != event_hash:
                raise ChainBroken(seq, f"manifest of image {image} altered")
        if after == 0:
            stray = self.conn.execute(
                "SELECT digest FROM image_objects WHERE digest NOT IN (SELECT digest FROM images_manifest) LIMIT 1"
            ).fetchone()
            if stray is not None:
                raise ChainBroken(self.last_seq(), f"objects listed for unrecorded image {stray[0]}")

    # --- projection ---------------------------------------------------------

    def rebuild(self) -> int:
        """Drop the projection and replay every event; return how many."""
        with self.transaction():
            return projection.rebuild(self.conn)

    def catch_up(self) -> int:
        """Apply events past ``applied_seq``; one indexed read when up to date."""
        if projection.applied_seq(self.conn) == self.last_seq():
            return 0
        with self.transaction():
            return projection.catch_up(self.conn)

    def check(self) -> list[str]:
        """Invariant violations of the projection (empty when sound)."""
        return check_invariants(self.conn)
