"""The Store API: operations become events and file effects, bad input changes nothing.

Real files and a real journal in a temporary store root; no mocks. After
every failure the store is checked whole: the chain verifies, the projection
equals a rebuild, and no live image misses an object.
"""

from __future__ import annotations

import os
import re
import sqlite3
from pathlib import Path

import pytest

from aptlayer import inventory, mounts
from aptlayer import errors
from aptlayer.composefs import build, fsverity, listing, reader
from aptlayer.journal.projection import TABLES
from aptlayer.maintenance import Maintenance
from aptlayer.store import CreateOptions, Store

PY = CreateOptions(backend="python")


def make_tree(root: Path, files: dict[str, bytes]) -> Path:
    """A directory tree; files over 64 bytes become objects of the image."""
    for rel, data in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return root


def blob(tag: str, size: int = 200) -> bytes:
    return (tag.encode() * size)[:size]


@pytest.fixture
def src(tmp_path: Path) -> Path:
    return make_tree(tmp_path / "src", {"etc/os-release": b"ID=debian\n", "usr/bin/a": blob("a"),
                                        "usr/bin/b": blob("b", 5000), "usr/lib/c": blob("c", 70)})


def projection(store: Store) -> dict[str, list]:
    return {t: store.journal.conn.execute(f"SELECT * FROM {t} ORDER BY 1, 2").fetchall() for t in TABLES}


def assert_consistent(store: Store) -> None:
    """The chain verifies, rebuild == incremental, every live image has its file and objects."""
    m = Maintenance(store)
    m.verify()
    before = projection(store)
    assert m.rebuild()["problems"] == []
    assert projection(store) == before
    for image in inventory.images(store):
        assert store.missing_objects(image["name"]) == []
        assert store.image_path(image["name"]).is_file()
    assert not any(store.staging_dir.iterdir()) or inventory.transactions(store, "open")


def kinds(store: Store, **filters) -> list[str]:
    return [e.kind for e in store.journal.events(**filters)]


# --- create ------------------------------------------------------------------------------


def test_create_commits_the_image_with_its_manifest(store: Store, src: Path) -> None:
    info = store.create(str(src), "base", PY)
    path = store.image_path("base")
    assert info["digest"] == fsverity.digest_file(str(path)).hex()
    assert (info["name"], info["size"], info["objects"], info["staged"]) == ("base", path.stat().st_size, 3, False)
    assert (info["files"], info["objects_created"], info["objects_deduped"]) == (4, 3, 0)
    objects = sorted(o.decode() for o in listing.tree_objects(reader.read_image(str(path))))
    assert [o for o, _ in store.journal.manifest(info["digest"])] == objects
    assert sorted(s for _, s in store.journal.manifest(info["digest"])) == [70, 200, 5000]
    assert kinds(store, tx=info["tx"]) == ["tx.begun", "image.created", "tx.committed"]
    assert list(store.staging_dir.iterdir()) == []
    assert_consistent(store)


def test_second_image_of_the_same_files_dedupes(store: Store, src: Path) -> None:
    first = store.create(str(src), "one", PY)
    second = store.create(str(src), "two", PY)
    assert second["digest"] == first["digest"]
    assert (second["objects_created"], second["objects_deduped"]) == (0, 3)
    assert [i["name"] for i in inventory.images(store)] == ["one", "two"]
    assert store.journal.conn.execute("SELECT DISTINCT refcount FROM object_refs").fetchall() == [(1,)]


def test_create_from_a_dump_references_objects_without_importing_them(store: Store, tmp_path: Path) -> None:
    obj = "ab/" + "cd" * 31
    dump = tmp_path / "tree.dump"
    dump.write_text(f"/ 0 40755 2 0 0 0 0.0 - - -\n/f 4096 100644 1 0 0 0 0.0 {obj} - -\n")
    info = store.create(str(dump), "fromdump", CreateOptions(from_file=True, backend="python"))
    assert store.journal.manifest(info["digest"]) == [(obj, 4096)]
    assert store.missing_objects("fromdump") == [obj]
    assert not (store.objects_dir / obj).exists()


