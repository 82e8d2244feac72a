"""The projection: the journal's events folded into the store's live state.

Every event is applied by ``apply(conn, event)`` inside the SQLite
transaction that appends it, so the projection is never behind a committed
event. ``rebuild`` replays the whole log from events and manifests alone and
must give exactly the same tables (the property test checks it).

Reference counting. A *root* is something that keeps an image digest alive:

    image:NAME               a live image
    staged:TX:NAME           an image staged by an open transaction
    deploy:current           the current deployment
    deploy:previous          the previous deployment (what rollback returns to)
    mount:MOUNTPOINT         a mount in state 'mounted'

``object_refs.refcount`` of an object is the number of *distinct digests*
held by at least one root whose manifest lists the object. Counting digests
rather than roots makes deploying, mounting or renaming an image that is
already held O(1): object rows change only when a digest gains its first root
or loses its last one. An object whose refcount drops to 0 keeps its row
(the incremental gc's work list) until a ``gc.swept`` removes the rows at
zero, except those its data lists as ``spared`` (garbage too recent for
the grace period, still to collect).

A deleted image that is still deployed or mounted keeps its digest held
through those roots, so its objects stay referenced until it is undeployed
(by a later deploy that pushes it out of both slots) or unmounted.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable

from . import kinds as k
from .errors import ChainBroken, ProjectionError
from .event import COLUMNS, Event

TABLES: dict[str, str] = {
    "meta": """CREATE TABLE meta (
        id INTEGER PRIMARY KEY CHECK (id = 1),
        applied_seq INTEGER NOT NULL,
        applied_hash TEXT NOT NULL)""",
    "images": """CREATE TABLE images (
        name TEXT PRIMARY KEY,
        digest TEXT NOT NULL,
        size INTEGER NOT NULL,
        created_seq INTEGER NOT NULL,
        created_at TEXT NOT NULL,
        tx TEXT NOT NULL)""",
    "roots": """CREATE TABLE roots (
        holder TEXT PRIMARY KEY,
        digest TEXT NOT NULL)""",
    "object_refs": """CREATE TABLE object_refs (
        object TEXT PRIMARY KEY,
        refcount INTEGER NOT NULL CHECK (refcount >= 0),
        size INTEGER NOT NULL) WITHOUT ROWID""",
    "deployments": """CREATE TABLE deployments (
        slot TEXT PRIMARY KEY CHECK (slot IN ('current', 'previous')),
        image TEXT NOT NULL,
        digest TEXT NOT NULL,
        seq INTEGER NOT NULL)""",
    "mounts": """CREATE TABLE mounts (
        mountpoint TEXT PRIMARY KEY,
        image TEXT NOT NULL,
        digest TEXT NOT NULL,
        boot_id TEXT NOT NULL,
        state TEXT NOT NULL CHECK (state IN ('mounted', 'lost')),
        seq INTEGER NOT NULL)""",
    "transactions": """CREATE TABLE transactions (
        id TEXT PRIMARY KEY,
        state TEXT NOT NULL CHECK (state IN ('open', 'committed', 'aborted')),
        explicit INTEGER NOT NULL,
        begun_seq INTEGER NOT NULL,
        begun_at TEXT NOT NULL,
        ended_seq INTEGER,
        ended_at TEXT)""",
    "tx_ops": """CREATE TABLE tx_ops (
        seq INTEGER PRIMARY KEY,
        tx TEXT NOT NULL,
        op TEXT NOT NULL CHECK (op IN ('create', 'delete', 'deploy')),
        name TEXT NOT NULL,
        digest TEXT NOT NULL,
        data TEXT NOT NULL,
        effective_seq INTEGER)""",
}

INDEXES: tuple[str, ...] = (
    "CREATE INDEX roots_digest ON roots(digest)",
    "CREATE INDEX object_refs_garbage ON object_refs(object) WHERE refcount = 0",
    "CREATE INDEX tx_ops_tx ON tx_ops(tx, op, name)",
)


def create(conn: sqlite3.Connection) -> None:
    """Create the projection's tables, empty, at ``applied_seq`` 0."""
    for ddl in TABLES.values():
        conn.execute(ddl)
    for ddl in INDEXES:
        conn.execute(ddl)
    conn.execute("INSERT INTO meta (id, applied_seq, applied_hash) VALUES (1, 0, '')")


