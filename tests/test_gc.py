"""Garbage collection of the digest store, marked from the journal's projection.

Incremental by default (only objects whose refcount fell to zero), ``full``
also walks the store for strays; every root (live image, open transaction,
deployment, mount) keeps its objects; each sweep is journaled.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from aptlayer import inventory
from aptlayer.composefs import fsverity
from aptlayer.journal.projection import TABLES
from aptlayer.maintenance import Maintenance
from aptlayer.store import CreateOptions, Store

PY = CreateOptions(backend="python")


def blob(tag: str, size: int = 200) -> bytes:
    return (tag.encode() * size)[:size]


def obj(data: bytes) -> str:
    return fsverity.object_path(fsverity.digest_bytes(data))


def make_tree(root: Path, files: dict[str, bytes]) -> str:
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return str(root)


def stored(store: Store) -> set[str]:
    return {str(p.relative_to(store.objects_dir)) for p in store.objects_dir.glob("??/*")}


@pytest.fixture
def two(store: Store, tmp_path: Path) -> Store:
    """Images 'keep' (shared, k) and 'drop' (shared, d1, d2): shared is in both."""
    store.create(make_tree(tmp_path / "keep", {"shared": blob("s"), "k": blob("k")}), "keep", PY)
    store.create(make_tree(tmp_path / "drop", {"shared": blob("s"), "d1": blob("d1"), "d2": blob("d", 300)}),
                 "drop", PY)
    return store


def gc(store: Store, **kw) -> dict:
    return Maintenance(store).gc(**kw)


def test_incremental_gc_removes_only_what_the_deleted_image_alone_used(two: Store) -> None:
    two.delete("drop")
    result = gc(two)
    assert result == {"full": False, "dry_run": False, "marked": 2, "candidates": 2, "candidate_bytes": 500,
                      "spared_by_grace": 0, "temp_files": 0, "refused": [], "removed": 2, "bytes_freed": 500}
    assert stored(two) == {obj(blob("s")), obj(blob("k"))}
    assert two.missing_objects("keep") == []
    assert two.journal.garbage() == []
    assert gc(two)["removed"] == 0


def test_gc_is_journaled_with_counts_and_bytes(two: Store) -> None:
    two.delete("drop")
    gc(two)
    begun, swept = list(two.journal.events(kind="gc.*"))
    assert (begun.kind, begun.data) == ("gc.begun", {"full": False, "marked": 2, "candidates": 2,
                                                     "candidate_bytes": 500})
    assert (swept.kind, swept.data) == ("gc.swept", {"removed": 2, "bytes": 500, "temp_files": 0})
    assert begun.tx == swept.tx
    Maintenance(two).verify()


def test_dry_run_lists_and_changes_nothing(two: Store) -> None:
    two.delete("drop")
    before, seq = stored(two), two.journal.last_seq()
    result = gc(two, dry_run=True)
    assert result["objects"] == sorted([{"object": obj(blob("d1")), "size": 200},
                                        {"object": obj(blob("d", 300)), "size": 300}], key=lambda o: o["object"])
    assert (result["candidates"], result["candidate_bytes"], result["dry_run"]) == (2, 500, True)
    assert "removed" not in result
    assert stored(two) == before and two.journal.last_seq() == seq
    assert len(two.journal.garbage()) == 2


def test_stray_objects_are_found_only_by_a_full_gc(two: Store) -> None:
    stray = obj(b"dropped in by hand" * 10)
    (two.objects_dir / stray).parent.mkdir(exist_ok=True)
    (two.objects_dir / stray).write_bytes(b"dropped in by hand" * 10)
    assert gc(two)["removed"] == 0 and stray in stored(two)
    assert gc(two, full=True, dry_run=True)["objects"] == [{"object": stray, "size": 180}]
    result = gc(two, full=True)
    assert (result["removed"], result["bytes_freed"], result["marked"]) == (1, 180, 4)
    assert stray not in stored(two) and len(stored(two)) == 4


def test_full_gc_removes_stale_temp_files_of_dead_writers(store: Store) -> None:
    stale = store.objects_dir / ".tmp-00000000-999999-abcdef"
    stale.write_bytes(b"half an object")
    mine = store.objects_dir / f".tmp-{_boot_tag()}-{os.getpid()}-abcdef"
    mine.write_bytes(b"in flight")
    assert gc(store, full=True)["temp_files"] == 1
    assert not stale.exists() and mine.exists()


def _boot_tag() -> str:
    from aptlayer.composefs.objectstore import BOOT_TAG

    return BOOT_TAG


def test_objects_of_an_open_transaction_are_kept(store: Store, tmp_path: Path) -> None:
    tx = store.tx_begin()
    store.create(make_tree(tmp_path / "t", {"t": blob("t")}), "staged", PY, tx=tx)
    assert gc(store, full=True)["removed"] == 0
    assert stored(store) == {obj(blob("t"))}
    store.tx_commit(tx)
    assert gc(store, full=True)["removed"] == 0
    assert store.missing_objects("staged") == []


def _force_delete(store: Store, name: str) -> None:
    """Delete through the journal alone: the Store refuses to delete an image in use."""
    digest = inventory.image_info(store, name)["digest"]
    with store.journal.transaction() as w:
        w.append("tx.begun", "forced", {}, "forced")
        w.append("image.deleted", name, {"digest": digest}, "forced")
        w.append("tx.committed", "forced", {}, "forced")


def test_objects_of_a_deleted_but_deployed_image_are_kept(two: Store, tmp_path: Path) -> None:
    two.deploy("drop")
    two.deploy("keep")
    _force_delete(two, "drop")
    assert gc(two, full=True)["removed"] == 0
    assert obj(blob("d1")) in stored(two)
    two.create(str(tmp_path / "keep"), "keep2", PY)
    two.deploy("keep2")
    assert two.journal.deployments()["previous"].image == "keep"
    assert gc(two)["removed"] == 2


def test_objects_of_a_deleted_but_mounted_image_are_kept(two: Store) -> None:
    digest = inventory.image_info(two, "drop")["digest"]
    two.journal.append("mounted", "drop", {"mountpoint": "/mnt/x", "digest": digest, "boot_id": "b"}, "m")
    _force_delete(two, "drop")
    assert gc(two, full=True)["removed"] == 0
    two.journal.append("unmounted", "drop", {"mountpoint": "/mnt/x"}, "u")
    assert gc(two)["removed"] == 2


def test_grace_period_spares_recent_garbage(two: Store) -> None:
    two.delete("drop")
    old = time.time() - 3600
    os.utime(two.objects_dir / obj(blob("d1")), (old, old))
    result = gc(two, grace_seconds=600)
    assert (result["removed"], result["spared_by_grace"]) == (1, 1)
    assert obj(blob("d", 300)) in stored(two) and obj(blob("d1")) not in stored(two)


def test_gc_never_touches_a_recorded_name_outside_the_store(two: Store, tmp_path: Path) -> None:
    """A manifest recorded before the Store refused such dumps: gc leaves its names alone."""
    from aptlayer.gc import collect

    victim = tmp_path / "victims/victim"
    victim.parent.mkdir()
    victim.write_bytes(b"precious")
    victim2 = tmp_path / "x/victim2"  # STORE/images/objects/../../../x/victim2
    (victim2 / "sub").mkdir(parents=True)
    (victim2 / "sub/file").write_bytes(b"also precious")
    assert two.objects_dir.joinpath("../../../x/victim2").resolve() == victim2.resolve()
    bad = sorted([str(victim), "../../../x/victim2"])
    j, tx = two.journal, "old"
    j.append("tx.begun", tx, {"explicit": False}, tx)
    with j.transaction() as w:
        w.append("image.created", "old", {"digest": "ee" * 32, "size": 1}, tx,
                 manifest=[(bad[0], 8), (bad[1], 4096), (obj(blob("d1")), 200)])
        w.append("tx.committed", tx, {}, tx)
    two.delete("drop")
    j.append("image.deleted", "old", {"digest": "ee" * 32}, "gone")
    dry = gc(two, dry_run=True)
    assert gc(two, full=True, dry_run=True)["refused"] == bad
    result = gc(two)
    assert victim.read_bytes() == b"precious" and (victim2 / "sub/file").read_bytes() == b"also precious"
    assert [o["object"] for o in dry["objects"]] == sorted([obj(blob("d1")), obj(blob("d", 300))])
    assert (dry["refused"], result["refused"], result["removed"]) == (bad, bad, 2)
    assert stored(two) == {obj(blob("s")), obj(blob("k"))}
    assert two.journal.garbage() == []  # reported once, then off the work list
    # the sweep itself checks every name, whoever made the plan
    collect.sweep(collect.GcPlan(objects=[(str(victim), 8), ("../../../x/victim2", 4096)]),
                  two.objects_dir, two.trash_dir)
    assert victim.read_bytes() == b"precious" and (victim2 / "sub/file").read_bytes() == b"also precious"
    assert two.journal.check() == []


@pytest.mark.parametrize("full", [False, True])
def test_garbage_spared_by_grace_stays_garbage_for_the_next_gc(two: Store, full: bool) -> None:
    two.delete("drop")
    recent, old = obj(blob("d", 300)), obj(blob("d1"))
    past = time.time() - 3600
    os.utime(two.objects_dir / old, (past, past))
    stray = two.objects_dir / obj(blob("stray"))
    stray.parent.mkdir(exist_ok=True)
    stray.write_bytes(blob("stray"))  # recent too, but no manifest names it
    result = gc(two, full=full, grace_seconds=600)
    assert (result["removed"], result["spared_by_grace"]) == (1, 2 if full else 1)
    assert two.journal.garbage() == [(recent, 300)]
    assert Maintenance(two).status()["store"]["reclaimable_objects"] == 1
    swept = next(two.journal.events(kind="gc.swept", newest_first=True, limit=1))
    assert swept.data == {"removed": 1, "bytes": 200, "temp_files": 0, "spared": [recent]}
    projected = {t: two.journal.conn.execute(f"SELECT * FROM {t} ORDER BY 1").fetchall() for t in TABLES}
    two.journal.rebuild()
    assert {t: two.journal.conn.execute(f"SELECT * FROM {t} ORDER BY 1").fetchall() for t in TABLES} == projected
    assert gc(two)["removed"] == 1
    assert stored(two) == {obj(blob("s")), obj(blob("k")), obj(blob("stray"))}
    assert two.journal.garbage() == []
    assert two.journal.check() == []
