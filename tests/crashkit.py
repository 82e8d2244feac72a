"""Shared helpers for the crash tests and tools/torture.py.

Run apt-layer in a child process (so it can really be killed), build small
source trees that share content (so objects are deduplicated), and check the
five invariants of issue 4 on a store after recovery:

1. every committed image is listed, its file's fs-verity digest matches the
   journal and no object it needs is missing;
2. nothing of an uncommitted transaction is visible or left in staging;
3. the projection equals a rebuild from the journal, and the journal verifies;
4. a second recovery journals nothing;
5. ``gc --full`` removes only unreferenced objects, and then none remain.

The checks after the first recovery run in this process, through the same
Store API the CLI calls: a crash test needs real processes to kill, not to
read back what they left.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
from collections import Counter
from contextlib import closing
from pathlib import Path

from aptlayer import inventory
from aptlayer.composefs import fsverity
from aptlayer.composefs.objectstore import ObjectStore
from aptlayer.journal.projection import TABLES
from aptlayer.recovery import recover
from aptlayer.maintenance import Maintenance
from aptlayer.layout import IMAGE_SUFFIX
from aptlayer.store import Store

REPO = Path(__file__).resolve().parent.parent
#: exit status of a process that got SIGKILL (``subprocess`` convention)
KILLED = -signal.SIGKILL


def cli_env(**extra: str) -> dict[str, str]:
    """The environment for a child apt-layer: this checkout first, no fault or pause unless asked."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("APT_LAYER_FAULT", "APT_LAYER_PAUSE"))}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env.update(extra)
    return env


def cli_args(root: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "aptlayer", "--root", str(root), "-q", *args]