def applied_seq(conn: sqlite3.Connection) -> int:
    return conn.execute("SELECT applied_seq FROM meta").fetchone()[0]


# --- roots and refcounts -------------------------------------------------

_HOLD_OBJECTS = """
    INSERT INTO object_refs (object, refcount, size)
    SELECT object, 1, size FROM image_objects WHERE digest = ? AND true
    ON CONFLICT (object) DO UPDATE SET refcount = refcount + 1"""

_RELEASE_OBJECTS = """
    UPDATE object_refs SET refcount = refcount - 1
    WHERE object IN (SELECT object FROM image_objects WHERE digest = ?)"""

_BULK_REFS = """
    INSERT INTO object_refs (object, refcount, size)
    SELECT io.object, count(h.digest), min(io.size)
      FROM image_objects AS io
      LEFT JOIN (SELECT DISTINCT digest FROM roots) AS h ON h.digest = io.digest
     WHERE io.digest IN (SELECT value FROM json_each(?))
     GROUP BY io.object"""


_SWEEP = """
    DELETE FROM object_refs
     WHERE refcount = 0 AND object NOT IN (SELECT value FROM json_each(?))"""

#: which of some objects (JSON) the digests (JSON) list
_LISTED = """
    SELECT DISTINCT object FROM image_objects
     WHERE object IN (SELECT value FROM json_each(?)) AND digest IN (SELECT value FROM json_each(?))"""

#: rows a sweep spared that no digest held since gave back: refcount 0
_SPARED_REFS = """
    INSERT INTO object_refs (object, refcount, size)
    SELECT object, 0, min(size) FROM image_objects
     WHERE object IN (SELECT value FROM json_each(?))
     GROUP BY object
    ON CONFLICT (object) DO NOTHING"""


def _holders(conn: sqlite3.Connection, digest: str) -> int:
    return conn.execute("SELECT count(*) FROM roots WHERE digest = ?", (digest,)).fetchone()[0]


class Refs:
    """Keeps ``object_refs`` and ``meta`` in step with the events, one by one.

    Object rows change only when a digest gains its first root or loses its
    last one; ``gc.swept`` drops the rows at zero, except the ``spared`` ones.
    """

    def gained(self, conn: sqlite3.Connection, digest: str) -> None:
        if _holders(conn, digest) == 1:
            conn.execute(_HOLD_OBJECTS, (digest,))

    def lost(self, conn: sqlite3.Connection, digest: str) -> None:
        if _holders(conn, digest) == 0:
            conn.execute(_RELEASE_OBJECTS, (digest,))

    def swept(self, conn: sqlite3.Connection, spared: list[str]) -> None:
        conn.execute(_SWEEP, (json.dumps(spared),))

    def has_manifest(self, conn: sqlite3.Connection, digest: str) -> bool:
        return conn.execute("SELECT 1 FROM images_manifest WHERE digest = ?", (digest,)).fetchone() is not None

    def advance(self, conn: sqlite3.Connection, ev: Event) -> None:
        """Move ``applied_seq`` to the event, refusing any event but the next one."""
        moved = conn.execute(
            "UPDATE meta SET applied_seq = ?, applied_hash = ? WHERE applied_seq = ?",
            (ev.seq, ev.hash, ev.seq - 1),
        ).rowcount
        if moved != 1:
            raise ProjectionError(f"event {ev.seq} applied out of order (applied_seq is {applied_seq(conn)})", ev.seq)