@pytest.mark.parametrize("options", [
    dict(use_epoch=True), dict(skip_xattrs=True), dict(user_xattrs=True), dict(min_version=1),
    dict(max_version=0), dict(skip_devices=True), dict(threads=1),
])
def test_create_options_build_what_mkcomposefs_builds(store: Store, src: Path, options: dict) -> None:
    os.utime(src / "usr/bin/a", (1_700_000_000, 1_700_000_000))
    info = store.create(str(src), "img", CreateOptions(backend="python", **options))
    expected = build.make_image(str(src), **options)
    assert info["digest"] == expected.digest.hex()
    assert store.image_path("img").read_bytes() == expected.image


def test_use_epoch_zeroes_mtimes(store: Store, src: Path) -> None:
    store.create(str(src), "epoch", CreateOptions(use_epoch=True, backend="python"))
    root = reader.read_image(str(store.image_path("epoch")))
    assert {(node.mtime_sec, node.mtime_nsec) for _, node in root.walk()} == {(0, 0)}


def test_backends_give_the_same_digest(store: Store, src: Path, mkcomposefs: str) -> None:
    ours = store.create(str(src), "ours", PY)
    theirs = store.create(str(src), "theirs", CreateOptions(backend="upstream"))
    assert theirs["digest"] == ours["digest"]
    assert store.journal.manifest(theirs["digest"]) == store.journal.manifest(ours["digest"])
    assert_consistent(store)


# --- bad input changes nothing ---------------------------------------------------------------


@pytest.mark.parametrize("name, why", [
    ("", "invalid image name: empty"),
    ("/", "invalid image name '/': contains '/' or NUL"),
    ("a/b", "invalid image name 'a/b': contains '/' or NUL"),
    ("..", "invalid image name '..': must not start with '.' or '-'"),
    (".", "invalid image name '.': must not start with '.' or '-'"),
    ("a\0b", "invalid image name 'a\\x00b': contains '/' or NUL"),
    ("x" * 256, "invalid image name: longer than 245 bytes"),
    ("é" * 123, "invalid image name: longer than 245 bytes"),
    ("-rf", "invalid image name '-rf': must not start with '.' or '-'"),
    ("tab\there", "invalid image name 'tab\\there': contains control characters"),
])
def test_invalid_names_are_refused_before_anything_is_written(store: Store, src: Path, name: str,
                                                              why: str) -> None:
    with pytest.raises(errors.InvalidInput) as e:
        store.create(str(src), name, PY)
    assert str(e.value) == why and e.value.exit_code == 2
    assert store.journal.last_seq() == 0
    assert list(store.objects_dir.iterdir()) == []


def test_longest_name_is_accepted(store: Store, src: Path) -> None:
    name = "n" * 245
    store.create(str(src), name, PY)
    assert store.image_path(name).is_file()
    with pytest.raises(errors.InvalidInput):
        store.create(str(src), name + "n", PY)


def test_existing_name_is_a_conflict(store: Store, src: Path, tmp_path: Path) -> None:
    first = store.create(str(src), "base", PY)
    other = make_tree(tmp_path / "other", {"x": blob("x")})
    seq = store.journal.last_seq()
    with pytest.raises(errors.Conflict, match="^an image named 'base' exists$"):
        store.create(str(other), "base", PY)
    assert store.journal.last_seq() == seq
    assert inventory.image_info(store, "base")["digest"] == first["digest"]
    assert_consistent(store)


@pytest.mark.parametrize("what, message", [
    ("missing", "source {p}: no such directory"),
    ("file", "source {p}: not a directory (for a composefs-dump(5) file, pass --from-file)"),
])
def test_missing_source_is_not_found(store: Store, tmp_path: Path, what: str, message: str) -> None:
    """A missing source is not found (3); a file where a directory is expected is bad input (2)."""
    path = tmp_path / what
    if what == "file":
        path.write_text("x")
    with pytest.raises(errors.NotFound if what == "missing" else errors.InvalidInput) as e:
        store.create(str(path), "img", PY)
    assert str(e.value) == message.format(p=path) and e.value.exit_code == (3 if what == "missing" else 2)
    assert store.journal.last_seq() == 0


