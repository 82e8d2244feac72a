"""Appending events: hash chain, actor, manifests, multi-event transactions, queries, concurrency."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import blake3
import pytest

from aptlayer.journal import (
    Derived,
    Journal,
    JournalError,
    ManifestConflict,
    ProjectionError,
    canonical,
)
from aptlayer.journal.log import GENESIS


@pytest.fixture
def journal(tmp_path: Path):
    with Journal.open(tmp_path / "journal.db") as j:
        yield j


def create(j: Journal, name: str, digest: str, objects, tx: str | None = None) -> None:
    tx = tx or f"tx-{name}-{digest}"
    j.append("tx.begun", tx, {}, tx)
    with j.transaction() as w:
        w.append("image.created", name, {"digest": digest, "size": 100}, tx, manifest=objects)
        w.append("tx.committed", tx, {}, tx)


def test_hash_is_blake3_of_previous_and_canonical_row(journal: Journal) -> None:
    first = journal.append("tx.begun", "t1", {"explicit": True}, "t1")
    second = journal.append("recover.note", "store", {"é": [1, 2], "a": None}, "t1", actor={"note": "x"})
    for prev, ev in ((GENESIS, first), (first.hash, second)):
        row = {k: getattr(ev, k) for k in ("seq", "at", "tx", "kind", "subject", "data", "actor")}
        text = json.dumps(row, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        assert ev.hash == blake3.blake3(bytes.fromhex(prev) + text.encode()).hexdigest()
    stored = journal.conn.execute("SELECT data, actor FROM events WHERE seq = 2").fetchone()
    assert stored == (canonical(second.data), canonical(second.actor))


def test_at_and_actor(journal: Journal) -> None:
    ev = journal.append("tx.begun", "t1", {}, "t1")
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", ev.at)
    assert set(ev.actor) == {"uid", "user", "pid", "argv", "host", "boot_id"}
    assert ev.actor["argv"] == sys.argv and isinstance(ev.actor["pid"], int)
    override = journal.append("tx.begun", "t2", {}, "t2", actor={"user": "alice", "ticket": 7})
    assert override.actor["user"] == "alice" and override.actor["ticket"] == 7 and "boot_id" in override.actor


def test_manifest_recorded_once_with_hash_in_event(journal: Journal) -> None:
    objects = [("b" * 64, 3), ("a" * 64, 5), ("a" * 64, 5)]
    create(journal, "one", "D1", objects)
    create(journal, "two", "D1", list(reversed(objects)))
    assert journal.manifest("D1") == [("a" * 64, 5), ("b" * 64, 3)]
    seq, count, size, mhash = journal.conn.execute("SELECT seq, objects, size, hash FROM images_manifest").fetchone()
    assert (count, size) == (2, 8)
    created = [e for e in journal.events(kind="image.created")]
    assert seq == created[0].seq and {e.data["manifest"] for e in created} == {mhash}
    with pytest.raises(ManifestConflict):
        create(journal, "three", "D1", [("c" * 64, 1)])
    with pytest.raises(ManifestConflict):
        create(journal, "four", "D2", [("c" * 64, 1), ("c" * 64, 2)])
    with pytest.raises(ManifestConflict, match="size"):
        create(journal, "five", "D3", [("a" * 64, 6)])
    assert journal.image("three") is None and journal.image("five") is None
    assert journal.verify() == journal.last_seq()


def test_derived_manifest_is_the_full_one(journal: Journal) -> None:
    """Derived(base, removed, added) records exactly the rows and hash the full list would."""
    base = [("a" * 64, 1), ("b" * 64, 2), ("c" * 64, 3)]
    create(journal, "one", "D1", base)
    create(journal, "two", "D2", Derived("D1", frozenset({"b" * 64}), (("d" * 64, 4), ("a" * 64, 1))))
    full = [("a" * 64, 1), ("c" * 64, 3), ("d" * 64, 4)]
    assert journal.manifest("D2") == full
    create(journal, "three", "D3", full)
    hashes = {e.subject: e.data["manifest"] for e in journal.events(kind="image.created")}
    assert hashes["two"] == hashes["three"]
    assert journal.verify() == journal.last_seq() and journal.check() == []
    with pytest.raises(ManifestConflict, match="size"):  # an added object is checked against the others
        create(journal, "four", "D4", Derived("D1", frozenset(), (("d" * 64, 5),)))
    with pytest.raises(JournalError, match="no manifest"):
        create(journal, "five", "D5", Derived("D9", frozenset(), ()))
    assert journal.image("four") is None and journal.image("five") is None


def test_transaction_is_all_or_nothing(journal: Journal) -> None:
    journal.append("tx.begun", "t1", {}, "t1")
    with pytest.raises(RuntimeError):
        with journal.transaction() as w:
            w.append("image.created", "a", {"digest": "D"}, "t1", manifest=[("o", 1)])
            raise RuntimeError("crash before commit")
    assert journal.last_seq() == 1 and journal.manifest("D") == [] and journal.image("a") is None
    with pytest.raises(ProjectionError):
        with journal.transaction() as w:
            w.append("image.created", "a", {"digest": "D"}, "t1", manifest=[("o", 1)])
            w.append("image.created", "a", {"digest": "D"}, "t1")  # name taken
    assert journal.last_seq() == 1 and journal.check() == []


def test_refused_event_caught_inside_a_transaction_leaves_no_trace(journal: Journal) -> None:
    journal.append("tx.begun", "t1", {}, "t1")
    with journal.transaction() as w:
        with pytest.raises(ProjectionError):
            w.append("image.deleted", "missing", {"digest": "D"}, "t1")
        with pytest.raises(ManifestConflict):
            w.append("image.created", "a", {"digest": "D"}, "t1", manifest=[("o", 1), ("o", 2)])
        w.append("image.created", "a", {"digest": "D"}, "t1", manifest=[("o", 1)])
    assert [e.kind for e in journal.events()] == ["tx.begun", "image.created"]
    assert journal.verify() == 2 and journal.check() == []


def test_nested_transaction_refused(journal: Journal) -> None:
    with journal.transaction():
        with pytest.raises(JournalError):
            with journal.transaction():
                pass


def test_unknown_kind_refused(journal: Journal) -> None:
    with pytest.raises(ProjectionError):
        journal.append("image.renamed", "x", {}, "t")
    with pytest.raises(ProjectionError):
        journal.append("recover.", "x", {}, "t")
    assert journal.last_seq() == 0


def test_events_filters(journal: Journal) -> None:
    create(journal, "a", "D1", [("o1", 1)], tx="ta")
    create(journal, "b", "D2", [("o2", 1)], tx="tb")
    journal.append("recover.mount-lost-checked", "store", {}, "r1")
    journal.append("recover.done", "store", {}, "r1")
    assert [e.seq for e in journal.events(subject="a")] == [2]
    assert [e.kind for e in journal.events(tx="tb")] == ["tx.begun", "image.created", "tx.committed"]
    assert [e.kind for e in journal.events(kind="recover.*", newest_first=True)] == [
        "recover.done", "recover.mount-lost-checked"]
    assert [e.seq for e in journal.events(newest_first=True, limit=2)] == [8, 7]
    at4 = next(journal.events(kind="tx.begun", tx="tb")).at
    assert [e.seq for e in journal.events(since=at4)][0] == 4
    assert [e.seq for e in journal.events(until=at4)][-1] <= 4
    assert len(list(journal.events(until=at4[:10]))) == 8  # a date includes the whole day
    assert list(journal.events(since="2999")) == []


def test_commit_tx_helper_makes_staged_work_effective(journal: Journal) -> None:
    create(journal, "old", "D1", [("o1", 1), ("o2", 2)])
    journal.append("tx.begun", "T", {"explicit": True}, "T")
    journal.append("image.staged", "new", {"digest": "D2", "size": 7}, "T", manifest=[("o2", 2), ("o3", 3)])
    journal.append("deploy.staged", "new", {"digest": "D2"}, "T")
    journal.append("delete.staged", "old", {"digest": "D1"}, "T")
    assert journal.image("new") is None and journal.is_referenced("o3")
    events = journal.commit_tx("T")
    assert [(e.kind, e.subject) for e in events] == [
        ("image.created", "new"), ("deployed", "new"), ("image.deleted", "old"), ("tx.committed", "T")]
    assert len({e.tx for e in events}) == 1
    assert journal.image("new").size == 7 and journal.image("old") is None
    assert {slot: d.ref() for slot, d in journal.deployments().items()} == {"current": {"image": "new", "digest": "D2"}}
    assert journal.transaction_state("T") == "committed"
    assert journal.garbage() == [("o1", 1)]
    assert journal.check() == [] and journal.verify() == journal.last_seq()


_APPENDER = """
import sys
from aptlayer.journal import Journal
j = Journal.open(sys.argv[1])
for i in range(int(sys.argv[3])):
    tx = f"{sys.argv[2]}-{i}"
    j.append("tx.begun", tx, {}, tx)
    with j.transaction() as w:
        w.append("image.created", tx, {"digest": "D" + str(i % 5)}, tx, manifest=[(f"o{i % 5}", 1), ("shared", 2)])
        w.append("tx.committed", tx, {}, tx)
j.close()
"""


def test_concurrent_processes_keep_the_chain(tmp_path: Path) -> None:
    path = tmp_path / "journal.db"
    Journal.open(path).close()
    procs = [
        subprocess.Popen([sys.executable, "-c", _APPENDER, str(path), f"p{n}", "60"]) for n in range(4)
    ]
    assert [p.wait(timeout=120) for p in procs] == [0] * 4
    with Journal.open(path) as j:
        assert j.verify() == 4 * 60 * 3
        assert j.conn.execute("SELECT count(*) FROM images").fetchone()[0] == 240
        assert j.check() == []
        assert j.conn.execute("SELECT refcount FROM object_refs WHERE object = 'shared'").fetchone()[0] == 5
