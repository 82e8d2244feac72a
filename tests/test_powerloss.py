"""Power loss, simulated at the level of the application (the ALICE method).

An operation runs in this process with ``fsops.recorder`` set, so every file
system change the store makes is recorded (create, write, fsync, syncfs, rename,
link, mkdir, unlink, rmdir, symlink), and with ``Journal.transaction`` wrapped, so
each SQLite commit is recorded too, with a copy of the database taken by the
backup API at that moment. Then, for every prefix of that sequence, the
state a power loss at that point could leave is rebuilt on a copy of the
store as it was before the operation:

* a directory entry (create, mkdir, symlink, link, rename, unlink, rmdir) survives
  only if its parent directory (for a rename, the destination's) was fsynced
  later in the prefix; a rename is atomic;
* a file's data is what it held at its last fsync in the prefix, or nothing
  if it was never fsynced;
* the journal is the copy taken at the last commit in the prefix (WAL with
  synchronous=FULL makes a commit durable when it returns).

Everything else the operation did is dropped, which is the harshest state a
file system allowed by POSIX may leave; a few random subsets of the
unsynced directory changes are also kept, since a file system may write
them early and in any order. Recovery then runs on each state as
it would after the reboot (a new boot id) and invariants 1-5 must hold.
"""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import sqlite3
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from crashkit import check_store, kill_at, make_tree, populate, run_cli, shared_pool

from aptlayer.composefs import objectstore
from aptlayer.composefs.digestcache import SETTLE_NS
from aptlayer.journal import Journal
from aptlayer.linux import fsops
from aptlayer.recovery import recover
from aptlayer.maintenance import Maintenance
from aptlayer.store import CreateOptions, Store

ENTRY_OPS = ("create", "mkdir", "symlink", "link", "rename", "unlink", "rmdir")
JOURNAL_FILES = ("journal.db", "journal.db-wal", "journal.db-shm")


@dataclass
class Op:
    kind: str
    path: str = ""
    #: the inode the op acts on (a fresh number for new files, ``old:PATH`` for files that predate the run)
    inode: object = None
    #: the directory whose fsync makes this entry durable
    parent: object = None
    dst: str = ""
    #: what a symlink points to; the existing name a link was made of
    target: str = ""
    content: bytes | None = None
    journal: Path | None = None


@dataclass
class Recording:
    """The operations a run made, with the inode bookkeeping a replay needs."""

    root: str
    backups: Path
    ops: list[Op] = field(default_factory=list)
    names: dict[str, object] = field(default_factory=dict)
    #: the op that made each new inode (what a durable rename of it must recreate)
    made: dict[object, Op] = field(default_factory=dict)
    serial: int = 0

    def inode(self, path: str) -> object:
        return self.names.get(path, f"old:{path}")

    def fresh(self, path: str) -> object:
        self.serial += 1
        self.names[path] = self.serial
        return self.serial

    def __call__(self, kind: str, args: tuple) -> None:
        path = os.fsdecode(args[1] if kind in ("symlink", "link") else args[0])
        parent = self.inode(os.path.dirname(path))
        if kind in ("create", "mkdir", "symlink"):
            target = os.fsdecode(args[0]) if kind == "symlink" else ""
            op = Op(kind, path, self.fresh(path), parent, target=target)
            self.made[op.inode] = op
            self.ops.append(op)
        elif kind == "link":
            inode = self.inode(os.fsdecode(args[0]))
            self.names[path] = inode
            self.ops.append(Op(kind, path, inode, parent, target=os.fsdecode(args[0])))
        elif kind == "rename":
            dst = os.fsdecode(args[1])
            inode = self.names.pop(path, f"old:{path}")
            for name in [n for n in self.names if n.startswith(path + "/")]:
                self.names[dst + name[len(path):]] = self.names.pop(name)
            self.names[dst] = inode
            self.ops.append(Op(kind, path, inode, self.inode(os.path.dirname(dst)), dst=dst))
        elif kind in ("unlink", "rmdir"):
            self.ops.append(Op(kind, path, self.names.pop(path, f"old:{path}"), parent))
        elif kind == "fsync":
            if os.path.isdir(path):
                self.ops.append(Op("fsync_dir", path, self.inode(path)))
            else:
                self.ops.append(Op("fsync_file", path, self.inode(path), content=Path(path).read_bytes()))
        elif kind == "syncfs":  # the whole file system: an fsync of every directory and file under the root
            for dirpath, _, filenames in os.walk(self.root):
                self("fsync", (dirpath,))
                for name in filenames:
                    if not os.path.islink(os.path.join(dirpath, name)):
                        self("fsync", (os.path.join(dirpath, name),))

    def commit(self, conn: sqlite3.Connection) -> None:
        copy = self.backups / f"journal-{len(self.ops)}.db"
        with sqlite3.connect(copy) as dst:
            conn.backup(dst)
        dst.close()
        self.ops.append(Op("commit", journal=copy))