def test_unreadable_dump_aborts_its_transaction(store: Store, tmp_path: Path) -> None:
    dump = tmp_path / "bad.dump"
    dump.write_text("/ not a dump line\n")
    with pytest.raises(errors.InvalidInput, match="bad.dump"):
        store.create(str(dump), "img", CreateOptions(from_file=True, backend="python"))
    assert kinds(store) == ["tx.begun", "tx.aborted"]
    assert inventory.images(store) == [] and list(store.staging_dir.iterdir()) == []
    assert_consistent(store)


def test_newer_journal_is_refused_untouched(tmp_path: Path) -> None:
    Store.open(tmp_path).close()
    with sqlite3.connect(tmp_path / "journal.db") as conn:
        conn.execute("PRAGMA user_version = 99")
    conn.close()
    before = (tmp_path / "journal.db").read_bytes()
    with pytest.raises(errors.StoreVersionError, match=r"journal written by a newer apt-layer \(version 99"):
        Store.open(tmp_path)
    assert (tmp_path / "journal.db").read_bytes() == before


def test_unknown_required_feature_is_refused(tmp_path: Path) -> None:
    Store.open(tmp_path).close()
    with sqlite3.connect(tmp_path / "journal.db") as conn:
        conn.execute("INSERT INTO features VALUES ('time-travel', 1, '0099-future')")
    conn.close()
    with pytest.raises(errors.StoreVersionError, match=r"unknown required features: time-travel\)$") as e:
        Store.open(tmp_path)
    assert e.value.exit_code == 5


@pytest.mark.parametrize("damage", ["garbage", "garbage-after-header"])
def test_corrupt_journal_is_refused(tmp_path: Path, src: Path, damage: str) -> None:
    s = Store.open(tmp_path / "s")
    s.create(str(src), "base", PY)
    s.close()
    db = tmp_path / "s" / "journal.db"
    data = db.read_bytes()
    keep = 100 if damage == "garbage-after-header" else 0
    db.write_bytes(data[:keep] + os.urandom(len(data) - keep))
    with pytest.raises(errors.StoreCorrupt) as e:
        Store.open(tmp_path / "s")
    assert str(e.value).startswith(f"{db}: ") and e.value.exit_code == 6


# --- delete, deploy, rollback ------------------------------------------------------------------


def test_delete_drops_refcounts_and_the_file(store: Store, src: Path, tmp_path: Path) -> None:
    base = store.create(str(src), "base", PY)
    other = make_tree(tmp_path / "other", {"usr/bin/a": blob("a"), "own": blob("own")})
    store.create(str(other), "other", PY)
    result = store.delete("other")
    assert (result["name"], result["staged"]) == ("other", False)
    assert not store.image_path("other").exists()
    garbage = store.journal.garbage()
    assert [size for _, size in garbage] == [200] and garbage[0][0] not in dict(store.journal.manifest(base["digest"]))
    with pytest.raises(errors.NotFound, match="^no image named 'other'$"):
        store.delete("other")
    assert_consistent(store)


def test_deployed_image_cannot_be_deleted(store: Store, src: Path) -> None:
    store.create(str(src), "a", PY)
    store.create(str(src), "b", PY)
    store.deploy("a")
    store.deploy("b")
    for name, slot, hint in (("b", "current", "deploy another image first"),
                             ("a", "previous", "`apt-layer cleanup -r` drops the rollback deployment")):
        with pytest.raises(errors.Conflict, match=f"^image '{name}' is the {slot} deployment; {re.escape(hint)}$"):
            store.delete(name)
    assert [i["name"] for i in inventory.images(store)] == ["a", "b"]
    assert_consistent(store)