class DeferredRefs(Refs):
    """For a replay from scratch: compute ``object_refs`` and ``meta`` once, at the end.

    An object has a row exactly when some digest listing it was held at a
    moment since the last ``gc.swept`` (a sweep keeps the rows of the digests
    held then), or when that sweep spared its row. So it suffices to
    remember those digests and spared objects and, in ``finish``, count for
    each of their objects the digests still held. The property test checks
    that this gives the same table as ``Refs``.
    """

    def __init__(self) -> None:
        self.touched: set[str] = set()
        #: rows the last sweep kept at zero (a name with no row then is not one)
        self.spared: set[str] = set()
        self.last: tuple[int, str] | None = None
        self.expected = 1
        self.manifests: set[str] = set()

    def has_manifest(self, conn: sqlite3.Connection, digest: str) -> bool:
        """Manifests are never removed, so a digest found once is remembered for the replay."""
        if digest not in self.manifests and super().has_manifest(conn, digest):
            self.manifests.add(digest)
        return digest in self.manifests

    def gained(self, conn: sqlite3.Connection, digest: str) -> None:
        self.touched.add(digest)

    def lost(self, conn: sqlite3.Connection, digest: str) -> None:
        pass

    def swept(self, conn: sqlite3.Connection, spared: list[str]) -> None:
        if spared:
            had_rows = self.spared | {row[0] for row in conn.execute(
                _LISTED, (json.dumps(spared), json.dumps(sorted(self.touched))))}
            self.spared = had_rows.intersection(spared)
        else:
            self.spared = set()
        self.touched = {row[0] for row in conn.execute("SELECT DISTINCT digest FROM roots")}

    def advance(self, conn: sqlite3.Connection, ev: Event) -> None:
        if ev.seq != self.expected:
            raise ProjectionError(f"event {ev.seq} replayed out of order (expected {self.expected})", ev.seq)
        self.expected += 1
        self.last = (ev.seq, ev.hash)

    def finish(self, conn: sqlite3.Connection) -> None:
        """Write the refcounts and the applied position; the caller then commits."""
        conn.execute("DELETE FROM object_refs")
        conn.execute(_BULK_REFS, (json.dumps(sorted(self.touched)),))
        if self.spared:
            conn.execute(_SPARED_REFS, (json.dumps(sorted(self.spared)),))
        if self.last is not None:
            conn.execute("UPDATE meta SET applied_seq = ?, applied_hash = ?", self.last)


INCREMENTAL = Refs()


def _set_root(conn: sqlite3.Connection, refs: Refs, holder: str, digest: str | None) -> None:
    """Point ``holder`` at ``digest`` (None removes it), adjusting refcounts.

    The new digest is held before the old one is released, so moving a root
    between two digests that stay held touches no object row.
    """
    row = conn.execute("SELECT digest FROM roots WHERE holder = ?", (holder,)).fetchone()
    old = row[0] if row else None
    if old == digest:
        return
    if digest is not None:
        if not refs.has_manifest(conn, digest):
            raise ProjectionError(f"{holder}: no manifest recorded for image digest {digest}")
        conn.execute(
            "INSERT INTO roots (holder, digest) VALUES (?, ?) "
            "ON CONFLICT (holder) DO UPDATE SET digest = excluded.digest",
            (holder, digest),
        )
        refs.gained(conn, digest)
    else:
        conn.execute("DELETE FROM roots WHERE holder = ?", (holder,))
    if old is not None:
        refs.lost(conn, old)


# --- helpers over the state -----------------------------------------------


def _image_digest(conn: sqlite3.Connection, name: str) -> str | None:
    row = conn.execute("SELECT digest FROM images WHERE name = ?", (name,)).fetchone()
    return row[0] if row else None


def _open_tx(conn: sqlite3.Connection, ev: Event) -> bool:
    """True if the event's tx is open; False if unknown. A closed tx is refused."""
    row = conn.execute("SELECT state FROM transactions WHERE id = ?", (ev.tx,)).fetchone()
    if row is None:
        return False
    if row[0] != "open":
        raise ProjectionError(f"transaction {ev.tx} is {row[0]}", ev.seq, ev.kind)
    return True


