#!/usr/bin/env python3
"""Time gc, journal rebuild and journal verify on a large store.

Builds a store of ``--images`` images (default 110) over ``--objects`` tiny
objects (default 200,000). Image i owns a block of objects and shares the
first quarter of the next image's block, so deleting one image frees most of
its block and keeps the part the previous image still uses. Then appends
deploy/rollback pairs until the journal holds ``--events`` events (default
100,000), and times, in process through the Store API:

- incremental ``gc`` after deleting one image (cost should follow the
  garbage, not the store; goal < 1 s), and the same as an ``apt-layer gc``
  process (start-up included);
- ``gc --full``, walking every object file (goal < 10 s);
- ``journal rebuild`` over every event (goal < 5 s for 100,000 events),
  the replay and the invariant check the command runs after it apart;
- ``journal verify`` (the whole hash chain and every manifest).

Set-up takes short cuts that change none of what is timed: the objects are
written into the digest store directly (named by their fs-verity digest,
as the store names them, but without an fsync each, which would make set-up
take minutes), images are created from composefs dumps that reference them
(``image create --from-file``: the same events, manifests and refcounts as
from a tree), and the deploy/rollback events are appended through the
journal in large SQLite transactions. One image is created from a real tree
of tiny files, the ordinary way, so that path is in the store too.

Example:
    python3 tools/bench_store.py
    python3 tools/bench_store.py --objects 400000 --images 200 --root /var/tmp/bench --keep
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from aptlayer import inventory
from aptlayer.composefs import fsverity  # noqa: E402
from aptlayer.maintenance import Maintenance  # noqa: E402
from aptlayer.store import CreateOptions, Store  # noqa: E402

DUMP = CreateOptions(from_file=True, backend="python")


def content(i: int) -> bytes:
    """Object i: over 64 bytes, so a file of it is stored as an object, not inline."""
    return f"object {i:08d}\n".encode() * 6


def write_objects(store: Store, count: int) -> list[str]:
    """The objects, written as the digest store names them; their paths (xx/yyyy...)."""
    paths = []
    made: set[str] = set()
    for i in range(count):
        data = content(i)
        path = fsverity.object_path(fsverity.digest_bytes(data))
        fan = path[:2]
        if fan not in made:
            (store.objects_dir / fan).mkdir(exist_ok=True)
            made.add(fan)
        with open(store.objects_dir / path, "wb") as f:
            f.write(data)
        paths.append(path)
    return paths


def dump_of(objects: list[str], first: int, last: int) -> bytes:
    """A composefs dump: a root and one regular file per object in [first, last)."""
    lines = [b"/ 0 40755 2 0 0 0 0.0 - - -"]
    for i in range(first, last):
        size = len(content(i))
        path = objects[i]
        lines.append(f"/f{i:08d} {size} 100644 1 0 0 0 0.0 {path} - {path.replace('/', '')}".encode())
    return b"\n".join(lines) + b"\n"


def create_images(store: Store, objects: list[str], images: int, scratch: Path) -> int:
    """Image i holds its block and the first quarter of the next one; returns the block size."""
    block = len(objects) // images
    for i in range(images):
        last = min(len(objects), (i + 1) * block + block // 4)
        dump = scratch / "image.dump"
        dump.write_bytes(dump_of(objects, i * block, last))
        store.create(str(dump), f"img{i:04d}", DUMP)
    return block


def create_from_tree(store: Store, scratch: Path, files: int) -> None:
    tree = scratch / "tree"
    for i in range(files):
        path = tree / f"d{i % 16}" / f"f{i}"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(f"tree file {i}\n".encode() * 8)
    store.create(str(tree), "from-tree", CreateOptions(backend="python"))


def append_events(store: Store, target: int, batch: int = 6000) -> None:
    """deploy/rollback pairs (3 events each: begun, the event, committed) up to ``target``."""
    a, b = (inventory.image_info(store, n)["digest"] for n in ("img0000", "img0001"))
    first = {"image": "img0000", "digest": a}
    second = {"image": "img0001", "digest": b}
    store.deploy("img0000")
    store.deploy("img0001")
    n = 0
    while store.journal.last_seq() < target:
        with store.journal.transaction() as w:
            for _ in range(batch // 6):
                current, previous = (first, second) if n % 2 else (second, first)
                tx = f"bench{n:08d}"
                w.append("tx.begun", tx, {"explicit": False, "op": "rollback"}, tx)
                w.append("rolled-back", previous["image"], {"current": previous, "previous": current}, tx)
                w.append("tx.committed", tx, {"ops": 1}, tx)
                n += 1
    store.links.sync()


def timed(fn: Callable[[], object]) -> tuple[float, object]:
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def cli_gc(root: Path) -> float:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "aptlayer", "--root", str(root), "-q", "gc"], check=True,
                   capture_output=True, env=env)
    return time.perf_counter() - start


def report(rows: list[tuple[str, float, str, float | None]]) -> None:
    print(f"{'operation':44} {'time':>9}  {'goal':>7}  result")
    for name, seconds, detail, goal in rows:
        verdict = "" if goal is None else ("ok" if seconds < goal else "SLOW")
        goal_text = "-" if goal is None else f"< {goal:g} s"
        print(f"{name:44} {seconds:8.3f}s  {goal_text:>7}  {verdict:4} {detail}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--objects", type=int, default=200_000)
    parser.add_argument("--images", type=int, default=110)
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--tree-files", type=int, default=1000, help="files of the one image built from a tree")
    parser.add_argument("--root", type=Path, help="store root (default: a temporary directory under /var/tmp)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary store afterwards")
    args = parser.parse_args()

    scratch = Path(tempfile.mkdtemp(prefix="bench-store-", dir="/var/tmp"))
    root = args.root or scratch / "store"
    store = Store.open(root)
    try:
        t0 = time.perf_counter()
        objects = write_objects(store, args.objects)
        block = create_images(store, objects, args.images, scratch)
        create_from_tree(store, scratch, args.tree_files)
        append_events(store, args.events)
        setup = time.perf_counter() - t0
        m = Maintenance(store)
        on_disk = sum(1 for _ in store.objects_dir.glob("??/*"))
        print(f"store {root}: {len(inventory.images(store))} images, {on_disk} objects, "
              f"{store.journal.last_seq()} events (set-up {setup:.1f} s)\n")

        rows = []
        victim = f"img{args.images // 2:04d}"
        store.delete(victim)
        seconds, gc = timed(m.gc)
        rows.append((f"gc after deleting {victim}", seconds,
                     f"removed {gc['removed']} of {on_disk} objects (block {block})", 1.0))
        store.delete(f"img{args.images // 2 + 2:04d}")
        rows.append(("apt-layer gc (process) after one delete", cli_gc(root), "start-up included", None))
        seconds, gc = timed(lambda: m.gc(full=True))
        rows.append(("gc --full", seconds, f"walked {gc['marked'] + gc['candidates']} objects, "
                                           f"removed {gc['removed']}", 10.0))
        events = store.journal.last_seq()
        seconds, replayed = timed(store.journal.rebuild)
        rows.append((f"journal rebuild: replay of {events} events", seconds, f"{replayed} events replayed", 5.0))
        seconds, problems = timed(store.journal.check)
        rows.append(("journal rebuild: invariant check", seconds, f"{len(problems)} problems", None))
        seconds, verified = timed(m.verify)
        rows.append(("journal verify", seconds, f"{verified} events, {len(inventory.images(store))} manifests", None))
        report(rows)
    finally:
        store.close()
        if not args.keep:
            shutil.rmtree(scratch, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
