"""The journal file: settings, recorded migrations, refusing newer or damaged files."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from aptlayer.journal import Journal, JournalCorruptError, JournalVersionError, SCHEMA_VERSION
from aptlayer.journal.schema import MIGRATIONS, connect


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "journal.db"


def test_new_journal_settings(path: Path) -> None:
    conn = connect(path)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    assert conn.execute("PRAGMA foreign_keys").fetchone()[0] == 1
    assert conn.execute("PRAGMA busy_timeout").fetchone()[0] == 30000
    assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == len(MIGRATIONS)
    names = [r[0] for r in conn.execute("SELECT name FROM migrations ORDER BY version")]
    assert names == [m.name for m in MIGRATIONS]
    features = {r[0] for r in conn.execute("SELECT name FROM features WHERE required")}
    assert features == {f for m in MIGRATIONS for f in m.features}
    conn.close()


def test_reopen_applies_nothing(path: Path) -> None:
    connect(path).close()
    conn = connect(path)
    assert conn.execute("SELECT count(*) FROM migrations").fetchone()[0] == len(MIGRATIONS)
    conn.close()


def _snapshot(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in path.parent.iterdir()}


def test_newer_version_refused_untouched(path: Path) -> None:
    raw = sqlite3.connect(path)
    raw.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    raw.close()
    before = _snapshot(path)
    with pytest.raises(JournalVersionError) as e:
        Journal.open(path)
    assert e.value.found == SCHEMA_VERSION + 1 and e.value.supported == SCHEMA_VERSION
    assert "newer apt-layer" in str(e.value)
    assert _snapshot(path) == before  # not even switched to WAL


def test_unknown_required_feature_refused(path: Path) -> None:
    connect(path).close()
    raw = sqlite3.connect(path)
    raw.execute("INSERT INTO features VALUES ('zstd-manifests', 1, '0099-future')")
    raw.execute("INSERT INTO features VALUES ('optional-thing', 0, '0099-future')")
    raw.commit()
    raw.close()
    with pytest.raises(JournalVersionError) as e:
        Journal.open(path)
    assert e.value.unknown_features == ("zstd-manifests",)


def test_not_a_database(path: Path) -> None:
    path.write_bytes(b"this is not sqlite at all\n" * 100)
    with pytest.raises(JournalCorruptError):
        Journal.open(path)
    assert path.read_bytes().startswith(b"this is not")


def test_damaged_database(path: Path) -> None:
    Journal.open(path).close()
    data = bytearray(path.read_bytes())
    data[100:4096] = b"\xff" * (4096 - 100)  # header kept, schema page destroyed
    path.write_bytes(bytes(data))
    with pytest.raises(JournalCorruptError):
        Journal.open(path)


def test_concurrent_first_open(path: Path) -> None:
    script = f"from aptlayer.journal import Journal; Journal.open({str(path)!r}).close()"
    procs = [subprocess.Popen([sys.executable, "-c", script]) for _ in range(4)]
    assert [p.wait() for p in procs] == [0] * 4
    conn = connect(path)
    assert conn.execute("SELECT count(*) FROM migrations").fetchone()[0] == len(MIGRATIONS)
    conn.close()


def test_upgrade_from_version_1_builds_the_projection_from_old_events(path: Path) -> None:
    """A journal left at version 1 (events and manifests only) gains a projection that covers its events."""
    with Journal.open(path) as j:
        j.append("tx.begun", "t", {}, "t")
        with j.transaction() as w:
            w.append("image.created", "a", {"digest": "D"}, "t", manifest=[("o", 1)])
            w.append("tx.committed", "t", {}, "t")
    raw = sqlite3.connect(path, isolation_level=None)
    for (view,) in raw.execute("SELECT name FROM sqlite_master WHERE type = 'view'").fetchall():
        raw.execute(f"DROP VIEW {view}")
    for table in ("meta", "images", "roots", "object_refs", "deployments", "mounts", "transactions", "tx_ops"):
        raw.execute(f"DROP TABLE {table}")
    raw.execute("DELETE FROM migrations WHERE version > 1")
    raw.execute("DELETE FROM features WHERE migration != ?", (MIGRATIONS[0].name,))
    raw.execute("PRAGMA user_version = 1")
    raw.close()
    with Journal.open(path) as j:
        assert j.conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        assert j.image("a").digest == "D" and j.is_referenced("o")
        assert j.check() == [] and j.verify() == 3