def _require_open_tx(conn: sqlite3.Connection, ev: Event) -> None:
    if not _open_tx(conn, ev):
        raise ProjectionError(f"transaction {ev.tx} was never begun", ev.seq, ev.kind)


def _pending(conn: sqlite3.Connection, tx: str, op: str, name: str) -> int | None:
    row = conn.execute(
        "SELECT seq FROM tx_ops WHERE tx = ? AND op = ? AND name = ? AND effective_seq IS NULL",
        (tx, op, name),
    ).fetchone()
    return row[0] if row else None


def _settle(conn: sqlite3.Connection, ev: Event, refs: Refs, op: str, name: str) -> None:
    """Mark the pending staged ``op`` of ``name`` in the event's open tx as effective."""
    if not _open_tx(conn, ev):
        return
    staged = _pending(conn, ev.tx, op, name)
    if staged is not None:
        conn.execute("UPDATE tx_ops SET effective_seq = ? WHERE seq = ?", (ev.seq, staged))
        if op == "create":
            _set_root(conn, refs, f"staged:{ev.tx}:{name}", None)


def _slot(conn: sqlite3.Connection, slot: str) -> k.Slot | None:
    row = conn.execute("SELECT image, digest FROM deployments WHERE slot = ?", (slot,)).fetchone()
    return k.Slot(row[0], row[1]) if row else None


def _fail(ev: Event, message: str) -> ProjectionError:
    return ProjectionError(f"{ev.kind} {ev.subject!r} (seq {ev.seq}): {message}", ev.seq, ev.kind)


# --- apply functions, one per event kind ---------------------------------
#
# Each takes the event row (seq, at, tx, subject) and its data as the kind's
# class (``kinds``), already checked field by field.


def _tx_begun(conn: sqlite3.Connection, ev: Event, body: k.TxBegun, refs: Refs) -> None:
    if ev.subject != ev.tx:
        raise _fail(ev, "subject must be the transaction id")
    try:
        conn.execute(
            "INSERT INTO transactions (id, state, explicit, begun_seq, begun_at) VALUES (?, 'open', ?, ?, ?)",
            (ev.tx, int(bool(body.explicit)), ev.seq, ev.at),
        )
    except sqlite3.IntegrityError:
        raise _fail(ev, "transaction id already used") from None


def _tx_end(conn: sqlite3.Connection, ev: Event, refs: Refs, state: str) -> None:
    if ev.subject != ev.tx:
        raise _fail(ev, "subject must be the transaction id")
    _require_open_tx(conn, ev)
    done = "effective_seq IS NULL" if state == "committed" else "effective_seq IS NOT NULL"
    left = conn.execute(f"SELECT op, name FROM tx_ops WHERE tx = ? AND {done}", (ev.tx,)).fetchall()
    if left:
        what = ", ".join(f"{op} {name}" for op, name in left)
        if state == "committed":
            raise _fail(ev, f"staged operations not made effective: {what}")
        raise _fail(ev, f"operations already effective, cannot abort: {what}")
    if state == "aborted":
        for (name,) in conn.execute(
            "SELECT name FROM tx_ops WHERE tx = ? AND op = 'create' AND effective_seq IS NULL", (ev.tx,)
        ).fetchall():
            _set_root(conn, refs, f"staged:{ev.tx}:{name}", None)
    conn.execute(
        "UPDATE transactions SET state = ?, ended_seq = ?, ended_at = ? WHERE id = ?",
        (state, ev.seq, ev.at, ev.tx),
    )


def _tx_committed(conn: sqlite3.Connection, ev: Event, body: k.TxCommitted, refs: Refs) -> None:
    _tx_end(conn, ev, refs, "committed")


