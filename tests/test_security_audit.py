"""Rule 5 of docs/security.md: an audit query is bounded in time and memory."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from aptlayer.journal import AuditLimit, Journal, audit_query

from crashkit import run_cli

ENDLESS = "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) SELECT count(*) FROM c"
#: one SQLite string of 20 MB, built inside SQLite's heap
HUGE_STRING = ("WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < 20000) "
               "SELECT length(group_concat(printf('%.1000c', 'x'), '')) FROM c")
#: rows that SQLite streams without holding them: the cap counts what is collected
MANY_ROWS = ("WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < 20000) "
             "SELECT x, printf('%.1000c', 'x') FROM c")


@pytest.fixture
def path(tmp_path: Path) -> Path:
    p = tmp_path / "journal.db"
    with Journal.open(p) as j:
        j.append("tx.begun", "t1", {}, "t1")
    return p


def test_an_endless_recursive_query_is_stopped_at_its_time_limit(path: Path) -> None:
    with pytest.raises(AuditLimit, match=r"ran past its time limit of 0.2 s and was stopped \(--timeout"):
        audit_query(path, ENDLESS, timeout=0.2)
    # the connection's bounds do not outlive the query
    assert audit_query(path, "SELECT count(*) FROM events").rows == [(1,)]


def test_a_query_needing_more_than_the_memory_cap_is_stopped(path: Path) -> None:
    with pytest.raises(AuditLimit, match="more than its memory cap of 8 MiB"):
        audit_query(path, HUGE_STRING, memory=8 << 20)
    with pytest.raises(AuditLimit, match="more than its memory cap of 8 MiB"):
        audit_query(path, MANY_ROWS, memory=8 << 20)
    # the heap limit is SQLite's, process-wide: it is put back after the query
    assert audit_query(path, HUGE_STRING, memory=256 << 20).rows == [(20_000_000,)]
    other = sqlite3.connect(":memory:")
    assert other.execute("SELECT length(printf('%.30000000c', 'x'))").fetchone() == (30_000_000,)


def test_the_cli_stops_a_runaway_query_with_a_clear_message(tmp_path: Path) -> None:
    root = tmp_path / "store"
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_text("x")
    run_cli(root, "image", "create", str(src), "x")
    proc = run_cli(root, "audit", "--timeout", "0.5", ENDLESS, check=False)
    assert proc.returncode == 2
    assert proc.stderr == ("apt-layer: audit: the query ran past its time limit of 0.5 s and was stopped "
                           "(--timeout SECONDS gives it longer)\n")