def test_deploy_and_rollback_swap_the_links(store: Store, src: Path) -> None:
    store.create(str(src), "a", PY)
    store.create(str(src), "b", PY)
    with pytest.raises(errors.Conflict, match="^no previous deployment to roll back to$"):
        store.rollback()
    deployed = store.deploy("a")
    assert deployed == {"current": "a", "digest": inventory.image_info(store, "a")["digest"], "previous": None,
                        "tx": deployed["tx"], "staged": False}
    with pytest.raises(errors.Conflict, match="^no previous deployment to roll back to$"):
        store.rollback()
    with pytest.raises(errors.Conflict, match="^image 'a' is already the current deployment$"):
        store.deploy("a")
    store.deploy("b")
    assert os.readlink(store.deploy_dir / "current") == "../images/b.composefs"
    assert os.readlink(store.deploy_dir / "previous") == "../images/a.composefs"
    rolled = store.rollback()
    assert rolled == {"current": "a", "digest": inventory.image_info(store, "a")["digest"], "previous": "b",
                      "tx": rolled["tx"], "staged": False}
    assert os.readlink(store.deploy_dir / "current") == "../images/a.composefs"
    assert os.readlink(store.deploy_dir / "previous") == "../images/b.composefs"
    assert (store.deploy_dir / "current").resolve() == store.image_path("a")
    with pytest.raises(errors.NotFound):
        store.deploy("nosuch")
    assert_consistent(store)


def test_mounted_image_cannot_be_deleted(store: Store, src: Path, tmp_path: Path, as_root: None) -> None:
    store.create(str(src), "m", PY)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    try:
        mounts.mount(store, "m", str(mnt), readonly=True)
    except (errors.PermissionDenied, errors.Unsupported) as e:
        pytest.skip(f"cannot mount here: {e}")
    try:
        assert (mnt / "usr/bin/b").read_bytes() == blob("b", 5000)
        with pytest.raises(errors.Conflict, match=f"^image 'm' is mounted at {mnt}; unmount it first$"):
            store.delete("m")
        result = Maintenance(store).gc(full=True)
        assert (result["removed"], result["marked"]) == (0, 3)
    finally:
        mounts.unmount(store, str(mnt))
    store.delete("m")
    assert_consistent(store)


# --- explicit transactions -----------------------------------------------------------------------


def test_tx_commit_makes_every_staged_operation_effective_at_once(store: Store, src: Path,
                                                                   tmp_path: Path) -> None:
    store.create(str(src), "old", PY)
    store.create(str(src), "spare", PY)
    store.deploy("old")
    nxt = make_tree(tmp_path / "next", {"usr/bin/a": blob("a"), "usr/bin/new": blob("n", 999)})
    tx = store.tx_begin()
    staged = store.create(str(nxt), "next", PY, tx=tx)
    assert staged["staged"] and staged["tx"] == tx
    store.deploy("next", tx=tx)
    assert store.delete("spare", tx=tx)["staged"]
    assert [i["name"] for i in inventory.images(store)] == ["old", "spare"]
    assert not store.image_path("next").exists() and store.image_path("spare").exists()
    assert store.journal.deployments()["current"].image == "old"
    assert store.missing_objects("old") == []
    seq = store.journal.last_seq()
    result = store.tx_commit(tx)
    assert result == {"tx": tx, "ops": [{"kind": "image.created", "subject": "next"},
                                        {"kind": "deployed", "subject": "next"},
                                        {"kind": "image.deleted", "subject": "spare"}]}
    committed = [(e.seq, e.kind) for e in store.journal.events(tx=tx) if e.seq > seq]
    assert committed == [(seq + 1, "image.created"), (seq + 2, "deployed"), (seq + 3, "image.deleted"),
                         (seq + 4, "tx.committed")]
    assert [i["name"] for i in inventory.images(store)] == ["next", "old"] and not store.image_path("spare").exists()
    assert store.journal.deployments()["current"].image == "next"
    assert os.readlink(store.deploy_dir / "current") == "../images/next.composefs"
    assert store.image_path("next").is_file() and not store.staging_path(tx).exists()
    assert inventory.transaction(store, tx)["state"] == "committed"
    assert_consistent(store)


def test_tx_delete_and_recreate_a_name(store: Store, src: Path, tmp_path: Path) -> None:
    store.create(str(src), "app", PY)
    newer = make_tree(tmp_path / "newer", {"v2": blob("v2", 300)})
    tx = store.tx_begin()
    store.delete("app", tx=tx)
    store.create(str(newer), "app", PY, tx=tx)
    assert store.missing_objects("app") == [] and len(store.journal.manifest(inventory.image_info(store, "app")["digest"])) == 3
    store.tx_commit(tx)
    assert [o for o, _ in store.journal.manifest(inventory.image_info(store, "app")["digest"])] == [
        fsverity.object_path(fsverity.digest_bytes(blob("v2", 300)))]
    assert_consistent(store)


