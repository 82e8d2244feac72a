"""Read-only SQL over the journal, for ``apt-layer audit "SELECT ..."``.

Two locks, either of which suffices: the file is opened with a
``mode=ro`` URI (SQLite itself refuses to write), and an authorizer allows
only reading (SELECT, reading columns, calling functions, recursive CTEs) and
a few introspection pragmas. Anything else (INSERT, UPDATE, DELETE, CREATE,
DROP, ATTACH, a pragma that sets a value, a temp table, a transaction) is
refused with ``AuditRefused`` before it runs.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

from . import schema
from .errors import AuditQueryError, AuditRefused

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


def _uri(path: str | os.PathLike) -> str:
    return f"file:{quote(os.fspath(Path(path).resolve()))}?mode=ro"


@contextmanager
def readonly(path: str | os.PathLike, guard: _Guard | None = None) -> Iterator[sqlite3.Connection]:
    """A read-only, version-checked connection with the authorizer installed."""
    if not os.path.exists(path):
        raise FileNotFoundError(path)
    conn = sqlite3.connect(_uri(path), uri=True, timeout=schema.BUSY_TIMEOUT_S)
    try:
        try:
            schema.check_version(conn, path)
        except sqlite3.DatabaseError as e:
            raise schema.corrupt_error(path, e) from e
        conn.set_authorizer(guard or _Guard())
        yield conn
    finally:
        conn.close()


def query(path: str | os.PathLike, sql: str, params: Sequence | dict = ()) -> AuditResult:
    """Run one read-only statement; raise AuditRefused for anything else."""
    guard = _Guard()
    with readonly(path, guard) as conn:
        try:
            cursor = conn.execute(sql, params)
            rows = cursor.fetchall()
        except sqlite3.ProgrammingError as e:
            raise AuditRefused("audit runs one SQL statement at a time; this query has more than one") from None
        except sqlite3.DatabaseError as e:
            if guard.refused is not None:
                raise AuditRefused(f"audit is read-only: {guard.refused} refused") from None
            if getattr(e, "sqlite_errorname", "") == "SQLITE_READONLY":
                raise AuditRefused(f"audit is read-only: {e}") from None
            if isinstance(e, sqlite3.OperationalError):
                raise AuditQueryError(str(e)) from None
            raise
        columns = [d[0] for d in cursor.description or ()]
        return AuditResult(columns, rows)
