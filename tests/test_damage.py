"""Damage recovery must survive and report clearly, without deleting data.

A torn last journal transaction, a ``journal.db-wal`` cut mid-frame, an
edited event, an image file or an object deleted or changed behind
apt-layer's back: ``recover`` must run to its end, say what is wrong (exit
10 when something remains wrong), and leave every file where it was;
``journal verify`` names an edited event and ``fsck --json`` the damaged
objects and the images that need them.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import sqlite3
import subprocess
import sys
from contextlib import closing
from pathlib import Path

import pytest

from crashkit import KILLED, check_store, cli_env, event_count, kill_at, make_tree, run_cli, shared_pool

DAMAGED = 10


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> dict:
    """Three images sharing objects, two deployed, the journal checkpointed."""
    base = tmp_path_factory.mktemp("damage")
    rng = random.Random(6)
    pool = shared_pool(rng)
    trees = {n: make_tree(base / "src" / n, rng, pool) for n in "abcn"}
    root = base / "template"
    for n in "abc":
        run_cli(root, "image", "create", str(trees[n]), f"img-{n}", "--backend", "python")
    run_cli(root, "deploy", "img-a")
    run_cli(root, "deploy", "img-b")
    run_cli(root, "recover")
    return {"root": root, "base": base, "trees": trees}


@pytest.fixture
def store(template, tmp_path) -> Path:
    root = tmp_path / "store"
    shutil.copytree(template["root"], root, symlinks=True)
    return root


def files(root: Path) -> set[str]:
    """Every path of the store but the journal and recovery's checkpoint, which may change."""
    found = set()
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            rel = os.path.relpath(os.path.join(dirpath, name), root)
            if not rel.startswith(("journal.db", "verified", ".verified")):
                found.add(rel)
    return found


def recover(root: Path) -> tuple[int, dict]:
    proc = run_cli(root, "recover", "--json", check=False)
    assert proc.returncode in (0, DAMAGED), proc.stderr
    return proc.returncode, json.loads(proc.stdout)


def fsck(root: Path) -> tuple[int, dict]:
    proc = run_cli(root, "fsck", "--json", check=False)
    return proc.returncode, json.loads(proc.stdout)


def an_object(root: Path, image: str) -> str:
    with closing(sqlite3.connect(root / "journal.db")) as conn:
        return conn.execute("SELECT io.object FROM image_objects io JOIN images i ON i.digest = io.digest "
                            "WHERE i.name = ? ORDER BY io.object LIMIT 1", (image,)).fetchone()[0]


def users_of(root: Path, obj: str) -> set[str]:
    with closing(sqlite3.connect(root / "journal.db")) as conn:
        return {r[0] for r in conn.execute("SELECT i.name FROM images i JOIN image_objects io "
                                           "ON io.digest = i.digest WHERE io.object = ?", (obj,))}


# --- the journal ---------------------------------------------------------------------------

TORN_WRITER = """
import os, signal, sys
from aptlayer.store import Store
store = Store.open(sys.argv[1])
conn = store.journal.conn
conn.execute("PRAGMA cache_size = 4")  # tiny cache: dirty pages spill into the WAL before COMMIT
wal = sys.argv[1] + "/journal.db-wal"
with store.journal.transaction() as w:
    for i in range(400):
        w.append("tx.begun", f"torn{i:04d}", {"explicit": True, "boot_id": store.boot_id, "pad": "x" * 3000},
                 f"torn{i:04d}")
    print(os.path.getsize(wal), flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
"""


def test_torn_last_transaction(store):
    """A writer killed mid-transaction after its pages reached the WAL: the transaction is gone, nothing else."""
    events = event_count(store)
    proc = subprocess.run([sys.executable, "-c", TORN_WRITER, str(store)], env=cli_env(),
                          capture_output=True, text=True)
    assert proc.returncode == KILLED, proc.stderr
    assert int(proc.stdout) > 100_000, "the transaction never reached the WAL: nothing was torn"
    before = files(store)
    code, report = recover(store)
    assert (code, report["problems"]) == (0, [])
    assert event_count(store) == events
    run_cli(store, "journal", "verify")
    assert files(store) == before
    assert check_store(store, report) == []


def test_apt_layer_killed_inside_its_commit(store, template):
    """``create.mid-commit`` kills apt-layer between two events of one SQLite transaction."""
    events = event_count(store)
    kill_at(store, "create.mid-commit", 1, "image", "create", str(template["trees"]["n"]), "img-n",
            "--backend", "python")
    code, report = recover(store)
    assert code == 0
    tx_events = event_count(store) - events
    assert tx_events >= 2, "the implicit transaction's begin and abort are journaled"
    assert "img-n" not in run_cli(store, "image", "list").stdout
    assert check_store(store, report) == []


def test_wal_truncated_mid_frame(store, template):
    """A WAL cut inside its last frame loses that commit; recovery reports the image it cannot explain."""
    kill_at(store, "create.after-place", 1, "image", "create", str(template["trees"]["n"]), "img-n",
            "--backend", "python")
    wal = store / "journal.db-wal"
    assert wal.stat().st_size > 32, "the commit should still be in the WAL"
    os.truncate(wal, wal.stat().st_size - 100)
    before = files(store)
    code, report = recover(store)
    assert code == DAMAGED
    assert [(p["problem"], p["image"]) for p in report["problems"]] == [("unknown image file", "img-n")]
    assert files(store) == before - {p for p in before if p.startswith("staging/")}
    assert (store / "images" / "img-n.composefs").is_file()
    run_cli(store, "journal", "verify")


