"""The journal file: connection settings, versioned migrations, features.

The format version is ``PRAGMA user_version``: the number of migrations
applied, each recorded by name in ``migrations``. ``features`` lists what a
reader must understand; a journal with a higher version, or a required
feature this code does not know, was written by a newer apt-layer and is
refused *before anything is written* (not even the switch to WAL mode).

Each migration runs in its own ``BEGIN IMMEDIATE`` transaction together with
its record and the new ``user_version``, so a crash leaves the journal at one
version or the next, and two processes opening a fresh journal at once apply
each migration exactly once.
"""

from __future__ import annotations

import os
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone

from . import projection, views
from .errors import JournalCorruptError, JournalVersionError

BUSY_TIMEOUT_S = 30.0
CACHE_KIB = 65536  # page cache per connection, allocated as used: rebuilds touch every refcount row

_JOURNAL_DDL = (
    """CREATE TABLE events (
        seq INTEGER PRIMARY KEY,
        at TEXT NOT NULL,
        tx TEXT NOT NULL,
        kind TEXT NOT NULL,
        subject TEXT NOT NULL,
        data TEXT NOT NULL,
        actor TEXT NOT NULL,
        hash TEXT NOT NULL)""",
    "CREATE INDEX events_subject ON events(subject, seq)",
    "CREATE INDEX events_kind ON events(kind, seq)",
    "CREATE INDEX events_tx ON events(tx, seq)",
    "CREATE INDEX events_at ON events(at)",
    """CREATE TABLE images_manifest (
        digest TEXT PRIMARY KEY,
        seq INTEGER NOT NULL REFERENCES events(seq),
        objects INTEGER NOT NULL,
        size INTEGER NOT NULL,
        hash TEXT NOT NULL)""",
    """CREATE TABLE image_objects (
        digest TEXT NOT NULL REFERENCES images_manifest(digest),
        object TEXT NOT NULL,
        size INTEGER NOT NULL,
        PRIMARY KEY (digest, object)) WITHOUT ROWID""",
    "CREATE INDEX image_objects_object ON image_objects(object)",
)


def _journal(conn: sqlite3.Connection) -> None:
    for ddl in _JOURNAL_DDL:
        conn.execute(ddl)


def _projection(conn: sqlite3.Connection) -> None:
    """Create the projection and fold in the events an older apt-layer recorded."""
    projection.create(conn)
    projection.rebuild(conn)


def _views(conn: sqlite3.Connection) -> None:
    # Imported here: sqlite_utils costs ~35 ms to import, and recovery at
    # boot opens the journal without ever running a migration.
    import sqlite_utils

    db = sqlite_utils.Database(conn)
    for name, sql in views.VIEWS.items():
        db.create_view(name, sql)


@dataclass(frozen=True)
class Migration:
    name: str
    apply: Callable[[sqlite3.Connection], None]
    features: tuple[str, ...]


MIGRATIONS: tuple[Migration, ...] = (
    Migration("0001-events-and-manifests", _journal, ("events-blake3-chain", "manifests")),
    Migration("0002-projection", _projection, ("projection-digest-refcounts",)),
    Migration("0003-audit-views", _views, ("audit-views",)),
)
SCHEMA_VERSION = len(MIGRATIONS)
KNOWN_FEATURES = frozenset(f for m in MIGRATIONS for f in m.features)


def corrupt_error(path: str | os.PathLike, e: sqlite3.DatabaseError) -> Exception:
    if getattr(e, "sqlite_errorname", "") in ("SQLITE_CORRUPT", "SQLITE_NOTADB"):
        return JournalCorruptError(f"{path}: damaged SQLite database: {e}")
    return e


def check_version(conn: sqlite3.Connection, path: str | os.PathLike) -> int:
    """Return the journal's version, or raise if a newer apt-layer wrote it. Reads only."""
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    unknown: tuple[str, ...] = ()
    if conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'features'").fetchone():
        required = [r[0] for r in conn.execute("SELECT name FROM features WHERE required")]
        unknown = tuple(sorted(set(required) - KNOWN_FEATURES))
    if version > SCHEMA_VERSION or unknown:
        detail = f"version {version}, this apt-layer supports up to {SCHEMA_VERSION}"
        if unknown:
            detail += f"; unknown required features: {', '.join(unknown)}"
        raise JournalVersionError(
            f"{path}: journal written by a newer apt-layer ({detail})", version, SCHEMA_VERSION, unknown
        )
    return version


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def migrate(conn: sqlite3.Connection) -> None:
    """Apply the migrations the journal lacks, one transaction each."""
    while True:
        conn.execute("BEGIN IMMEDIATE")
        try:
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version >= SCHEMA_VERSION:
                conn.execute("COMMIT")
                return
            if version == 0:
                conn.execute("CREATE TABLE migrations (name TEXT PRIMARY KEY, version INTEGER NOT NULL, applied_at TEXT NOT NULL)")
                conn.execute("CREATE TABLE features (name TEXT PRIMARY KEY, required INTEGER NOT NULL, migration TEXT NOT NULL)")
            step = MIGRATIONS[version]
            step.apply(conn)
            conn.execute("INSERT INTO migrations VALUES (?, ?, ?)", (step.name, version + 1, _now()))
            conn.executemany(
                "INSERT INTO features VALUES (?, 1, ?)", [(f, step.name) for f in step.features]
            )
            conn.execute(f"PRAGMA user_version = {version + 1}")
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise


def connect(path: str | os.PathLike) -> sqlite3.Connection:
    """Open the journal at ``path``, creating or upgrading it as needed.

    The connection is in autocommit mode (``isolation_level=None``): callers
    issue ``BEGIN IMMEDIATE`` themselves, so that a writer takes the lock up
    front and waits up to ``BUSY_TIMEOUT_S`` for another writer.

    Opening is retried while SQLite answers BUSY, within the same budget:
    SQLite can refuse a new WAL connection at once, without calling the busy
    handler (for instance while the last other connection checkpoints and
    removes the WAL under an exclusive lock). Seen once: of four creates
    started together on a fresh store, one exited 4 with "journal is busy";
    240 repeats of that race did not show it again.
    """
    deadline = time.monotonic() + BUSY_TIMEOUT_S
    while True:
        try:
            return _connect_once(path)
        except sqlite3.OperationalError as e:
            busy = getattr(e, "sqlite_errorname", "").startswith("SQLITE_BUSY")
            if not busy or time.monotonic() > deadline:
                raise
            time.sleep(0.02)


def connect_readonly(path: str | os.PathLike) -> sqlite3.Connection:
    """Open the journal for reading only (SQLite refuses any write), for users other than root.

    A journal in WAL mode needs its ``-shm`` file: while a writer has the
    journal open it exists and a reader uses it; when none has, a user who
    cannot create files in the store's root cannot make it, and SQLite
    answers SQLITE_READONLY_DIRECTORY. Then, and only when there is no
    ``-wal`` (everything is in the main file), the file is read as
    ``immutable``: without locks, so a writer that starts and checkpoints
    during the read could show this reader a torn state; a read-only
    command then fails or shows a mix, it never changes anything.
    """
    from urllib.parse import quote

    uri = f"file:{quote(os.path.realpath(path))}?mode=ro"
    try:
        return _connect_readonly_once(uri, path)
    except sqlite3.OperationalError as e:
        no_shm = getattr(e, "sqlite_errorname", "") in ("SQLITE_READONLY_DIRECTORY", "SQLITE_CANTOPEN")
        if not no_shm or os.path.exists(f"{path}-wal"):
            raise
    return _connect_readonly_once(uri + "&immutable=1", path)


def _connect_readonly_once(uri: str, path: str | os.PathLike) -> sqlite3.Connection:
    conn = sqlite3.connect(uri, uri=True, timeout=BUSY_TIMEOUT_S, isolation_level=None)
    try:
        check_version(conn, path)
        conn.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
    except sqlite3.OperationalError:
        conn.close()
        raise
    except sqlite3.DatabaseError as e:
        conn.close()
        raise corrupt_error(path, e) from e
    except BaseException:
        conn.close()
        raise
    return conn


def _connect_once(path: str | os.PathLike) -> sqlite3.Connection:
    # No peeking at the file's header with open(): closing any descriptor of
    # the database drops every POSIX lock this process holds on it, which
    # breaks another connection the process may have open. SQLite itself
    # refuses a non-database at the first read (SQLITE_NOTADB).
    conn = sqlite3.connect(path, timeout=BUSY_TIMEOUT_S, isolation_level=None)
    try:
        check_version(conn, path)
        conn.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
        mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if mode != "wal":
            raise JournalCorruptError(f"{path}: cannot switch to WAL mode (got {mode})")
        conn.execute("PRAGMA synchronous = FULL")
        conn.execute("PRAGMA foreign_keys = ON")
        conn.execute(f"PRAGMA cache_size = -{CACHE_KIB}")
        migrate(conn)
    except sqlite3.DatabaseError as e:
        conn.close()
        raise corrupt_error(path, e) from e
    except BaseException:
        conn.close()
        raise
    return conn
