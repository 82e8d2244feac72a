"""Read-only SQL over the journal, for ``apt-layer audit "SELECT ..."``.

Two locks, either of which suffices: the file is opened with a
``mode=ro`` URI (SQLite itself refuses to write), and an authorizer allows
only reading (SELECT, reading columns, calling functions, recursive CTEs) and
a few introspection pragmas. Anything else (INSERT, UPDATE, DELETE, CREATE,
DROP, ATTACH, a pragma that sets a value, a temp table, a transaction) is
refused with ``AuditRefused`` before it runs.

A query is bounded too (``AuditLimit``): a progress handler stops it at its
time limit, SQLite's heap is capped (``sqlite3_hard_heap_limit64``, with
temporary tables in memory so the cap covers them), and so are the bytes of
the rows collected.
"""

from __future__ import annotations

import os
import sqlite3
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

from . import schema
from .errors import AuditLimit, AuditQueryError, AuditRefused

_ALLOWED = {sqlite3.SQLITE_SELECT, sqlite3.SQLITE_READ, sqlite3.SQLITE_FUNCTION, sqlite3.SQLITE_RECURSIVE}
_INTROSPECTION_PRAGMAS = {
    "table_info", "table_xinfo", "table_list", "index_list", "index_info", "index_xinfo", "foreign_key_list",
}
_VALUE_PRAGMAS = {"user_version", "data_version", "schema_version"}
_ACTIONS = (
    "CREATE_INDEX CREATE_TABLE CREATE_TEMP_INDEX CREATE_TEMP_TABLE CREATE_TEMP_TRIGGER CREATE_TEMP_VIEW "
    "CREATE_TRIGGER CREATE_VIEW DELETE DROP_INDEX DROP_TABLE DROP_TEMP_INDEX DROP_TEMP_TABLE "
    "DROP_TEMP_TRIGGER DROP_TEMP_VIEW DROP_TRIGGER DROP_VIEW INSERT PRAGMA READ SELECT TRANSACTION "
    "UPDATE ATTACH DETACH ALTER_TABLE REINDEX ANALYZE CREATE_VTABLE DROP_VTABLE FUNCTION SAVEPOINT RECURSIVE"
).split()
#: defaults of ``query``'s bounds
TIMEOUT_S = 10.0
MEMORY_BYTES = 256 << 20
#: SQLite virtual-machine steps between two looks at the clock
_STEPS_PER_CHECK = 10_000

_ACTION_NAMES = {getattr(sqlite3, f"SQLITE_{a}"): a.lower().replace("_", " ") for a in _ACTIONS}


@dataclass(frozen=True)
class AuditResult:
    columns: list[str]
    rows: list[tuple]

    def dicts(self) -> list[dict]:
        return [dict(zip(self.columns, row)) for row in self.rows]


class _Guard:
    """The authorizer; remembers the first refusal so the error can name it."""

    def __init__(self) -> None:
        self.refused: str | None = None

    def __call__(self, action: int, arg1: str | None, arg2: str | None, db: str | None, source: str | None) -> int:
        if action in _ALLOWED:
            return sqlite3.SQLITE_OK
        if action == sqlite3.SQLITE_PRAGMA:
            pragma = (arg1 or "").lower()
            if pragma in _INTROSPECTION_PRAGMAS or (pragma in _VALUE_PRAGMAS and arg2 is None):
                return sqlite3.SQLITE_OK
        if self.refused is None:
            what = _ACTION_NAMES.get(action, f"action {action}")
            self.refused = f"{what} {arg1 or ''}".strip()
        return sqlite3.SQLITE_DENY


@contextmanager
def readonly(path: str | os.PathLike, guard: _Guard | None = None) -> Iterator[sqlite3.Connection]:
    """A read-only, version-checked connection with the authorizer installed."""
    if not os.path.exists(path):
        raise FileNotFoundError(path)
    conn = schema.connect_readonly(path)
    try:
        conn.set_authorizer(guard or _Guard())
        yield conn
    finally:
        conn.close()


def query(path: str | os.PathLike, sql: str, params: Sequence | dict = (), *, timeout: float = TIMEOUT_S,
          memory: int = MEMORY_BYTES) -> AuditResult:
    """Run one read-only statement; AuditRefused for anything else, AuditLimit past its bounds.

    ``timeout`` is in seconds; ``memory`` caps SQLite's heap and, separately,
    the rows collected (both in bytes). The heap limit is process-wide in
    SQLite, so it is set for the query and restored after.
    """
    guard = _Guard()
    deadline = time.monotonic() + timeout
    with readonly(path, guard) as conn:
        conn.set_authorizer(None)  # a pragma the guard refuses to the query
        conn.execute("PRAGMA temp_store = MEMORY")
        conn.set_authorizer(guard)
        previous = _heap_limit(memory)
        conn.set_progress_handler(lambda: time.monotonic() > deadline, _STEPS_PER_CHECK)
        try:
            cursor = conn.execute(sql, params)
            rows = _collect(cursor, memory)
        except sqlite3.ProgrammingError as e:
            raise AuditRefused("audit runs one SQL statement at a time; this query has more than one") from None
        except sqlite3.DatabaseError as e:
            if guard.refused is not None:
                raise AuditRefused(f"audit is read-only: {guard.refused} refused") from None
            name = getattr(e, "sqlite_errorname", "")
            if name == "SQLITE_READONLY":
                raise AuditRefused(f"audit is read-only: {e}") from None
            if name == "SQLITE_INTERRUPT":
                raise AuditLimit(f"the query ran past its time limit of {timeout:g} s and was stopped "
                                 "(--timeout SECONDS gives it longer)") from None
            if name == "SQLITE_NOMEM" or isinstance(e, sqlite3.OperationalError) and "out of memory" in str(e):
                raise AuditLimit(f"the query needed more than its memory cap of {memory >> 20} MiB and was "
                                 "stopped (narrow it, or add LIMIT)") from None
            if isinstance(e, sqlite3.OperationalError):
                raise AuditQueryError(str(e)) from None
            raise
        except MemoryError:
            raise AuditLimit(f"the query needed more than its memory cap of {memory >> 20} MiB and was "
                             "stopped (narrow it, or add LIMIT)") from None
        finally:
            conn.set_progress_handler(None, 0)
            _heap_limit(previous)
        columns = [d[0] for d in cursor.description or ()]
        return AuditResult(columns, rows)


def _heap_limit(limit: int | None) -> int | None:
    """Set SQLite's process-wide hard heap limit (0: none); returns the one before, None if unsettable.

    Through the C function: ``PRAGMA hard_heap_limit`` can only lower the
    limit, so it could not be put back after the query. A Python whose
    SQLite cannot be reached this way gets only the cap on collected rows.
    """
    if limit is None:
        return None
    try:
        import ctypes

        lib = ctypes.CDLL("libsqlite3.so.0")
        lib.sqlite3_hard_heap_limit64.restype = ctypes.c_int64
        lib.sqlite3_hard_heap_limit64.argtypes = [ctypes.c_int64]
    except (OSError, AttributeError):
        return None
    return int(lib.sqlite3_hard_heap_limit64(int(limit)))


def _collect(cursor: sqlite3.Cursor, memory: int) -> list[tuple]:
    """The rows, stopped once their values take more than ``memory`` bytes (counted roughly)."""
    rows: list[tuple] = []
    held = 0
    while batch := cursor.fetchmany(1024):
        rows.extend(batch)
        held += sum(16 + (len(v) if isinstance(v, (str, bytes)) else 8) for row in batch for v in row)
        if held > memory:
            raise MemoryError
    return rows