@contextmanager
def recording(root: Path, backups: Path):
    """Record every fsops call and journal commit made inside the block."""
    rec = Recording(str(root), backups)
    plain = Journal.transaction

    @contextmanager
    def transaction(self):
        with plain(self) as writer:
            yield writer
        rec.commit(self.conn)

    fsops.recorder = rec
    Journal.transaction = transaction
    try:
        yield rec
    finally:
        fsops.recorder = None
        Journal.transaction = plain


def durable(ops: list[Op], lucky: frozenset = frozenset()) -> tuple[list[Op], dict, Path | None]:
    """What of ``ops`` survives a power loss right after them.

    Returns the surviving entry operations in order (those made durable,
    plus the unsynced ones whose ``id`` is in ``lucky``: they happened to
    reach the disk), the data of each inode (its content at its last fsync)
    and the journal copy of the last commit.
    """
    synced_dirs: set = set()
    kept: list[Op] = []
    for op in reversed(ops):
        if op.kind == "fsync_dir":
            synced_dirs.add(op.inode)
        elif op.kind in ENTRY_OPS and (op.parent in synced_dirs or id(op) in lucky):
            kept.append(op)
    data: dict = {}
    journal = None
    for op in ops:
        if op.kind == "fsync_file":
            data[op.inode] = op.content
        elif op.kind == "commit":
            journal = op.journal
    return kept[::-1], data, journal


def materialize(before: Path, rec: Recording, prefix: list[Op], target: Path,
                lucky: frozenset = frozenset()) -> None:
    """Build in ``target`` the store a power loss after ``prefix`` could leave."""
    entries, data, journal = durable(prefix, lucky)
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(before, target, symlinks=True, ignore=shutil.ignore_patterns(*JOURNAL_FILES))
    shutil.copyfile(journal or before / "journal.db.backup", target / "journal.db")
    (target / "journal.db.backup").unlink()
    here = {}

    def local(path: str) -> Path:
        return target / os.path.relpath(path, rec.root)

    def make(op: Op, path: Path) -> None:
        if op.kind == "create":
            path.write_bytes(b"")
        elif op.kind == "mkdir":
            path.mkdir()
        else:
            os.symlink(op.target, path)
        here[path] = op.inode

    def recreate(inode: object, path: Path) -> None:
        """The file ``inode`` under ``path``, where the entry that named it before did not survive."""
        if isinstance(inode, str):  # a file older than the run: its content is in ``before``
            shutil.copyfile(before / os.path.relpath(inode.removeprefix("old:"), rec.root), path)
            here[path] = inode
        else:
            make(rec.made[inode], path)

    for op in entries:
        path = local(op.path)
        if not path.parent.is_dir():
            continue  # its directory itself never became durable
        if op.kind in ("create", "mkdir", "symlink"):
            make(op, path)
        elif op.kind == "rename":
            dst = local(op.dst)
            if not dst.parent.is_dir():
                continue
            if os.path.lexists(path) and here.get(path, f"old:{op.path}") == op.inode:
                os.replace(path, dst)
                here.pop(path, None)
                here[dst] = op.inode
            else:  # its creation was never made durable, but the rename was
                if os.path.lexists(dst):
                    dst.unlink()
                recreate(op.inode, dst)
        elif op.kind == "link":
            src = local(op.target)
            if os.path.lexists(src) and here.get(src, f"old:{op.target}") == op.inode:
                os.link(src, path)
                here[path] = op.inode
            else:
                recreate(op.inode, path)
        elif op.kind == "unlink" and os.path.lexists(path):
            path.unlink()
        elif op.kind == "rmdir" and path.is_dir():
            shutil.rmtree(path)
    for path, inode in here.items():
        if path.is_file() and not path.is_symlink() and not isinstance(inode, str):
            path.write_bytes(data.get(inode, b""))


# --- the store and the operations ------------------------------------------------------------

NEW_BOOT = "5eed0b0075eed0b0075eed0b0075eed0"
#: random survivals of unsynced changes tried per prefix, besides losing them all
LUCKY_DRAWS = 2


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> dict:
    """A store with deployments, garbage, strays and an open transaction (as in test_crash)."""
    base = tmp_path_factory.mktemp("powerloss")
    rng = random.Random(5)
    pool = shared_pool(rng)
    trees = {n: make_tree(base / "src" / n, rng, pool, files=4) for n in "abcdefrx"}
    trees["fresh"] = make_tree(base / "src" / "fresh", rng, shared_pool(rng, 6), files=6)
    root = base / "template"
    tx = populate(root, trees, trees["e"])
    # img-y: tree x again once settled, so the digest cache remembers the tree and
    # the op create-unchanged finds it unchanged (it links img-x, the first live image with its digest)
    latest = max(os.lstat(os.path.join(d, n)).st_ctime_ns
                 for d, dirs, files in os.walk(trees["x"]) for n in [".", *dirs, *files])
    time.sleep(max(0.0, (latest + SETTLE_NS - time.time_ns()) / 1e9 + 0.1))
    run_cli(root, "image", "create", str(trees["x"]), "img-y", "--backend", "python")
    crashed = base / "crashed"
    shutil.copytree(root, crashed, symlinks=True)
    kill_at(crashed, "commit.after-commit", 1, "tx", "commit", tx)
    return {"root": root, "crashed": crashed, "base": base, "tx": tx, "trees": trees}


