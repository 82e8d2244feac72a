#!/usr/bin/env python3
"""Benchmark of the journal: build a large history, time rebuild, verify, catch-up.

Prints wall and CPU time per measure (CPU time is what a busy machine does not inflate).

The history: ``--images`` images of ``--objects`` objects each, drawn from a
shared pool (so images share objects), then a mix of deploys, rollbacks,
mounts, unmounts, explicit transactions committed or aborted, image churn,
gc cycles and recovery notes until ``--events`` events exist (a step may add a few more). The build
batches many events per SQLite transaction; single-event appends (one fsync
each, as the CLI does) are timed separately.

Usage: tools/bench_journal.py [--events 100000] [--images 120] [--objects 2000] [--keep DIR]
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from aptlayer.journal import Journal, Writer  # noqa: E402


class History:
    """Drives a valid random history through a Writer, tracking just enough state."""

    def __init__(self, rng: random.Random, objects: int, pool: int):
        self.rng = rng
        self.objects = objects
        self.pool = pool
        self.live: dict[str, str] = {}
        self.digests = 0
        self.tx = 0
        self.mounts: dict[str, str] = {}
        self.slots: dict[str, dict] = {}

    def _tx(self, w: Writer) -> str:
        self.tx += 1
        tx = f"tx{self.tx}"
        w.append("tx.begun", tx, {"explicit": False}, tx)
        return tx

    def create(self, w: Writer) -> None:
        self.digests += 1
        name, digest = f"image-{self.digests}", f"{self.digests:064x}"
        manifest = [(f"{o:064x}", 1 + o % 4096) for o in self.rng.sample(range(self.pool), self.objects)]
        tx = self._tx(w)
        w.append("image.created", name, {"digest": digest, "size": 65536}, tx, manifest=manifest)
        w.append("tx.committed", tx, {}, tx)
        self.live[name] = digest

    def deploy(self, w: Writer) -> None:
        name = self.rng.choice(sorted(self.live))
        current = {"image": name, "digest": self.live[name]}
        tx = self._tx(w)
        w.append("deployed", name, {"current": current, "previous": self.slots.get("current")}, tx)
        w.append("tx.committed", tx, {}, tx)
        self.slots = {"current": current} | ({"previous": self.slots["current"]} if "current" in self.slots else {})

    def rollback(self, w: Writer) -> None:
        if "previous" not in self.slots:
            return self.deploy(w)
        tx = self._tx(w)
        swapped = {"current": self.slots["previous"], "previous": self.slots["current"]}
        w.append("rolled-back", swapped["current"]["image"], swapped, tx)
        w.append("tx.committed", tx, {}, tx)
        self.slots = swapped

    def mount(self, w: Writer) -> None:
        mountpoint = f"/run/bench/{self.rng.randrange(8)}"
        if mountpoint in self.mounts:
            w.append("unmounted", self.mounts.pop(mountpoint), {"mountpoint": mountpoint}, f"m{self.tx}")
            return
        name = self.rng.choice(sorted(self.live))
        data = {"mountpoint": mountpoint, "digest": self.live[name], "boot_id": "bench"}
        w.append("mounted", name, data, f"m{self.tx}")
        self.mounts[mountpoint] = name

    def explicit(self, w: Writer) -> None:
        self.tx += 1
        tx = f"tx{self.tx}"
        w.append("tx.begun", tx, {"explicit": True}, tx)
        name = self.rng.choice(sorted(self.live))
        w.append("deploy.staged", name, {"digest": self.live[name]}, tx)
        if self.rng.random() < 0.5:
            w.append("tx.aborted", tx, {"reason": "rollback"}, tx)
            return
        events = w.commit_tx(tx)
        self.slots = {"current": events[0].data["current"]} | (
            {"previous": events[0].data["previous"]} if events[0].data["previous"] else {})

    def churn(self, w: Writer) -> None:
        """Delete an image nobody deploys or mounts, create a new one, sometimes collect."""
        busy = {s["image"] for s in self.slots.values()} | set(self.mounts.values())
        idle = sorted(set(self.live) - busy)
        if idle:
            name = self.rng.choice(idle)
            tx = self._tx(w)
            w.append("image.deleted", name, {"digest": self.live.pop(name)}, tx)
            w.append("tx.committed", tx, {}, tx)
        self.create(w)
        if self.rng.random() < 0.3:
            w.append("gc.begun", "store", {"full": False}, f"gc{self.tx}")
            w.append("gc.swept", "store", {"objects": 0, "bytes": 0}, f"gc{self.tx}")

    def note(self, w: Writer) -> None:
        w.append("recover.checked", "store", {"mounts": len(self.mounts)}, f"r{self.tx}")


def build(path: Path, events: int, images: int, objects: int, seed: int) -> None:
    rng = random.Random(seed)
    h = History(rng, objects, pool=images * objects // 2)
    steps = [(h.deploy, 30), (h.rollback, 5), (h.mount, 30), (h.explicit, 10), (h.note, 24), (h.churn, 0.1)]
    actions, weights = zip(*steps)
    with Journal.open(path) as j:
        with j.transaction() as w:
            for _ in range(images):
                h.create(w)
        while j.last_seq() < events:
            with j.transaction() as w:
                for _ in range(500):
                    if j.last_seq() >= events:
                        break
                    rng.choices(actions, weights)[0](w)


def timed(fn) -> tuple[float, object]:
    """Wall time of ``fn()`` and its result; the CPU time goes to ``cpu_times`` (the machine may be busy)."""
    start, cpu = time.perf_counter(), time.process_time()
    result = fn()
    cpu_times.append(time.process_time() - cpu)
    return time.perf_counter() - start, result


cpu_times: list[float] = []


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--images", type=int, default=120)
    parser.add_argument("--objects", type=int, default=2000, help="objects per image")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--keep", type=Path, help="build the journal in this folder and keep it")
    args = parser.parse_args()

    folder = args.keep or Path(tempfile.mkdtemp(prefix="bench-journal-"))
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "journal.db"
    if path.exists():
        for suffix in ("", "-wal", "-shm"):
            Path(f"{path}{suffix}").unlink(missing_ok=True)
    rows: list[tuple[str, str, str]] = []
    try:
        t, _ = timed(lambda: build(path, args.events, args.images, args.objects, args.seed))
        rows.append(("build (batched appends)", f"{t:.2f} s", f"{cpu_times[-1]:.2f} s"))
        t, j = timed(lambda: Journal.open(path))
        rows.append(("open existing journal", f"{t * 1000:.1f} ms", f"{cpu_times[-1] * 1000:.1f} ms"))
        conn = j.conn
        n_events = j.last_seq()
        n_manifests, n_rows = conn.execute("SELECT count(*), sum(objects) FROM images_manifest").fetchone()
        n_live = conn.execute("SELECT count(*) FROM images").fetchone()[0]
        n_refs = conn.execute("SELECT count(*) FROM object_refs").fetchone()[0]
        t, _ = timed(lambda: [j.append("recover.bench", "store", {"i": i}, "bench") for i in range(200)])
        rows.append(("append, 1 event per commit (fsync)", f"{t / 200 * 1000:.2f} ms/event",
                     f"{cpu_times[-1] / 200 * 1000:.2f} ms/event"))
        t, n = timed(j.rebuild)
        rows.append((f"rebuild ({n} events)", f"{t:.2f} s", f"{cpu_times[-1]:.2f} s"))
        t, n = timed(j.verify)
        rows.append((f"verify ({n} events, {n_manifests} manifests)", f"{t:.2f} s", f"{cpu_times[-1]:.2f} s"))
        samples = []
        for _ in range(50):
            dt, n = timed(j.catch_up)
            assert n == 0
            samples.append(dt)
        cpu = sorted(cpu_times[-50:])[25]
        rows.append(("catch_up, nothing to do (median of 50)", f"{sorted(samples)[25] * 1000:.3f} ms", f"{cpu * 1000:.3f} ms"))
        t, problems = timed(j.check)
        assert problems == [], problems
        rows.append(("check_invariants", f"{t:.2f} s", f"{cpu_times[-1]:.2f} s"))
        j.close()
        size = sum(os.path.getsize(p) for p in folder.glob("journal.db*"))
    finally:
        if args.keep is None:
            shutil.rmtree(folder)

    print(f"journal: {n_events} events, {n_manifests} manifests with {n_rows} object rows, "
          f"{n_live} live images, {n_refs} refcount rows, {size / 2**20:.0f} MiB")
    width = max(len(r[0]) for r in rows)
    print(f"{'measure':<{width}}  {'wall':>16}  {'cpu':>16}")
    print(f"{'-' * width}  {'-' * 16}  {'-' * 16}")
    for name, wall, cpu in rows:
        print(f"{name:<{width}}  {wall:>16}  {cpu:>16}")


if __name__ == "__main__":
    main()