def run_cli(root: Path, *args: str, env: dict[str, str] | None = None,
            check: bool = True) -> subprocess.CompletedProcess:
    """Run one apt-layer command to its end; ``check`` wants exit status 0."""
    proc = subprocess.run(cli_args(root, *args), env=env or cli_env(), capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise AssertionError(f"apt-layer {' '.join(args)} -> {proc.returncode}\n{proc.stdout}{proc.stderr}")
    return proc


def spawn_cli(root: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    return subprocess.Popen(cli_args(root, *args), env=env or cli_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def fault_points(root: Path, *args: str, log: Path) -> Counter:
    """Run a command with the fault log on; how often it passed each point.

    The store is changed by the run: call it on a throwaway copy.
    """
    log.unlink(missing_ok=True)
    run_cli(root, *args, env=cli_env(APT_LAYER_FAULT_LOG=str(log)))
    return Counter(log.read_text().split()) if log.exists() else Counter()


def kill_at(root: Path, point: str, nth: int, *args: str) -> subprocess.CompletedProcess:
    """Run a command that must die by SIGKILL at the ``nth`` hit of ``point``."""
    proc = run_cli(root, *args, env=cli_env(APT_LAYER_FAULT=f"{point}:{nth}"), check=False)
    if proc.returncode != KILLED:
        raise AssertionError(f"{' '.join(args)} was not killed at {point}:{nth} "
                             f"(exit {proc.returncode}): {proc.stderr}")
    return proc


# --- source trees ------------------------------------------------------------------


def shared_pool(rng: random.Random, count: int = 12) -> list[bytes]:
    """Contents several trees draw from, all larger than the inline limit (64 bytes)."""
    return [rng.randbytes(rng.randint(65, 3000)) for _ in range(count)]


def make_tree(path: Path, rng: random.Random, pool: list[bytes], files: int = 6) -> Path:
    """A tiny tree: a few files from the shared pool, one of its own, one inline, a symlink."""
    if path.exists():
        shutil.rmtree(path)
    (path / "etc").mkdir(parents=True)
    (path / "usr" / "lib").mkdir(parents=True)
    for i in range(files):
        folder = path / ("etc" if i % 2 else "usr/lib")
        (folder / f"f{i}").write_bytes(rng.choice(pool))
    (path / "own").write_bytes(rng.randbytes(rng.randint(65, 2000)))
    (path / "etc" / "small").write_bytes(b"inline %d\n" % rng.randint(0, 9))
    (path / "link").symlink_to("etc/small")
    return path


# --- invariants --------------------------------------------------------------------------


def projection_snapshot(conn: sqlite3.Connection) -> dict[str, list[tuple]]:
    return {t: sorted(conn.execute(f"SELECT * FROM {t}").fetchall(), key=repr) for t in TABLES}


def event_count(root: Path) -> int:
    with closing(sqlite3.connect(root / "journal.db")) as conn:
        return conn.execute("SELECT count(*) FROM events").fetchone()[0]


def disk_objects(store) -> set[str]:
    return {o.relpath for o in ObjectStore(store.objects_dir).iter_objects()}


def referenced_objects(store) -> set[str]:
    """Objects in the manifest of any image a root holds, derived without trusting refcounts."""
    conn = store.journal.conn
    digests = {r[0] for r in conn.execute(
        "SELECT digest FROM images UNION SELECT digest FROM deployments "
        "UNION SELECT digest FROM mounts WHERE state = 'mounted' "
        "UNION SELECT o.digest FROM tx_ops o JOIN transactions t ON t.id = o.tx "
        "WHERE o.op = 'create' AND o.effective_seq IS NULL AND t.state = 'open'")}
    return {obj for d in digests for obj, _ in store.journal.manifest(d)}


def check_committed_images(store) -> list[str]:
    """Invariant 1, plus: no image file or deployment link the journal does not explain."""
    problems = []
    live = {i["name"]: i for i in inventory.images(store)}
    for name, image in live.items():
        path = store.image_path(name)
        if not path.is_file():
            problems.append(f"1: image {name}: file {path} missing")
            continue
        if fsverity.digest_file(str(path)).hex() != image["digest"]:
            problems.append(f"1: image {name}: file digest differs from the journal")
        if store.missing_objects(name):
            problems.append(f"1: image {name}: objects missing {store.missing_objects(name)}")
    files = {p.name[: -len(IMAGE_SUFFIX)] for p in store.images_dir.glob("*" + IMAGE_SUFFIX)}
    if files != set(live):
        problems.append(f"1: image files {sorted(files)} but live images {sorted(live)}")
    for folder in (store.root, store.images_dir):
        if [p.name for p in folder.iterdir() if p.name.startswith(".")]:
            problems.append(f"1: temporary files left in {folder}")
    deps = store.journal.deployments()
    for slot in ("current", "previous"):
        link = store.deploy_dir / slot
        want = f"../images/{deps[slot].image}{IMAGE_SUFFIX}" if slot in deps else None
        have = os.readlink(link) if os.path.islink(link) else None
        if have != want:
            problems.append(f"1: deploy/{slot} -> {have}, journal says {want}")
    extra = sorted(set(os.listdir(store.deploy_dir)) - {"current", "previous"})
    if extra:
        problems.append(f"1: stray files in deploy/: {extra}")
    return problems


def check_uncommitted(store) -> list[str]:
    """Invariant 2: staging holds exactly the staged images of open transactions of this boot."""
    conn = store.journal.conn
    problems = []
    implicit = [r[0] for r in conn.execute("SELECT id FROM transactions WHERE state = 'open' AND explicit = 0")]
    if implicit:
        problems.append(f"2: implicit transactions still open: {implicit}")
    wanted = set()
    for (tx,) in conn.execute("SELECT id FROM transactions WHERE state = 'open'"):
        wanted.add(store.staging_path(tx).name)
        for op in store.journal.staged_ops(tx):
            if op.op == "create" and op.effective_seq is None:
                wanted.add(op.data["staged"].split("/", 1)[1])
    found = set()
    for entry in store.staging_dir.iterdir():
        found.add(entry.name)
        if entry.is_dir():
            found.update(f"{entry.name}/{p.name}" for p in entry.iterdir())
    unexpected = found - wanted
    if unexpected:
        problems.append(f"2: staging holds {sorted(unexpected)}, which no open transaction staged")
    missing = {w for w in wanted if "/" in w} - found
    if missing:
        problems.append(f"2: staged images of open transactions are gone: {sorted(missing)}")
    return problems


def check_projection(store) -> list[str]:
    """Invariant 3: projection == rebuild, the chain verifies, the projection's own invariants hold."""
    problems = [f"3: {p}" for p in store.journal.check()]
    before = projection_snapshot(store.journal.conn)
    maint = Maintenance(store)
    try:
        maint.verify()
    except Exception as e:  # the message names the seq
        problems.append(f"3: journal verify: {e}")
    maint.rebuild()
    after = projection_snapshot(store.journal.conn)
    for table in before:
        if before[table] != after[table]:
            problems.append(f"3: table {table} differs from a rebuild: {before[table]} != {after[table]}")
    return problems


def check_second_recovery(store) -> list[str]:
    """Invariant 4: recovering again does and journals nothing."""
    seq = store.journal.last_seq()
    report = recover(store)
    problems = []
    if store.journal.last_seq() != seq:
        problems.append(f"4: a second recover journaled {store.journal.last_seq() - seq} events")
    if report["actions"]:
        problems.append(f"4: a second recover acted: {report['actions']}")
    return problems


def check_gc(store) -> list[str]:
    """Invariant 5: a full gc removes exactly the unreferenced objects and stale temp files."""
    referenced = referenced_objects(store)
    before = disk_objects(store)
    Maintenance(store).gc(full=True)
    after = disk_objects(store)
    problems = []
    if referenced - after:
        problems.append(f"5: referenced objects missing after gc: {sorted(referenced - after)}")
    if after - referenced:
        problems.append(f"5: unreferenced objects survived gc --full: {sorted(after - referenced)}")
    if (before - after) & referenced:
        problems.append("5: gc removed referenced objects")
    stale = [t.path for t in ObjectStore(store.objects_dir).iter_temp_files() if t.stale]
    if stale:
        problems.append(f"5: stale temporary files left: {stale}")
    if any(store.trash_dir.iterdir()):
        problems.append("5: trash not empty after gc")
    return problems


def check_store(root: Path, recovered: dict | None = None, gc: bool = True) -> list[str]:
    """Invariants 1-5 on a store a recovery has just run on; returns what is violated.

    ``recovered`` is that recovery's report: a problem it lists is a failure
    too, since a crash alone must never leave anything to report. Without
    ``gc`` invariant 5 is skipped (a full gc also removes the garbage the
    next incremental gc would have had to find).
    """
    problems = [f"recover reported: {p}" for p in (recovered or {}).get("problems", [])]
    store = Store.open(root)
    try:
        for check in (check_committed_images, check_uncommitted, check_projection, check_second_recovery):
            problems += check(store)
        if gc:
            problems += check_gc(store)
            problems += [f"after gc: {p}" for p in check_committed_images(store)]
    finally:
        store.close()
    return problems


def populate(root: Path, trees: dict[str, Path], stray_tree: Path) -> str:
    """Give a new store at ``root`` some history; return an open transaction's id.

    Images ``img-a``..``img-d`` and ``img-x`` from ``trees``; ``img-a`` then
    ``img-b`` deployed (so both slots are set); ``img-d`` deleted (its objects
    are garbage); a create of ``stray_tree`` killed after writing its objects
    (strays) and recovered. The open transaction replaces ``img-c`` by an
    image of ``trees["r"]``, creates ``img-e`` and deploys it.
    """
    for n in "abcdx":
        run_cli(root, "image", "create", str(trees[n]), f"img-{n}", "--backend", "python")
    run_cli(root, "deploy", "img-a")
    run_cli(root, "deploy", "img-b")
    run_cli(root, "image", "delete", "img-d")
    kill_at(root, "create.after-objects", 1, "image", "create", str(stray_tree), "img-g", "--backend", "python")
    run_cli(root, "recover")
    tx = run_cli(root, "tx", "begin").stdout.strip()
    run_cli(root, "image", "delete", "img-c", "--tx", tx)
    run_cli(root, "image", "create", str(trees["r"]), "img-c", "--tx", tx, "--backend", "python")
    run_cli(root, "image", "create", str(trees["e"]), "img-e", "--tx", tx, "--backend", "python")
    run_cli(root, "deploy", "img-e", "--tx", tx)
    return tx