def _options() -> CreateOptions:
    return CreateOptions(backend="python", threads=1)


OPERATIONS = {
    "create": lambda s, t: s.create(str(t["trees"]["f"]), "img-new", _options()),
    "create-fresh": lambda s, t: s.create(str(t["trees"]["fresh"]), "img-new", _options()),
    "create-unchanged": lambda s, t: s.create(str(t["trees"]["x"]), "img-new", _options()),
    "create-staged": lambda s, t: s.create(str(t["trees"]["f"]), "img-new", _options(), tx=t["tx"]),
    "delete": lambda s, t: s.delete("img-x"),
    "deploy": lambda s, t: s.deploy("img-x"),
    "rollback": lambda s, t: s.rollback(),
    "tx-commit": lambda s, t: s.tx_commit(t["tx"]),
    "tx-rollback": lambda s, t: s.tx_rollback(t["tx"]),
    "gc": lambda s, t: Maintenance(s).gc(),
    "gc-full": lambda s, t: Maintenance(s).gc(full=True),
    "recover": lambda s, t: recover(s),
}


def record(template: dict, op: str) -> tuple[Path, Recording]:
    """Run ``op`` on a fresh copy of the store while recording; returns (state before, recording)."""
    base = template["base"] / op
    start, before, backups = base / "start", base / "before", base / "journals"
    for d in (start, before, backups):
        shutil.rmtree(d, ignore_errors=True)
    source = template["crashed"] if op == "recover" else template["root"]
    shutil.copytree(source, start, symlinks=True)
    shutil.copytree(start, before, symlinks=True, ignore=shutil.ignore_patterns(*JOURNAL_FILES))
    backups.mkdir()
    with sqlite3.connect(start / "journal.db") as src, sqlite3.connect(before / "journal.db.backup") as dst:
        src.backup(dst)
    src.close()
    dst.close()
    store = Store.open(start)
    try:
        with recording(start, backups) as rec:
            OPERATIONS[op](store, template)
    finally:
        store.close()
    assert all(o.path.startswith(str(start)) for o in rec.ops if o.path), "a change outside the store"
    return before, rec


def _signature(prefix: list[Op], lucky: frozenset) -> tuple:
    entries, data, journal = durable(prefix, lucky)
    return (tuple(id(o) for o in entries), tuple(sorted((str(k), hashlib.sha256(v).hexdigest())
                                                         for k, v in data.items())), journal)


def states(rec: Recording, rng: random.Random):
    """Each distinct power-loss state over the prefixes: (prefix length, ops, lucky ops).

    For each prefix: the harshest state (every unsynced change lost), and
    LUCKY_DRAWS states where a random subset of the unsynced directory
    changes reached the disk anyway, in any combination the file system's
    reordering allows.
    """
    seen = set()
    for k in range(len(rec.ops) + 1):
        prefix = rec.ops[:k]
        unsynced = [id(o) for o in prefix if o.kind in ENTRY_OPS and o not in durable(prefix)[0]]
        draws = [frozenset()] + [frozenset(i for i in unsynced if rng.random() < 0.5)
                                 for _ in range(LUCKY_DRAWS if unsynced else 0)]
        for lucky in draws:
            sig = _signature(prefix, lucky)
            if sig not in seen:
                seen.add(sig)
                yield k, prefix, lucky


@pytest.fixture
def new_boot(monkeypatch):
    """After a power loss the machine boots again: a new boot id for staging and temp files."""
    from aptlayer import names

    monkeypatch.setattr(names, "boot_id", lambda: NEW_BOOT)
    monkeypatch.setattr(objectstore, "BOOT_TAG", NEW_BOOT[:8])


@pytest.mark.parametrize("op", list(OPERATIONS))
def test_power_loss_at_every_point(template, new_boot, op):
    before, rec = record(template, op)
    assert any(o.kind == "fsync_dir" for o in rec.ops)
    failures = {}
    checked = 0
    for k, prefix, lucky in states(rec, random.Random(op)):
        target = template["base"] / op / "state"
        materialize(before, rec, prefix, target, lucky)
        store = Store.open(target)
        try:
            report = recover(store)
        finally:
            store.close()
        problems = check_store(target, report)
        checked += 1
        if problems:
            kept = [f"{o.kind} {os.path.relpath(o.path, rec.root)}" for o in prefix if id(o) in lucky]
            failures[f"after {k} of {len(rec.ops)} ops, unsynced but kept: {kept}"] = problems
    print(f"{op}: {len(rec.ops)} ops recorded, {checked} distinct power-loss states checked")
    assert failures == {}


def test_create_unchanged_links_the_live_image(template) -> None:
    """The op create-unchanged above takes the reuse path: its staged image is a link, not a copy."""
    _, rec = record(template, "create-unchanged")
    links = [o for o in rec.ops if o.kind == "link"]
    assert [os.path.basename(o.target) for o in links] == ["img-x.composefs"]
    assert not any(o.kind == "create" and o.path.endswith(".composefs") for o in rec.ops)
