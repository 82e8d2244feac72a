"""Projection semantics: what keeps objects referenced, and what is refused."""

from __future__ import annotations

from pathlib import Path

import pytest

from aptlayer.journal import Journal, ProjectionError


@pytest.fixture
def journal(tmp_path: Path):
    with Journal.open(tmp_path / "journal.db") as j:
        yield j


MANIFESTS = {
    "D1": [("o1", 1), ("shared", 10)],
    "D2": [("o2", 2), ("shared", 10)],
    "D3": [("o3", 3)],
}


def op(j: Journal, kind: str, subject: str, data: dict, manifest: bool = False) -> None:
    """One implicit transaction: tx.begun, then the event and tx.committed together."""
    tx = f"t{j.last_seq() + 1}"
    j.append("tx.begun", tx, {}, tx)
    with j.transaction() as w:
        w.append(kind, subject, data, tx, manifest=MANIFESTS[data["digest"]] if manifest else None)
        w.append("tx.committed", tx, {}, tx)


def create(j: Journal, name: str, digest: str) -> None:
    op(j, "image.created", name, {"digest": digest}, manifest=True)


def deploy(j: Journal, name: str) -> None:
    digest = j.image(name).digest
    current = j.deployments().get("current")
    previous = current.ref() if current else None
    op(j, "deployed", name, {"current": {"image": name, "digest": digest}, "previous": previous, "digest": digest})


def refs(j: Journal) -> dict[str, int]:
    return dict(j.conn.execute("SELECT object, refcount FROM object_refs"))


def test_refcount_counts_distinct_digests(journal: Journal) -> None:
    create(journal, "a", "D1")
    create(journal, "b", "D2")
    create(journal, "a-copy", "D1")
    assert refs(journal) == {"o1": 1, "o2": 1, "shared": 2}
    op(journal, "image.deleted", "a", {"digest": "D1"})
    assert refs(journal) == {"o1": 1, "o2": 1, "shared": 2}  # a-copy still holds D1
    op(journal, "image.deleted", "a-copy", {"digest": "D1"})
    assert refs(journal) == {"o1": 0, "o2": 1, "shared": 1}
    assert journal.garbage() == [("o1", 1)]
    assert journal.check() == []


def test_deleted_but_deployed_image_stays_referenced_until_pushed_out(journal: Journal) -> None:
    create(journal, "a", "D1")
    create(journal, "b", "D2")
    create(journal, "c", "D3")
    deploy(journal, "a")
    op(journal, "image.deleted", "a", {"digest": "D1"})
    assert refs(journal)["o1"] == 1
    deploy(journal, "b")  # a becomes previous: still held
    assert refs(journal)["o1"] == 1
    deploy(journal, "c")  # a leaves both slots
    assert refs(journal)["o1"] == 0
    assert journal.check() == []


def test_mount_holds_a_deleted_image_until_unmounted_or_lost(journal: Journal) -> None:
    create(journal, "a", "D1")
    journal.append("mounted", "a", {"mountpoint": "/mnt/a", "digest": "D1", "boot_id": "b1"}, "m1")
    journal.append("mounted", "a", {"mountpoint": "/mnt/b", "digest": "D1", "boot_id": "b1"}, "m2")
    op(journal, "image.deleted", "a", {"digest": "D1"})
    assert refs(journal)["o1"] == 1
    journal.append("unmounted", "a", {"mountpoint": "/mnt/a"}, "m3")
    assert refs(journal)["o1"] == 1
    journal.append("mount.lost", "a", {"mountpoint": "/mnt/b", "reason": "not in mountinfo"}, "r1")
    assert refs(journal)["o1"] == 0
    assert journal.conn.execute("SELECT mountpoint, state FROM mounts").fetchall() == [("/mnt/b", "lost")]
    with pytest.raises(ProjectionError):
        journal.append("mount.lost", "a", {"mountpoint": "/mnt/b"}, "r2")
    assert journal.check() == []


def test_open_transaction_protects_staged_objects_and_abort_releases(journal: Journal) -> None:
    journal.append("tx.begun", "T", {"explicit": True}, "T")
    journal.append("image.staged", "x", {"digest": "D3"}, "T", manifest=MANIFESTS["D3"])
    assert refs(journal) == {"o3": 1} and journal.image("x") is None
    journal.append("tx.aborted", "T", {"reason": "tx rollback"}, "T")
    assert refs(journal) == {"o3": 0} and journal.transaction_state("T") == "aborted"
    with pytest.raises(ProjectionError, match="aborted"):
        journal.append("image.created", "x", {"digest": "D3"}, "T")
    with pytest.raises(ProjectionError, match="aborted"):
        journal.commit_tx("T")
    assert journal.check() == []


def test_gc_swept_removes_zero_rows(journal: Journal) -> None:
    create(journal, "a", "D1")
    create(journal, "b", "D2")
    op(journal, "image.deleted", "a", {"digest": "D1"})
    journal.append("gc.begun", "store", {"marked": 2, "full": False}, "g1")
    journal.append("gc.swept", "store", {"objects": 1, "bytes": 1}, "g1")
    assert refs(journal) == {"o2": 1, "shared": 1} and journal.garbage() == []


