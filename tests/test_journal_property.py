"""Property tests: random operation sequences against a model in plain dicts.

After every step the projection must equal the model and pass its
invariants; at the end of each sequence a rebuild from events and manifests
must give exactly the incremental tables, and ``verify`` must pass. A second
test damages one event of a random history and checks that ``verify`` names
its sequence number.
"""

from __future__ import annotations

import random
import shutil
import sqlite3
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import hypothesis.strategies as st
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from aptlayer.journal import ChainBroken, Journal, ProjectionError
from aptlayer.journal.projection import TABLES

NAMES = ("a", "b", "c", "d")
MOUNTPOINTS = ("/m1", "/m2")
DIGESTS = tuple(f"D{k}" for k in range(6))
OBJECTS = tuple(f"o{j}" for j in range(14))  # o12, o13: in no manifest


def manifest(digest: str) -> dict[str, int]:
    """A fixed manifest per digest: 2-6 of objects o0-o11, size from the object's index."""
    rng = random.Random(digest)
    return {f"o{j}": j + 1 for j in rng.sample(range(12), rng.randint(2, 6))}


def snapshot(conn: sqlite3.Connection) -> dict[str, list[tuple]]:
    return {t: sorted(conn.execute(f"SELECT * FROM {t}").fetchall(), key=repr) for t in TABLES}


@dataclass
class Model:
    """What the projection should say, computed without SQL."""

    images: dict[str, str] = field(default_factory=dict)
    slots: dict[str, tuple[str, str]] = field(default_factory=dict)
    mounts: dict[str, tuple[str, str, str]] = field(default_factory=dict)
    txs: dict[str, str] = field(default_factory=dict)
    staged: dict[str, list[tuple[str, str, str]]] = field(default_factory=dict)
    rows: set[str] = field(default_factory=set)  # objects with an object_refs row

    def held(self) -> set[str]:
        digests = set(self.images.values()) | {d for _, d in self.slots.values()}
        digests |= {d for _, d, state in self.mounts.values() if state == "mounted"}
        for tx, ops in self.staged.items():
            if self.txs[tx] == "open":
                digests |= {d for op, _, d in ops if op == "create"}
        return digests

    def refs(self) -> dict[str, tuple[int, int]]:
        counts = {obj: 0 for obj in self.rows}
        for digest in self.held():
            for obj in manifest(digest):
                counts[obj] = counts.get(obj, 0) + 1
        self.rows |= set(counts)
        return {obj: (n, int(obj[1:]) + 1) for obj, n in counts.items()}

    def stage_ok(self, tx: str, op: str, name: str, digest: str) -> bool:
        pending = {(o, n): d for o, n, d in self.staged.get(tx, [])}
        if (op, name) in pending:
            return False
        live, replaced, creating = self.images.get(name), ("delete", name) in pending, pending.get(("create", name))
        if op == "create":
            return live is None or replaced
        if op == "delete":
            return live is not None and creating is None and live == digest
        return digest == (creating if creating is not None else (None if replaced else live))

    def commit(self, tx: str) -> tuple[dict, dict] | None:
        """The images and slots after committing ``tx``, or None if the commit must fail."""
        images, slots = dict(self.images), dict(self.slots)
        for op, name, digest in self.staged.get(tx, []):
            if op == "create":
                if name in images:
                    return None
                images[name] = digest
            elif op == "delete":
                if images.get(name) != digest:
                    return None
                del images[name]
            else:
                if images.get(name) != digest:
                    return None
                slots = {"current": (name, digest)} | ({"previous": slots["current"]} if "current" in slots else {})
        return images, slots


def slot_json(slot: tuple[str, str] | None) -> dict | None:
    return {"image": slot[0], "digest": slot[1]} if slot else None


class JournalMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.dir = tempfile.mkdtemp(prefix="journal-prop-")
        self.journal = Journal.open(Path(self.dir) / "journal.db")
        self.model = Model()
        self.counter = 0

    def teardown(self) -> None:
        try:
            incremental = snapshot(self.journal.conn)
            self.journal.rebuild()
            assert snapshot(self.journal.conn) == incremental
            self.journal.verify()
        finally:
            self.journal.close()
            shutil.rmtree(self.dir)

    def _tx(self) -> str:
        self.counter += 1
        return f"tx{self.counter}"

    def _expect(self, ok: bool, append) -> bool:
        """Run ``append``; it must succeed iff ``ok``, and a refusal must record nothing."""
        before = self.journal.last_seq()
        if ok:
            append()
            return True
        with pytest.raises(ProjectionError):
            append()
        assert self.journal.last_seq() == before
        return False

    def _implicit(self, ok: bool, kind: str, subject: str, data: dict, with_manifest: bool = False) -> bool:
        """An operation as its own transaction; a refused one is aborted, as recovery would."""
        tx = self._tx()
        self.journal.append("tx.begun", tx, {"explicit": False}, tx)

        def go() -> None:
            with self.journal.transaction() as w:
                items = manifest(data["digest"]).items() if with_manifest else None
                w.append(kind, subject, data, tx, manifest=items)
                w.append("tx.committed", tx, {}, tx)

        done = self._expect(ok, go)
        if not done:
            self.journal.append("tx.aborted", tx, {}, tx)
        self.model.txs[tx] = "committed" if done else "aborted"
        return done

    @rule(name=st.sampled_from(NAMES), digest=st.sampled_from(DIGESTS))
    def create(self, name: str, digest: str) -> None:
        if self._implicit(name not in self.model.images, "image.created", name, {"digest": digest}, True):
            self.model.images[name] = digest

    @rule(name=st.sampled_from(NAMES))
    def delete(self, name: str) -> None:
        digest = self.model.images.get(name, "D0")
        if self._implicit(name in self.model.images, "image.deleted", name, {"digest": digest}):
            del self.model.images[name]

    @rule(name=st.sampled_from(NAMES))
    def deploy(self, name: str) -> None:
        current = (name, self.model.images.get(name, "D0"))
        previous = self.model.slots.get("current")
        data = {"current": slot_json(current), "previous": slot_json(previous)}
        if self._implicit(name in self.model.images, "deployed", name, data):
            self.model.slots = {"current": current} | ({"previous": previous} if previous else {})

    @rule()
    def rollback(self) -> None:
        cur, prev = self.model.slots.get("current"), self.model.slots.get("previous")
        data = {"current": slot_json(prev), "previous": slot_json(cur)}
        if self._implicit(prev is not None, "rolled-back", prev[0] if prev else "a", data):
            self.model.slots = {"current": prev, "previous": cur}

    @rule(explicit=st.booleans())
    def begin(self, explicit: bool) -> None:
        tx = self._tx()
        self.journal.append("tx.begun", tx, {"explicit": explicit}, tx)
        self.model.txs[tx] = "open"
        self.model.staged[tx] = []

    def _open(self, pick: int) -> str | None:
        open_txs = sorted(t for t, s in self.model.txs.items() if s == "open")
        return open_txs[pick % len(open_txs)] if open_txs else None

    @rule(pick=st.integers(0, 9), op=st.sampled_from(["create", "delete", "deploy"]),
          name=st.sampled_from(NAMES), digest=st.sampled_from(DIGESTS))
    def stage(self, pick: int, op: str, name: str, digest: str) -> None:
        tx = self._open(pick)
        if tx is None:
            return
        if op == "delete" or (op == "deploy" and digest < "D3"):  # else a deploy may name a wrong digest
            pending = {n: d for o, n, d in self.model.staged[tx] if o == "create"}
            digest = pending.get(name, self.model.images.get(name, digest))
        kind = {"create": "image.staged", "delete": "delete.staged", "deploy": "deploy.staged"}[op]
        items = manifest(digest).items() if op == "create" else None
        ok = self.model.stage_ok(tx, op, name, digest)
        if self._expect(ok, lambda: self.journal.append(kind, name, {"digest": digest}, tx, manifest=items)):
            self.model.staged[tx].append((op, name, digest))

    @rule(pick=st.integers(0, 9))
    def commit(self, pick: int) -> None:
        tx = self._open(pick)
        if tx is None:
            return
        after = self.model.commit(tx)
        if self._expect(after is not None, lambda: self.journal.commit_tx(tx)):
            self.model.images, self.model.slots = after
            self.model.txs[tx] = "committed"

    @rule(pick=st.integers(0, 9))
    def abort(self, pick: int) -> None:
        tx = self._open(pick)
        if tx is not None:
            self.journal.append("tx.aborted", tx, {"reason": "rollback"}, tx)
            self.model.txs[tx] = "aborted"

    @rule(mountpoint=st.sampled_from(MOUNTPOINTS), name=st.sampled_from(NAMES))
    def mount(self, mountpoint: str, name: str) -> None:
        digest = self.model.images.get(name)
        if digest is None:
            return
        ok = self.model.mounts.get(mountpoint, ("", "", "lost"))[2] != "mounted"
        data = {"mountpoint": mountpoint, "digest": digest, "boot_id": "b"}
        if self._expect(ok, lambda: self.journal.append("mounted", name, data, self._tx())):
            self.model.mounts[mountpoint] = (name, digest, "mounted")

    @rule(mountpoint=st.sampled_from(MOUNTPOINTS), lost=st.booleans())
    def unmount(self, mountpoint: str, lost: bool) -> None:
        row = self.model.mounts.get(mountpoint)
        ok = row is not None and (not lost or row[2] == "mounted")
        kind = "mount.lost" if lost else "unmounted"
        name = row[0] if row else "a"
        if self._expect(ok, lambda: self.journal.append(kind, name, {"mountpoint": mountpoint}, self._tx())):
            if lost:
                self.model.mounts[mountpoint] = (row[0], row[1], "lost")
            else:
                del self.model.mounts[mountpoint]

    @rule(spare=st.sets(st.sampled_from(OBJECTS)))
    def gc(self, spare: set[str]) -> None:
        """A sweep that spares some objects (as a grace period would), whether at zero, held or rowless."""
        tx = self._tx()
        garbage = {o for o, (n, _) in self.model.refs().items() if n == 0}
        self.journal.append("gc.begun", "store", {"full": False}, tx)
        data = {"objects": len(garbage)} | ({"spared": sorted(spare)} if spare else {})
        self.journal.append("gc.swept", "store", data, tx)
        self.model.rows -= garbage - spare

    @rule()
    def rebuild_matches(self) -> None:
        incremental = snapshot(self.journal.conn)
        assert self.journal.rebuild() == self.journal.last_seq()
        assert snapshot(self.journal.conn) == incremental
        assert self.journal.verify() == self.journal.last_seq()

    @invariant()
    def matches_model(self) -> None:
        conn = self.journal.conn
        assert self.journal.check() == []
        assert dict(conn.execute("SELECT name, digest FROM images")) == self.model.images
        slots = {s: (i, d) for s, i, d in conn.execute("SELECT slot, image, digest FROM deployments")}
        assert slots == self.model.slots
        mounts = {m: (i, d, s) for m, i, d, s in conn.execute("SELECT mountpoint, image, digest, state FROM mounts")}
        assert mounts == self.model.mounts
        assert dict(conn.execute("SELECT id, state FROM transactions")) == self.model.txs
        refs = {o: (n, s) for o, n, s in conn.execute("SELECT object, refcount, size FROM object_refs")}
        assert refs == self.model.refs()