def test_tx_rollback_leaves_nothing_behind(store: Store, src: Path) -> None:
    tx = store.tx_begin()
    store.create(str(src), "ghost", PY, tx=tx)
    assert store.staging_path(tx).is_dir()
    assert store.tx_rollback(tx) == {"tx": tx, "discarded": [{"op": "create", "name": "ghost"}]}
    assert not store.staging_path(tx).exists() and list(store.staging_dir.iterdir()) == []
    assert inventory.images(store) == [] and not store.image_path("ghost").exists()
    assert len(store.journal.garbage()) == 3
    assert Maintenance(store).gc()["removed"] == 3
    assert [p for p in store.objects_dir.rglob("*") if p.is_file()] == []
    assert_consistent(store)


def test_closed_and_unknown_transactions_are_refused(store: Store, src: Path) -> None:
    aborted = store.tx_begin()
    store.tx_rollback(aborted)
    committed = store.tx_begin()
    store.tx_commit(committed)
    seq = store.journal.last_seq()
    for tx, state in ((aborted, "aborted"), (committed, "committed")):
        for op in (store.tx_commit, store.tx_rollback, lambda t: store.create(str(src), "x", PY, tx=t)):
            with pytest.raises(errors.Conflict, match=f"^transaction {tx} is {state}$"):
                op(tx)
    with pytest.raises(errors.NotFound, match="^no transaction 'feedface'$"):
        store.tx_commit("feedface")
    with pytest.raises(errors.NotFound):
        inventory.transaction(store, "feedface")
    assert store.journal.last_seq() == seq and list(store.staging_dir.iterdir()) == []
    assert_consistent(store)


def test_name_staged_in_an_open_transaction_is_taken(store: Store, src: Path) -> None:
    tx = store.tx_begin()
    store.create(str(src), "pending", PY, tx=tx)
    with pytest.raises(errors.Conflict, match=f"^an image named 'pending' is staged in open transaction {tx}$"):
        store.create(str(src), "pending", PY)


# --- journal -------------------------------------------------------------------------------------


def test_verify_names_the_edited_event(store: Store, src: Path) -> None:
    store.create(str(src), "a", PY)
    store.deploy("a")
    store.journal.conn.execute("UPDATE events SET subject = 'b' WHERE seq = 5")
    with pytest.raises(errors.IntegrityError, match="^journal chain broken at seq 5: hash does not match") as e:
        Maintenance(store).verify()
    assert e.value.exit_code == 10


def test_rebuild_gives_the_same_projection(store: Store, src: Path, tmp_path: Path) -> None:
    store.create(str(src), "a", PY)
    store.create(str(make_tree(tmp_path / "b", {"b": blob("bb")})), "b", PY)
    store.deploy("a")
    store.deploy("b")
    store.rollback()
    tx = store.tx_begin()
    store.create(str(src), "c", PY, tx=tx)
    before = projection(store)
    assert Maintenance(store).rebuild() == {"events": store.journal.last_seq(), "problems": [], "chain_broken": None}
    assert projection(store) == before


def test_commit_refuses_to_delete_an_image_deployed_since_the_delete_was_staged(store: Store, src: Path) -> None:
    store.create(str(src), "x", PY)
    store.create(str(src), "y", PY)
    tx = store.tx_begin()
    store.delete("x", tx=tx)
    store.deploy("x")
    seq = store.journal.last_seq()
    with pytest.raises(errors.Conflict, match=f"^cannot commit {tx}: image 'x' is the current deployment"):
        store.tx_commit(tx)
    store.deploy("y")
    with pytest.raises(errors.Conflict, match=f"^cannot commit {tx}: image 'x' is the previous deployment"):
        store.tx_commit(tx)
    assert inventory.transaction(store, tx)["state"] == "open" and store.journal.last_seq() == seq + 3
    assert os.readlink(store.deploy_dir / "previous") == "../images/x.composefs" and store.image_path("x").exists()
    store.tx_rollback(tx)
    assert_consistent(store)
