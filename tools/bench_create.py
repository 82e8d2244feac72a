#!/usr/bin/env python3
"""Image creation and reading: apt-layer against upstream composefs, same run.

Generates a source tree, then times, each best of --repeat runs, apt-layer
against the upstream tools when they are installed (APT_LAYER_COMPOSEFS_BIN
or PATH).  Two trees:

  --tree synthetic  (default) 24,000 entries, about 376 MB: many small
                    files, some large ones, duplicates, symlinks, nested dirs
                    (16 KB per entry, much less than a real root file system)
  --tree rootfs     CentOS Stream 9 minimal as upstream's test dump lists it:
                    22,010 entries, 868 MB, its real paths, sizes, modes and
                    duplicates, with synthesized content (tools/rootfs_tree.py)

The rows:

  cold create     composefs mkcomposefs --digest-store=EMPTY tree img
  warm create     the same into the store the cold run filled
  dump            composefs info dump img
  store cold      apt-layer --root R image create --backend python tree NAME,
                  R empty (upstream: mkcomposefs --digest-store=EMPTY)
  store warm      the same into the full store under a new name, caches
                  removed first (upstream: mkcomposefs into its full store)
  store unchanged the same tree again, unchanged since the last image: an
                  lstat walk (on two cores) recognises it, and the live image
                  is hard-linked as the new one
  store 1% chg    1% of the files rewritten with new content before each run
                  (upstream: mkcomposefs of the same changed tree); any file,
                  so some had content another file shares: the image layout
                  moves, and apt-layer renders it all again
  store 1% uniq   the same, picking among files whose content no other file
                  has (a package upgrade, mostly): the last image is patched

and prints a table with ratios (apt-layer / upstream).  The images must be
identical: compat cold, store cold and the 1%-changed trees' images are
compared with upstream's.  Goals: cold <= 1.25x, warm <= 1.0x, dump <= 3x,
unchanged <= 0.3x, 1% changed <= 0.35x (both rows).

Usage: tools/bench_create.py [--tree synthetic|rootfs] [--entries N] [--mbytes N] [--repeat N]
                             [--workdir DIR]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from aptlayer.composefs.upstream import find_tool  # noqa: E402


def make_tree(root: Path, entries: int, mbytes: int, seed: int = 1) -> tuple[int, int]:
    """A deterministic tree: returns (entries, bytes)."""
    rng = random.Random(seed)
    dirs = [root]
    root.mkdir(parents=True)
    n_dirs = entries // 12
    for i in range(n_dirs):
        d = rng.choice(dirs) / f"d{i:05d}"
        d.mkdir()
        dirs.append(d)
    n_links = entries // 25
    n_files = entries - n_dirs - n_links
    large = max(1, n_files // 400)
    budget = mbytes * 1_000_000
    small_total = 0
    sizes = []
    for i in range(n_files - large):
        r = rng.random()
        size = rng.randint(0, 64) if r < 0.25 else rng.randint(65, 8192) if r < 0.85 else rng.randint(8193, 200_000)
        sizes.append(size)
        small_total += size
    per_large = max(1, (budget - small_total) // large)
    sizes += [per_large] * large
    pool = [rng.randbytes(4096) for _ in range(64)]
    written = 0
    files = []
    for i, size in enumerate(sizes):
        path = rng.choice(dirs) / f"f{i:06d}.dat"
        if i % 50 == 1 and files:  # a duplicate of an earlier file: dedupe
            shutil.copyfile(files[-1], path)
            written += files[-1].stat().st_size
        else:
            block = pool[i % len(pool)]
            with open(path, "wb") as f:
                head = hashlib.sha256(str(i).encode()).digest()
                f.write(head[: min(size, 32)])
                left = size - min(size, 32)
                while left > 0:
                    chunk = block[: min(left, 4096)]
                    f.write(chunk)
                    left -= len(chunk)
            written += size
        files.append(path)
    for i in range(n_links):
        link = rng.choice(dirs) / f"l{i:05d}"
        os.symlink(os.path.relpath(rng.choice(files), link.parent), link)
    return n_dirs + n_files + n_links + 1, written


def change_files(root: Path, fraction: float, seed: int, unique: bool = False) -> int:
    """Rewrite ``fraction`` of the regular files with new content of the same size; returns how many.

    With ``unique``, only files whose content no other file has are picked.
    """
    rng = random.Random(seed)
    files = sorted(p for p in root.rglob("*") if p.is_file() and not p.is_symlink())
    candidates = files
    if unique:
        by_content: dict[bytes, list[Path]] = {}
        for path in files:
            by_content.setdefault(hashlib.sha256(path.read_bytes()).digest(), []).append(path)
        candidates = sorted(group[0] for group in by_content.values() if len(group) == 1)
    picked = rng.sample(candidates, max(1, round(len(files) * fraction)))
    for path in picked:
        path.write_bytes(rng.randbytes(path.stat().st_size))
    return len(picked)


def timed(cmd: list[str]) -> float:
    t = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t


def best(cmd: list[str], repeat: int, before=None) -> float:
    times = []
    for _ in range(repeat):
        if before:
            before()
        times.append(timed(cmd))
    return min(times)


def compat_rows(w: Path, tools: list, repeat: int) -> tuple[dict, bool | None]:
    """cold/warm create and dump through ``apt-layer composefs``; whether the images are identical."""
    results: dict[str, dict[str, float]] = {}
    for label, make, read in tools:
        store, img = w / f"store-{label}", w / f"{label}.cfs"

        def empty_store() -> None:
            shutil.rmtree(store, ignore_errors=True)
            os.sync()  # the next run should not pay for writing back these removals

        cmd = make + [f"--digest-store={store}", str(w / "tree"), str(img)]
        results[label] = {"cold create": best(cmd, repeat, empty_store)}
        subprocess.run(cmd, check=True)
        results[label]["warm create"] = best(cmd, repeat)
        results[label]["dump"] = best(read + ["dump", str(img)], repeat)
    same = None
    if len(tools) == 2:
        same = (w / "apt-layer.cfs").read_bytes() == (w / "upstream.cfs").read_bytes()
    return results, same


def store_rows(w: Path, mk: str | None, repeat: int) -> tuple[dict, dict[str, bool]]:
    """``apt-layer image create`` through the Store, each row against mkcomposefs in the same state."""
    root, tree = w / "R", str(w / "tree")
    up_store = w / "store-up-R"
    made: list[str] = []

    def ours() -> float:
        made.append(f"img{len(made)}")
        return timed([sys.executable, "-m", "aptlayer", "--root", str(root), "-q", "image", "create",
                      "--backend", "python", tree, made[-1]])

    def upstream(img: str) -> float | None:
        return timed([mk, f"--digest-store={up_store}", tree, str(w / img)]) if mk else None

    def row(before) -> tuple[float, float | None]:
        a, u = [], []
        for _ in range(repeat):
            before()
            a.append(ours())
            u.append(upstream("up-R.cfs"))
        return min(a), (min(u) if mk else None)

    def same_as_upstream() -> bool:
        """Whether the last image made equals upstream's last, made from the same tree."""
        return (root / "images" / f"{made[-1]}.composefs").read_bytes() == (w / "up-R.cfs").read_bytes()

    def empty() -> None:
        shutil.rmtree(root, ignore_errors=True)
        shutil.rmtree(up_store, ignore_errors=True)
        os.sync()

    def no_cache() -> None:
        shutil.rmtree(root / "cache", ignore_errors=True)

    results, same = {}, {}
    results["store cold"] = row(empty)
    if mk:
        same["store cold"] = same_as_upstream()
    results["store warm"] = row(no_cache)
    ours()  # fills the cache again
    results["store unchanged"] = row(lambda: None)
    seeds = iter(range(100, 200))
    results["store 1% changed"] = row(lambda: change_files(w / "tree", 0.01, next(seeds)))
    if mk:
        same["store 1% changed"] = same_as_upstream()
    results["store 1% unique"] = row(lambda: change_files(w / "tree", 0.01, next(seeds), unique=True))
    if mk:
        same["store 1% unique"] = same_as_upstream()
    return results, same


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tree", choices=["synthetic", "rootfs"], default="synthetic")
    ap.add_argument("--dump", type=Path, default=REPO.parent / "shared" / "upstream-tests" / "cs9-x86_64-minimal.dump.gz",
                    help="the dump --tree rootfs recreates")
    ap.add_argument("--entries", type=int, default=24_000)
    ap.add_argument("--mbytes", type=int, default=300)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--workdir", type=Path)
    args = ap.parse_args()
    ours = [sys.executable, "-m", "aptlayer", "composefs"]
    os.environ["PYTHONPATH"] = str(REPO)
    # Time apt-layer as installed: with its bytecode compiled.
    os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(REPO / "aptlayer")], check=True)
    mk, info = find_tool("mkcomposefs"), find_tool("composefs-info")
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        w = Path(tmp)
        t = time.perf_counter()
        if args.tree == "rootfs":
            from rootfs_tree import build_rootfs_tree

            built = build_rootfs_tree(args.dump, w / "tree")
            entries, size = built.entries, built.file_bytes
        else:
            entries, size = make_tree(w / "tree", args.entries, args.mbytes)
        print(f"tree: {entries} entries, {size / 1e6:.0f} MB (made in {time.perf_counter() - t:.1f} s)")
        tools = [("apt-layer", ours + ["mkcomposefs"], ours + ["info"])]
        if mk and info:
            tools.append(("upstream", [mk], [info]))
        results, same = compat_rows(w, tools, args.repeat)
        time.sleep(2)  # the digest cache does not keep files changed within 2 s (digestcache.SETTLE_NS)
        rows, identical = store_rows(w, mk if info else None, args.repeat)
    goals = {"cold create": 1.25, "warm create": 1.0, "dump": 3.0, "store cold": 1.25,
             "store warm": 1.0, "store unchanged": 0.3, "store 1% changed": 0.35,
             "store 1% unique": 0.35}
    print(f"{'operation':17} {'apt-layer s':>12} {'upstream s':>11} {'ratio':>7} {'goal':>6}")
    for op, goal in goals.items():
        a, u = rows[op] if op in rows else (results["apt-layer"][op], results.get("upstream", {}).get(op))
        ratio = f"{a / u:6.2f}x" if u else "   n/a"
        print(f"{op:17} {a:12.2f} {u if u else float('nan'):11.2f} {ratio:>7} {goal:5.2f}x")
    if same is not None:
        print(f"identical image bytes (compat): {'yes' if same else 'NO'}")
        for op, ok in identical.items():
            print(f"identical image bytes ({op}): {'yes' if ok else 'NO'}")
    else:
        print("upstream tools not found: no ratios (build them with tools/build-upstream-composefs.sh)")


if __name__ == "__main__":
    main()
