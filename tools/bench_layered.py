#!/usr/bin/env python3
"""Time a layered build (base image + upper directory) against mkcomposefs of the merged view.

Makes a store with a base image of ``--files`` regular files (a third of
them 64 bytes or less, the rest 1-16 KiB) in ``--files / 20`` directories,
mounts it writable, changes it through the mount (``--changes`` new files,
as many rewritten, chmod-ed and removed ones, one directory renamed),
unmounts, then times, ``-n`` times each:

* the layered build (``LayeredSource``: read the base image, read the upper
  directory, hash its new files, render);
* apt-layer's mkcomposefs (``build.make_image``) of the merged view, mounted
  read-only, with the store as digest store;
* upstream ``mkcomposefs --digest-store`` of the same view, when installed.

Every run must give the same digest. Needs root (mounts).

Example:
    sudo APT_LAYER_COMPOSEFS_BIN=/opt/composefs-1.0.8/bin python3 tools/bench_layered.py --files 4000
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from aptlayer import mounts  # noqa: E402
from aptlayer.builder import CreateOptions, LayeredSource  # noqa: E402
from aptlayer.composefs import build, fsverity, reader, upper  # noqa: E402
from aptlayer.composefs.upstream import find_tool  # noqa: E402
from aptlayer.store import Store  # noqa: E402

PY = CreateOptions(backend="python")


def make_base(root: Path, files: int, rng: random.Random) -> None:
    dirs = [root / f"usr/share/d{i // 10}/p{i}" for i in range(max(1, files // 20))]
    for d in dirs:
        d.mkdir(parents=True)
    for i in range(files):
        size = rng.randint(1, 64) if i % 3 == 0 else rng.randint(1024, 16384)
        (dirs[i % len(dirs)] / f"f{i}").write_bytes(rng.randbytes(size))


def change(mnt: Path, changes: int, rng: random.Random) -> None:
    files = sorted(p for p in (mnt / "usr/share").rglob("*") if p.is_file())
    picked = rng.sample(files, 3 * changes)
    (mnt / "opt/new").mkdir(parents=True)
    for i in range(changes):
        (mnt / f"opt/new/n{i}").write_bytes(rng.randbytes(rng.randint(1024, 16384)))
        picked[i].write_bytes(rng.randbytes(2000))
        os.chmod(picked[changes + i], 0o600)
        os.unlink(picked[2 * changes + i])
    os.rename(mnt / "usr/share/d0", mnt / "usr/share/d0-renamed")


def timed(runs: int, run: Callable[[int], str]) -> tuple[list[float], set[str]]:
    times, digests = [], set()
    for i in range(runs):
        start = time.perf_counter()
        digests.add(run(i))
        times.append(time.perf_counter() - start)
    return times, digests


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=4000)
    parser.add_argument("--changes", type=int, default=20)
    parser.add_argument("-n", type=int, default=5, help="runs of each")
    args = parser.parse_args()
    rng = random.Random(1)
    with tempfile.TemporaryDirectory(prefix="bench-layered-") as tmp_name:
        tmp = Path(tmp_name)
        make_base(tmp / "src", args.files, rng)
        store = Store.open(tmp / "store")
        store.create(str(tmp / "src"), "base", PY)
        base_image = store.image_file("base")
        up, work, mnt = tmp / "upper", tmp / "work", tmp / "mnt"
        for d in (up, work, mnt):
            d.mkdir()
        upper.prepare_upper(up, reader.read_image(base_image))
        mounts.mount(store, "base", str(mnt), upperdir=str(up), workdir=str(work))
        try:
            change(mnt, args.changes, rng)
        finally:
            mounts.unmount(store, str(mnt))
        entries = sum(1 for _ in reader.read_image(base_image).walk())
        print(f"base: {entries} entries, {base_image.stat().st_size} bytes of image; "
              f"upper: {sum(1 for _ in up.rglob('*'))} entries")

        def layered(i: int) -> str:
            out = store.builder.build(LayeredSource(str(base_image), str(up)), tmp / f"layered{i}.cfs", PY)
            if i == 0:
                print(f"layered build read {out.stats.files} files ({out.stats.bytes} bytes), "
                      f"{out.changed} changes, {out.objects} objects")
            return out.digest

        results = {"layered build": timed(args.n, layered)}
        mounts.mount(store, "base", str(mnt), upperdir=str(up), workdir=str(work), readonly=True)
        try:
            objects = str(store.layout.objects)

            def python_mkcomposefs(i: int) -> str:
                return build.make_image(str(mnt), digest_store=objects, threads=os.cpu_count() or 1).digest.hex()

            results["apt-layer mkcomposefs of the merged view"] = timed(args.n, python_mkcomposefs)
            tool = find_tool("mkcomposefs")
            if tool is not None:
                def upstream_mkcomposefs(i: int) -> str:
                    out = tmp / f"upstream{i}.cfs"
                    subprocess.run([tool, f"--digest-store={objects}", str(mnt), str(out)], check=True)
                    return fsverity.digest_bytes(out.read_bytes()).hex()

                results["upstream mkcomposefs of the merged view"] = timed(args.n, upstream_mkcomposefs)
        finally:
            mounts.unmount(store, str(mnt))
        store.close()
    digests = set().union(*(d for _, d in results.values()))
    for name, (times, _) in results.items():
        print(f"{name:42s} first {times[0] * 1000:8.1f} ms   median {statistics.median(times) * 1000:8.1f} ms")
    print("same digest everywhere:", len(digests) == 1)
    if len(digests) != 1:
        sys.exit(1)


if __name__ == "__main__":
    main()