def _tx_aborted(conn: sqlite3.Connection, ev: Event, body: k.TxAborted, refs: Refs) -> None:
    _tx_end(conn, ev, refs, "aborted")


def _stage(conn: sqlite3.Connection, ev: Event, body: k.ImageStaged | k.DeleteStaged | k.DeployStaged,
           refs: Refs, op: str) -> None:
    _require_open_tx(conn, ev)
    name, digest = ev.subject, body.digest
    if _pending(conn, ev.tx, op, name) is not None:
        raise _fail(ev, f"already staged in transaction {ev.tx}")
    live = _image_digest(conn, name)
    replaced = _pending(conn, ev.tx, "delete", name) is not None
    row = conn.execute(
        "SELECT digest FROM tx_ops WHERE tx = ? AND op = 'create' AND name = ? AND effective_seq IS NULL",
        (ev.tx, name),
    ).fetchone()
    creating = row[0] if row else None
    if op == "create" and live is not None and not replaced:
        raise _fail(ev, "name is taken by a live image")
    if op == "delete" and (live is None or creating is not None):
        raise _fail(ev, "no live image of that name")
    if op == "delete" and digest != live:
        raise _fail(ev, f"live image has digest {live}, not {digest}")
    if op == "deploy" and digest != (creating if creating is not None else (None if replaced else live)):
        raise _fail(ev, "image with that digest is neither live nor staged in this transaction")
    conn.execute(
        "INSERT INTO tx_ops (seq, tx, op, name, digest, data) VALUES (?, ?, ?, ?, ?, ?)",
        (ev.seq, ev.tx, op, name, digest, json.dumps(body.to_data(), sort_keys=True, separators=(",", ":"))),
    )
    if op == "create":
        _set_root(conn, refs, f"staged:{ev.tx}:{name}", digest)


def _image_staged(conn: sqlite3.Connection, ev: Event, body: k.ImageStaged, refs: Refs) -> None:
    _stage(conn, ev, body, refs, "create")


def _delete_staged(conn: sqlite3.Connection, ev: Event, body: k.DeleteStaged, refs: Refs) -> None:
    _stage(conn, ev, body, refs, "delete")


def _deploy_staged(conn: sqlite3.Connection, ev: Event, body: k.DeployStaged, refs: Refs) -> None:
    _stage(conn, ev, body, refs, "deploy")


def _deploy_unstaged(conn: sqlite3.Connection, ev: Event, body: k.DeployUnstaged, refs: Refs) -> None:
    _require_open_tx(conn, ev)
    seq = _pending(conn, ev.tx, "deploy", ev.subject)
    if seq is None:
        raise _fail(ev, f"no deploy of that image staged in transaction {ev.tx}")
    conn.execute("DELETE FROM tx_ops WHERE seq = ?", (seq,))


def _image_created(conn: sqlite3.Connection, ev: Event, body: k.ImageCreated, refs: Refs) -> None:
    if _image_digest(conn, ev.subject) is not None:
        raise _fail(ev, "name is taken by a live image")
    conn.execute(
        "INSERT INTO images (name, digest, size, created_seq, created_at, tx) VALUES (?, ?, ?, ?, ?, ?)",
        (ev.subject, body.digest, body.size or 0, ev.seq, ev.at, ev.tx),
    )
    _set_root(conn, refs, f"image:{ev.subject}", body.digest)
    _settle(conn, ev, refs, "create", ev.subject)


def _image_deleted(conn: sqlite3.Connection, ev: Event, body: k.ImageDeleted, refs: Refs) -> None:
    live = _image_digest(conn, ev.subject)
    if live is None:
        raise _fail(ev, "no live image of that name")
    if body.digest is not None and body.digest != live:
        raise _fail(ev, f"live image has digest {live}, not {body.digest}")
    conn.execute("DELETE FROM images WHERE name = ?", (ev.subject,))
    _set_root(conn, refs, f"image:{ev.subject}", None)
    _settle(conn, ev, refs, "delete", ev.subject)