def test_rollback_swaps_slots(journal: Journal) -> None:
    create(journal, "a", "D1")
    create(journal, "b", "D2")
    with pytest.raises(ProjectionError, match="no previous"):
        journal.append("rolled-back", "a", {"current": None, "previous": None}, "r")
    deploy(journal, "a")
    deploy(journal, "b")
    slots = {slot: d.ref() for slot, d in journal.deployments().items()}
    bad = {"current": slots["current"], "previous": slots["previous"]}
    with pytest.raises(ProjectionError, match="swap"):
        journal.append("rolled-back", "a", bad, "r")
    journal.append("rolled-back", "a", {"current": slots["previous"], "previous": slots["current"]}, "r")
    assert {slot: d.ref() for slot, d in journal.deployments().items()} == {
        "current": slots["previous"], "previous": slots["current"]}
    assert journal.check() == []


@pytest.mark.parametrize(
    "kind, subject, data, why",
    [
        ("image.created", "a", {"digest": "D2"}, "taken"),
        ("image.deleted", "zz", {"digest": "D1"}, "no live image"),
        ("image.deleted", "a", {"digest": "D2"}, "digest"),
        ("deployed", "zz", {"current": {"image": "zz", "digest": "D1"}, "previous": None}, "live"),
        ("deployed", "a", {"current": {"image": "a", "digest": "D1"}, "previous": {"image": "x", "digest": "D1"}}, "previous"),
        ("mounted", "a", {"mountpoint": "/m", "digest": "D9"}, "no manifest"),
        ("unmounted", "a", {"mountpoint": "/nowhere"}, "nothing recorded"),
        ("image.staged", "n", {"digest": "D1"}, "never begun"),
        ("tx.committed", "nope", {}, "never begun"),
    ],
)
def test_events_that_do_not_fit_are_refused(journal: Journal, kind: str, subject: str, data: dict, why: str) -> None:
    create(journal, "a", "D1")
    before = journal.last_seq()
    with pytest.raises(ProjectionError, match=why):
        journal.append(kind, subject, data, "nope")
    assert journal.last_seq() == before and journal.check() == []


def test_staging_rules(journal: Journal) -> None:
    create(journal, "a", "D1")
    journal.append("tx.begun", "T", {"explicit": True}, "T")
    with pytest.raises(ProjectionError, match="taken"):
        journal.append("image.staged", "a", {"digest": "D2"}, "T", manifest=MANIFESTS["D2"])
    journal.append("delete.staged", "a", {"digest": "D1"}, "T")
    journal.append("image.staged", "a", {"digest": "D2"}, "T", manifest=MANIFESTS["D2"])  # replace
    journal.append("deploy.staged", "a", {"digest": "D2"}, "T")
    with pytest.raises(ProjectionError, match="already staged"):
        journal.append("deploy.staged", "a", {"digest": "D2"}, "T")
    with pytest.raises(ProjectionError, match="not made effective"):
        journal.append("tx.committed", "T", {}, "T")
    journal.commit_tx("T")
    assert journal.image("a").digest == "D2"
    assert journal.deployments()["current"].ref() == {"image": "a", "digest": "D2"}
    assert refs(journal) == {"o1": 0, "o2": 1, "shared": 1}
    assert journal.check() == []


def test_conflicting_commit_changes_nothing(journal: Journal) -> None:
    journal.append("tx.begun", "T", {"explicit": True}, "T")
    journal.append("image.staged", "a", {"digest": "D2"}, "T", manifest=MANIFESTS["D2"])
    create(journal, "a", "D1")  # someone else took the name meanwhile
    before = journal.last_seq()
    with pytest.raises(ProjectionError, match="taken"):
        journal.commit_tx("T")
    assert journal.last_seq() == before and journal.transaction_state("T") == "open"
    journal.append("tx.aborted", "T", {}, "T")
    assert journal.check() == []


def test_catch_up_and_rebuild(journal: Journal) -> None:
    create(journal, "a", "D1")
    assert journal.catch_up() == 0
    journal.conn.execute("UPDATE meta SET applied_seq = 0, applied_hash = ''")
    journal.conn.execute("DELETE FROM images")
    journal.conn.execute("DELETE FROM roots")
    journal.conn.execute("DELETE FROM object_refs")
    journal.conn.execute("DELETE FROM transactions")
    assert journal.catch_up() == 3 and journal.check() == []
    journal.conn.execute("UPDATE object_refs SET refcount = 7")
    assert journal.check() != []
    assert journal.rebuild() == 3 and journal.check() == []


def test_transaction_ids_are_single_use(journal: Journal) -> None:
    journal.append("tx.begun", "T", {}, "T")
    with pytest.raises(ProjectionError, match="already used"):
        journal.append("tx.begun", "T", {}, "T")
    with pytest.raises(ProjectionError, match="subject"):
        journal.append("tx.begun", "U", {}, "V")
    journal.append("tx.committed", "T", {}, "T")
    with pytest.raises(ProjectionError, match="committed"):
        journal.append("tx.aborted", "T", {}, "T")
    assert journal.last_seq() == 2 and journal.check() == []
