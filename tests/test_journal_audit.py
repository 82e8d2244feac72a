"""Read-only audit: documented views, and every kind of write refused."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
import sqlite_utils

from aptlayer.journal import AuditRefused, Journal, JournalVersionError, SCHEMA_VERSION, audit_query
from aptlayer.journal.views import VIEWS


@pytest.fixture
def path(tmp_path: Path) -> Path:
    p = tmp_path / "journal.db"
    with Journal.open(p) as j:
        j.append("tx.begun", "t1", {}, "t1")
        with j.transaction() as w:
            w.append("image.created", "base", {"digest": "D1", "size": 4096}, "t1", manifest=[("o1", 10), ("o2", 20)])
            w.append("tx.committed", "t1", {}, "t1")
        j.append("tx.begun", "t2", {}, "t2")
        with j.transaction() as w:
            w.append("deployed", "base", {"current": {"image": "base", "digest": "D1"}, "previous": None}, "t2")
            w.append("tx.committed", "t2", {}, "t2")
        j.append("mounted", "base", {"mountpoint": "/mnt", "digest": "D1", "boot_id": "b"}, "m1")
        j.append("recover.done", "store", {}, "r1", actor={"user": "auditor"})
    return p


def test_views(path: Path) -> None:
    image = audit_query(path, "SELECT * FROM v_images").dicts()
    assert image == [{
        "name": "base", "digest": "D1", "size": 4096, "objects": 2, "objects_size": 30,
        "created_seq": 2, "created_at": image[0]["created_at"], "tx": "t1", "deployed": "current", "mounts": 1,
    }]
    events = audit_query(path, "SELECT seq, kind, digest, user, command FROM v_events WHERE seq = 2")
    assert events.columns == ["seq", "kind", "digest", "user", "command"]
    assert events.rows[0][:3] == (2, "image.created", "D1") and events.rows[0][4]
    assert [r[0] for r in audit_query(path, "SELECT kind FROM v_history ORDER BY seq").rows] == [
        "tx.begun", "image.created", "tx.committed", "tx.begun", "deployed", "tx.committed", "mounted"]
    usage = audit_query(path, "SELECT object, refcount, live_images FROM v_object_usage ORDER BY object").rows
    assert usage == [("o1", 1, 1), ("o2", 1, 1)]
    assert "auditor" in {r[0] for r in audit_query(path, "SELECT user FROM v_actors").rows}
    assert audit_query(path, "SELECT id, state, ops FROM v_transactions WHERE id = 't1'").rows == [("t1", "committed", 0)]
    assert audit_query(path, "SELECT count(*) FROM v_garbage").rows == [(0,)]
    assert set(VIEWS) <= {r[0] for r in audit_query(path, "SELECT name FROM sqlite_master WHERE type = 'view'").rows}


def test_sqlite_utils_reads_the_file(path: Path) -> None:
    db = sqlite_utils.Database(path)
    assert [r["name"] for r in db["v_images"].rows] == ["base"]
    assert db["events"].count == 8
    db.close()


@pytest.mark.parametrize(
    "sql, refused",
    [
        ("DELETE FROM events", "delete events"),
        ("UPDATE meta SET applied_seq = 0", "update meta"),
        ("INSERT INTO images VALUES ('x', 'D', 1, 1, '', '')", "insert images"),
        ("DROP VIEW v_images", "refused"),
        ("CREATE TABLE t (x)", "refused"),
        ("CREATE TEMP TABLE t (x)", "refused"),
        ("ATTACH DATABASE '/tmp/x.db' AS x", "attach"),
        ("PRAGMA journal_mode = DELETE", "pragma journal_mode"),
        ("PRAGMA user_version = 99", "pragma user_version"),
        ("PRAGMA writable_schema = 1", "pragma writable_schema"),
        ("BEGIN", "transaction"),
        ("SELECT 1; DELETE FROM events", "^audit runs one SQL statement at a time; this query has more than one$"),
        ("VACUUM", "refused"),
    ],
)
def test_writes_refused(path: Path, sql: str, refused: str) -> None:
    before = path.read_bytes()
    with pytest.raises(AuditRefused, match=refused):
        audit_query(path, sql)
    assert path.read_bytes() == before
    with Journal.open(path) as j:
        assert j.verify() == 8 and j.check() == []


def test_reads_allowed(path: Path) -> None:
    assert audit_query(path, "PRAGMA table_info(events)").rows[0][1] == "seq"
    assert audit_query(path, "PRAGMA user_version").rows == [(SCHEMA_VERSION,)]
    assert audit_query(path, "SELECT json_extract(data, '$.digest') FROM events WHERE seq = ?", (2,)).rows == [("D1",)]
    assert audit_query(path, "SELECT * FROM events WHERE kind = :k", {"k": "mounted"}).rows[0][3] == "mounted"


def test_audit_refuses_newer_journal(path: Path) -> None:
    raw = sqlite3.connect(path)
    raw.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    raw.close()
    with pytest.raises(JournalVersionError):
        audit_query(path, "SELECT 1")


def test_audit_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        audit_query(tmp_path / "none.db", "SELECT 1")
    assert not (tmp_path / "none.db").exists()