def _set_deployments(conn: sqlite3.Connection, ev: Event, body: k.Deployed | k.RolledBack, refs: Refs) -> None:
    for slot, target in (("current", body.current), ("previous", body.previous)):
        if target is None:
            conn.execute("DELETE FROM deployments WHERE slot = ?", (slot,))
            _set_root(conn, refs, f"deploy:{slot}", None)
        else:
            conn.execute(
                "INSERT OR REPLACE INTO deployments (slot, image, digest, seq) VALUES (?, ?, ?, ?)",
                (slot, target.image, target.digest, ev.seq),
            )
            _set_root(conn, refs, f"deploy:{slot}", target.digest)


def _deployed(conn: sqlite3.Connection, ev: Event, body: k.Deployed, refs: Refs) -> None:
    if body.current.image != ev.subject:
        raise _fail(ev, "data.current must be {image: subject, digest}")
    if _image_digest(conn, ev.subject) != body.current.digest:
        raise _fail(ev, "only a live image can be deployed")
    current = _slot(conn, "current")
    if body.previous != current:
        shown = current.to_data() if current else None
        raise _fail(ev, f"data.previous must be the current deployment {shown}")
    _set_deployments(conn, ev, body, refs)
    _settle(conn, ev, refs, "deploy", ev.subject)


def _rolled_back(conn: sqlite3.Connection, ev: Event, body: k.RolledBack, refs: Refs) -> None:
    before_current, before_previous = _slot(conn, "current"), _slot(conn, "previous")
    if before_previous is None:
        raise _fail(ev, "no previous deployment")
    if body.current != before_previous or body.previous != before_current:
        raise _fail(ev, "data must swap the current and previous deployments")
    if ev.subject != before_previous.image:
        raise _fail(ev, "subject must be the image rolled back to")
    _set_deployments(conn, ev, body, refs)


def _undeployed(conn: sqlite3.Connection, ev: Event, body: k.Undeployed, refs: Refs) -> None:
    if body.slot != "previous":
        raise _fail(ev, "only the previous deployment can be dropped (the next boot needs the current one)")
    previous = _slot(conn, "previous")
    if previous is None or previous != k.Slot(ev.subject, body.digest):
        shown = previous.to_data() if previous else None
        raise _fail(ev, f"the previous deployment is {shown}, not {{image: subject, digest}}")
    conn.execute("DELETE FROM deployments WHERE slot = 'previous'")
    _set_root(conn, refs, "deploy:previous", None)


def _mounted(conn: sqlite3.Connection, ev: Event, body: k.Mounted, refs: Refs) -> None:
    mountpoint, digest = body.mountpoint, body.digest
    row = conn.execute("SELECT state FROM mounts WHERE mountpoint = ?", (mountpoint,)).fetchone()
    if row is not None and row[0] == "mounted":
        raise _fail(ev, f"{mountpoint} is already mounted")
    conn.execute(
        "INSERT OR REPLACE INTO mounts (mountpoint, image, digest, boot_id, state, seq) "
        "VALUES (?, ?, ?, ?, 'mounted', ?)",
        (mountpoint, ev.subject, digest, body.boot_id or "", ev.seq),
    )
    _set_root(conn, refs, f"mount:{mountpoint}", digest)


def _mount_row(conn: sqlite3.Connection, ev: Event, mountpoint: str) -> tuple[str, str]:
    row = conn.execute("SELECT mountpoint, state FROM mounts WHERE mountpoint = ?", (mountpoint,)).fetchone()
    if row is None:
        raise _fail(ev, f"nothing recorded as mounted at {mountpoint}")
    return row[0], row[1]


def _unmounted(conn: sqlite3.Connection, ev: Event, body: k.Unmounted, refs: Refs) -> None:
    mountpoint, _ = _mount_row(conn, ev, body.mountpoint)
    conn.execute("DELETE FROM mounts WHERE mountpoint = ?", (mountpoint,))
    _set_root(conn, refs, f"mount:{mountpoint}", None)