TestJournalMachine = JournalMachine.TestCase
TestJournalMachine.settings = settings(
    max_examples=100, stateful_step_count=50, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)


# --- tampering ------------------------------------------------------------


def history(path: Path, seed: int) -> Journal:
    """A journal with a random but valid history of ~60 events."""
    rng = random.Random(seed)
    j = Journal.open(path)
    live: dict[str, str] = {}
    for i in range(20):
        tx = f"t{i}"
        j.append("tx.begun", tx, {}, tx)
        with j.transaction() as w:
            name = rng.choice(NAMES)
            if name in live:
                w.append("image.deleted", name, {"digest": live.pop(name)}, tx)
            else:
                live[name] = rng.choice(DIGESTS)
                w.append("image.created", name, {"digest": live[name]}, tx, manifest=manifest(live[name]).items())
            w.append("tx.committed", tx, {}, tx)
    return j


def raw(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA foreign_keys = OFF")
    return conn


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**16), where=st.floats(0, 1),
       damage=st.sampled_from(["edit-data", "edit-at", "edit-hash", "delete", "swap", "truncate"]))
def test_verify_names_the_first_damaged_event(seed: int, where: float, damage: str) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="journal-tamper-"))
    try:
        path = tmp / "journal.db"
        j = history(path, seed)
        last = j.last_seq()
        assert j.verify() == last
        seq = min(last - 1, 1 + int(where * (last - 1)))
        conn = raw(path)
        cols = "at, tx, kind, subject, data, actor, hash"
        if damage == "edit-data":
            conn.execute("UPDATE events SET data = json_set(data, '$.extra', 1) WHERE seq = ?", (seq,))
        elif damage == "edit-at":
            conn.execute("UPDATE events SET at = replace(at, 'Z', '1Z') WHERE seq = ?", (seq,))
        elif damage == "edit-hash":
            conn.execute("UPDATE events SET hash = ? WHERE seq = ?", ("ab" * 32, seq))
        elif damage == "delete":
            conn.execute("DELETE FROM events WHERE seq = ?", (seq,))
        elif damage == "swap":
            a = conn.execute(f"SELECT {cols} FROM events WHERE seq = ?", (seq,)).fetchone()
            b = conn.execute(f"SELECT {cols} FROM events WHERE seq = ?", (seq + 1,)).fetchone()
            sets = ", ".join(f"{c.strip()} = ?" for c in cols.split(","))
            conn.execute(f"UPDATE events SET {sets} WHERE seq = ?", (*b, seq))
            conn.execute(f"UPDATE events SET {sets} WHERE seq = ?", (*a, seq + 1))
        else:
            seq = last
            conn.execute("DELETE FROM events WHERE seq = ?", (seq,))
        conn.close()
        with pytest.raises(ChainBroken) as e:
            j.verify()
        assert e.value.seq == seq, e.value
        if seq > 2:
            with pytest.raises(ChainBroken) as e:
                j.verify(after=seq - 2)
            assert e.value.seq == seq, e.value
            if damage in ("edit-data", "edit-at"):
                assert j.verify(after=seq) == last - seq  # the damage is before the trusted point
        j.close()
    finally:
        shutil.rmtree(tmp)


def test_verify_names_the_event_of_an_altered_manifest(tmp_path: Path) -> None:
    j = history(tmp_path / "journal.db", 7)
    digest, seq = j.conn.execute("SELECT digest, seq FROM images_manifest ORDER BY seq LIMIT 1 OFFSET 1").fetchone()
    conn = raw(tmp_path / "journal.db")
    conn.execute("UPDATE image_objects SET size = size + 1 WHERE digest = ?", (digest,))
    conn.close()
    with pytest.raises(ChainBroken) as e:
        j.verify()
    assert e.value.seq == seq and digest in e.value.reason
    j.close()