HOLD_SNAPSHOT = """
import sqlite3, sys, time
conn = sqlite3.connect(sys.argv[1], isolation_level=None)
conn.execute("BEGIN")
conn.execute("SELECT count(*) FROM events").fetchone()
print("holding", flush=True)
time.sleep(600)
"""


def test_verified_events_lost(store):
    """Events recovery had verified are gone (WAL cut after a recover): it says so and goes on.

    A reader holding an old snapshot keeps every later commit in the WAL
    (no checkpoint may pass it); it is then killed so nothing checkpoints.
    """
    holder = subprocess.Popen([sys.executable, "-c", HOLD_SNAPSHOT, str(store / "journal.db")],
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "holding"
    kill_at(store, "deploy.after-commit", 1, "deploy", "img-c")
    recover(store)
    holder.kill()
    holder.wait()
    wal = store / "journal.db-wal"
    os.truncate(wal, 32 + (4096 + 24) // 2)
    code, report = recover(store)
    assert code == DAMAGED
    assert any("were lost" in p["problem"] for p in report["problems"])
    assert "recover.events-lost" in run_cli(store, "log", "-n", "3").stdout, "the loss stays in the audit trail"
    run_cli(store, "journal", "verify")
    events = event_count(store)
    assert recover(store) == (0, {"actions": [], "problems": []})
    assert event_count(store) == events


def _edit_event(root: Path, seq: int) -> None:
    with closing(sqlite3.connect(root / "journal.db")) as conn:
        conn.execute("UPDATE events SET data = json_set(data, '$.size', 1) WHERE seq = ?", (seq,))
        conn.commit()


def _created_seq(root: Path, name: str) -> int:
    with closing(sqlite3.connect(root / "journal.db")) as conn:
        return conn.execute("SELECT created_seq FROM images WHERE name = ?", (name,)).fetchone()[0]


def test_edited_event_after_the_last_check(store, template):
    """An event edited before recovery checked it: recover names its seq, verify too."""
    kill_at(store, "create.after-commit", 1, "image", "create", str(template["trees"]["n"]), "img-n",
            "--backend", "python")
    seq = _created_seq(store, "img-n")
    _edit_event(store, seq)
    code, report = recover(store)
    assert code == DAMAGED
    assert [p["seq"] for p in report["problems"]] == [seq]
    assert (store / "images" / "img-n.composefs").is_file(), "recovery still finished the commit"
    proc = run_cli(store, "journal", "verify", check=False)
    assert proc.returncode == DAMAGED and f"seq {seq}" in proc.stderr


def test_edited_event_already_checked(store):
    """An old event edited: recover survives and deletes nothing; verify names the seq."""
    seq = _created_seq(store, "img-a")
    _edit_event(store, seq)
    before = files(store)
    code, _ = recover(store)
    assert code == 0, "recovery checks only events it has not checked before (the boot waits for it)"
    assert files(store) == before
    proc = run_cli(store, "journal", "verify", check=False)
    assert proc.returncode == DAMAGED
    assert str(seq) in proc.stderr


def test_events_deleted_behind_the_projection(store):
    """The last events deleted by hand: the projection cannot follow, so recovery reports and touches nothing."""
    with closing(sqlite3.connect(store / "journal.db")) as conn:
        last = conn.execute("SELECT max(seq) FROM events").fetchone()[0]
        conn.execute("DELETE FROM events WHERE seq > ?", (last - 2,))
        conn.commit()
    before = files(store)
    code, report = recover(store)
    assert code == DAMAGED and report["actions"] == []
    assert [p["seq"] for p in report["problems"]] == [last - 1]
    assert files(store) == before
    proc = run_cli(store, "journal", "verify", check=False)
    assert proc.returncode == DAMAGED and str(last - 1) in proc.stderr


# --- files behind apt-layer's back -------------------------------------------------------------


@pytest.mark.parametrize("how", ["deleted", "grown", "overwritten"])
def test_image_file_damaged(store, how):
    path = store / "images" / "img-c.composefs"
    if how == "deleted":
        path.unlink()
    elif how == "grown":
        with open(path, "ab") as f:
            f.write(b"junk")
    else:
        data = bytearray(path.read_bytes())
        data[100] ^= 0xFF
        path.write_bytes(bytes(data))
    before = files(store)
    events = event_count(store)
    code, report = recover(store)
    if how != "overwritten":  # same size: only a digest shows it, and recovery does not hash images
        assert code == DAMAGED
        assert [p["image"] for p in report["problems"]] == ["img-c"]
    assert files(store) == before and event_count(store) == events
    code, result = fsck(store)
    assert code == DAMAGED
    problem = "image file missing" if how == "deleted" else "image file modified"
    assert [(i["name"], i["problem"]) for i in result["images"]] == [("img-c", problem)]


@pytest.mark.parametrize("how", ["missing", "corrupt"])
def test_object_damaged(store, how):
    obj = an_object(store, "img-a")
    path = store / "images" / "objects" / obj
    if how == "missing":
        path.unlink()
    else:
        data = bytearray(path.read_bytes())
        data[0] ^= 0xFF
        path.write_bytes(bytes(data))
    before = files(store)
    recover(store)
    run_cli(store, "gc", "--full")
    assert files(store) == before, "neither recovery nor gc may remove a referenced object"
    code, result = fsck(store)
    assert code == DAMAGED and not result["ok"]
    assert result["bad_objects"] == [{"object": obj, "state": how}]
    assert {i["name"] for i in result["images"]} == users_of(store, obj)
    for image in result["images"]:
        assert image["objects"] == [{"object": obj, "state": how}]
    if how == "missing":
        proc = run_cli(store, "image", "missing-objects", "img-a", "--json", check=False)
        assert obj in proc.stdout