def _mount_lost(conn: sqlite3.Connection, ev: Event, body: k.MountLost, refs: Refs) -> None:
    mountpoint, state = _mount_row(conn, ev, body.mountpoint)
    if state != "mounted":
        raise _fail(ev, f"{mountpoint} is already marked lost")
    conn.execute("UPDATE mounts SET state = 'lost', seq = ? WHERE mountpoint = ?", (ev.seq, mountpoint))
    _set_root(conn, refs, f"mount:{mountpoint}", None)


def _gc_swept(conn: sqlite3.Connection, ev: Event, body: k.GcSwept, refs: Refs) -> None:
    """Forget the garbage rows (gc removed their objects), but the ``spared`` ones.

    Before ``spared`` existed a sweep dropped every row at zero, as one
    without it still does.
    """
    refs.swept(conn, list(body.spared))


def _info(conn: sqlite3.Connection, ev: Event, body: k.EventData, refs: Refs) -> None:
    """Events recorded for the audit only (gc.begun, booted, recover.*, drift.*)."""


APPLY: dict[str, Callable[[sqlite3.Connection, Event, k.EventData, Refs], None]] = {
    "tx.begun": _tx_begun,
    "tx.committed": _tx_committed,
    "tx.aborted": _tx_aborted,
    "image.staged": _image_staged,
    "delete.staged": _delete_staged,
    "deploy.staged": _deploy_staged,
    "deploy.unstaged": _deploy_unstaged,
    "image.created": _image_created,
    "image.deleted": _image_deleted,
    "deployed": _deployed,
    "rolled-back": _rolled_back,
    "undeployed": _undeployed,
    "mounted": _mounted,
    "unmounted": _unmounted,
    "mount.lost": _mount_lost,
    "gc.begun": _info,
    "gc.swept": _gc_swept,
    "booted": _info,
}


def known_kind(kind: str) -> bool:
    return kind in k.KINDS or k.is_other_info(kind)


def apply(conn: sqlite3.Connection, ev: Event, refs: Refs = INCREMENTAL) -> None:
    """Fold one event into the projection; the caller holds the write transaction.

    Raises ProjectionError when the event does not fit the state, or is not
    the next one after ``applied_seq``; the caller then rolls back.
    """
    if not known_kind(ev.kind):
        raise ProjectionError(f"unknown event kind {ev.kind!r}", ev.seq, ev.kind)
    refs.advance(conn, ev)
    try:
        body = ev.typed()
    except k.EventDataError as e:
        raise _fail(ev, str(e)) from None
    APPLY.get(ev.kind, _info)(conn, ev, body, refs)


def _replay(conn: sqlite3.Connection, after: int, refs: Refs) -> int:
    count = 0
    for row in conn.execute(f"SELECT {COLUMNS} FROM events WHERE seq > ? ORDER BY seq", (after,)):
        apply(conn, Event.from_row(row), refs)
        count += 1
    return count


def rebuild(conn: sqlite3.Connection) -> int:
    """Empty the projection and replay every event; the caller holds the write transaction."""
    for table in TABLES:
        conn.execute(f"DELETE FROM {table}")
    conn.execute("INSERT INTO meta (id, applied_seq, applied_hash) VALUES (1, 0, '')")
    refs = DeferredRefs()
    count = _replay(conn, 0, refs)
    refs.finish(conn)
    return count


def catch_up(conn: sqlite3.Connection) -> int:
    """Apply the events after ``applied_seq``; the caller holds the write transaction."""
    applied = applied_seq(conn)
    last = conn.execute("SELECT coalesce(max(seq), 0) FROM events").fetchone()[0]
    if applied > last:
        raise ChainBroken(last + 1, f"events missing: the projection was applied up to seq {applied}")
    return _replay(conn, applied, INCREMENTAL)
