"""A store written by apt-layer 0.1 (tests/data/store-v0.1.tar.gz) must verify, rebuild and recover unchanged.

The fixture was made by tools/make_compat_store.py driving the CLI: its
journal holds an event of every kind apt-layer records (see the script), its
``expected.json`` every event's hash, the projection's tables and the dump
of every live image. Whatever later code changes inside, it must read that
store as the code that wrote it did: the same chain, the same projection
from a replay, nothing for recovery to redo, the same image bytes.
Everything runs through the CLI, the interface the store was written with.
"""

from __future__ import annotations

import json
import sqlite3
import tarfile
from contextlib import closing
from pathlib import Path

import pytest

from aptlayer.journal import APPLY
from aptlayer.journal.projection import TABLES

from crashkit import run_cli

FIXTURE = Path(__file__).resolve().parent / "data" / "store-v0.1.tar.gz"
#: kinds with a projection entry added after the fixture was made (their tests record them)
NEWER_THAN_THE_FIXTURE = {"undeployed", "deploy.unstaged", "booted"}
#: the audit-only kinds apt-layer 0.1 records (recovery's actions, watch's reports)
INFO_KINDS = {"recover.events-lost", "recover.image-placed", "recover.image-unlinked", "recover.staging-removed",
              "recover.deploy-temp-removed", "recover.deploy-synced", "drift.object-deleted",
              "drift.object-modified", "drift.image-deleted", "drift.image-modified", "drift.image-unknown",
              "drift.deploy-changed"}


@pytest.fixture
def unpacked(tmp_path: Path) -> tuple[Path, dict]:
    """A fresh copy of the store, and what the code that wrote it found in it."""
    with tarfile.open(FIXTURE) as tar:
        tar.extractall(tmp_path, filter="tar")
    return tmp_path / "store", json.loads((tmp_path / "expected.json").read_text())


def tables(root: Path) -> dict[str, list]:
    with closing(sqlite3.connect(root / "journal.db")) as db:
        return {t: sorted((list(r) for r in db.execute(f"SELECT * FROM {t}")), key=repr) for t in TABLES}


def recorded(expected: dict) -> dict[str, list]:
    return {t: sorted(rows, key=repr) for t, rows in expected["projection"].items()}


def cli_json(root: Path, *args: str) -> dict:
    return json.loads(run_cli(root, *args, "--json").stdout)


def test_the_fixture_holds_every_kind_of_event(unpacked) -> None:
    _, expected = unpacked
    assert set(expected["kinds"]) == (set(APPLY) - NEWER_THAN_THE_FIXTURE) | INFO_KINDS
    assert set(expected["projection"]) == set(TABLES)


def test_the_journal_verifies_with_the_recorded_chain(unpacked) -> None:
    root, expected = unpacked
    assert cli_json(root, "journal", "verify") == {"events": len(expected["hashes"]), "ok": True}
    with closing(sqlite3.connect(root / "journal.db")) as db:
        assert [h for (h,) in db.execute("SELECT hash FROM events ORDER BY seq")] == expected["hashes"]


def test_a_rebuild_gives_the_recorded_projection(unpacked) -> None:
    root, expected = unpacked
    assert tables(root) == recorded(expected)
    result = cli_json(root, "journal", "rebuild")
    assert result == {"events": len(expected["hashes"]), "problems": [], "chain_broken": None}
    assert tables(root) == recorded(expected)


def test_recovery_only_aborts_the_transaction_an_earlier_boot_left_open(unpacked) -> None:
    """The fixture's last boot left an explicit transaction open (staged create and deploy):
    any other boot aborts it and drops its staging; nothing else is to redo."""
    root, expected = unpacked
    (open_tx,) = [row[0] for row in expected["projection"]["transactions"] if row[1] == "open"]
    assert [p.name for p in (root / "staging").iterdir()] == [f"{'b' * 32}-{open_tx}"]
    assert cli_json(root, "recover") == {
        "actions": [{"kind": "tx.aborted", "subject": open_tx, "reason": "left open by an earlier boot"}],
        "problems": []}
    assert list((root / "staging").iterdir()) == []
    assert cli_json(root, "recover") == {"actions": [], "problems": []}
    after = tables(root)
    assert after["images"] == recorded(expected)["images"]
    assert after["deployments"] == recorded(expected)["deployments"]
    assert cli_json(root, "journal", "verify")["events"] == len(expected["hashes"]) + 1


def test_fsck_finds_the_store_sound(unpacked) -> None:
    root, _ = unpacked
    result = cli_json(root, "fsck")
    assert (result["ok"], result["bad_objects"], result["images"]) == (True, [], [])


def test_every_live_image_dumps_as_it_did(unpacked) -> None:
    root, expected = unpacked
    assert sorted(expected["dumps"]) == ["base", "crashed", "fromdump", "patched", "v2"]
    for name, dump in expected["dumps"].items():
        assert run_cli(root, "image", "dump", name).stdout == dump, name


def test_the_store_takes_new_work(unpacked, tmp_path: Path) -> None:
    """New events chain onto the old ones: create, deploy, delete, gc, and it all still verifies and rebuilds."""
    root, expected = unpacked
    src = tmp_path / "src"
    (src / "etc").mkdir(parents=True)
    (src / "etc" / "new").write_bytes(b"new content " * 40)
    run_cli(root, "image", "create", "--backend", "python", str(src), "newer")
    run_cli(root, "deploy", "newer")
    run_cli(root, "image", "delete", "crashed")
    run_cli(root, "gc")
    events = len(expected["hashes"]) + 11  # tx.begun, the effect, tx.committed, thrice; gc.begun, gc.swept
    assert cli_json(root, "journal", "verify") == {"events": events, "ok": True}
    with closing(sqlite3.connect(root / "journal.db")) as db:
        assert [h for (h,) in db.execute("SELECT hash FROM events WHERE seq <= ? ORDER BY seq",
                                          (len(expected["hashes"]),))] == expected["hashes"]
    before = tables(root)
    assert cli_json(root, "journal", "rebuild")["events"] == events
    assert tables(root) == before
    assert cli_json(root, "fsck")["ok"] is True
