#!/usr/bin/env python3
"""Time composefs mount + unmount cycles: native (each fallback path) vs mount.composefs.

Builds an image from an upstream rootfs dump (default: the CentOS Stream 9
minimal dump, about 22,000 entries) with upstream ``mkcomposefs --from-file``,
or takes ``--image``.  Each cycle mounts the image on a scratch directory,
stats its root, and unmounts it.  Native cycles run in this process, the way
apt-layer mounts; ``mount.composefs`` cycles include its fork and exec, since
that is what using it costs.  Needs root.

Example:
    sudo APT_LAYER_COMPOSEFS_BIN=/opt/composefs-1.0.8/bin python3 tools/bench_mount.py -n 200
"""

from __future__ import annotations

import argparse
import gzip
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from aptlayer.composefs import mount as cfsmount  # noqa: E402
from aptlayer.composefs.upstream import find_tool  # noqa: E402

SHARED = Path(os.environ.get("APT_LAYER_SHARED", Path(__file__).resolve().parents[2] / "shared"))
DEFAULT_DUMP = SHARED / "upstream-tests" / "cs9-x86_64-minimal.dump.gz"

#: native plans worth timing: what this kernel takes, and each fallback forced
PLANS = {
    "native (fd lower)": cfsmount._Plan(),
    "native, temp dir": cfsmount._Plan(lower="tmpdir"),
    "native, loop device": cfsmount._Plan(backing="loop"),
    "native, legacy mount(2)": cfsmount._Plan(lower="tmpdir", api="legacy"),
}


def build_image(dump: Path, out: Path) -> Path:
    """``mkcomposefs --from-file`` of a (possibly gzipped) dump."""
    mkcomposefs = find_tool("mkcomposefs")
    if mkcomposefs is None:
        sys.exit("mkcomposefs not found: set APT_LAYER_COMPOSEFS_BIN or pass --image")
    text = gzip.decompress(dump.read_bytes()) if dump.suffix == ".gz" else dump.read_bytes()
    image = out / "bench.cfs"
    subprocess.run([mkcomposefs, "--from-file", "-", str(image)], input=text, check=True)
    return image


def count_entries(dump: Path) -> int:
    text = gzip.decompress(dump.read_bytes()) if dump.suffix == ".gz" else dump.read_bytes()
    return text.count(b"\n")


def time_cycles(n: int, cycle: Callable[[], None]) -> list[float]:
    """Seconds of each of ``n`` cycles, after one untimed warm-up cycle."""
    cycle()
    times = []
    for _ in range(n):
        start = time.perf_counter()
        cycle()
        times.append(time.perf_counter() - start)
    return times


def native_cycle(image: Path, target: Path, basedir: Path, plan: cfsmount._Plan) -> Callable[[], None]:
    req = cfsmount._request(image, target, [basedir], None, "off", None, None, None, False, False)

    def cycle() -> None:
        cfsmount._mount(req, plan)
        os.stat(target)
        cfsmount.unmount(target)

    return cycle


def upstream_cycle(tool: str, image: Path, target: Path, basedir: Path) -> Callable[[], None]:
    def cycle() -> None:
        subprocess.run([tool, str(image), str(target), "-o", f"basedir={basedir}"], check=True)
        os.stat(target)
        cfsmount.unmount(target)

    return cycle


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", "--cycles", type=int, default=100, help="timed cycles per method (default 100)")
    parser.add_argument("--dump", type=Path, default=DEFAULT_DUMP, help="dump to build the image from")
    parser.add_argument("--image", type=Path, help="use this image instead of building one")
    parser.add_argument("--basedir", type=Path, help="object directory (default: an empty one)")
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench_mount.py needs root")

    with tempfile.TemporaryDirectory(prefix="bench-mount.") as scratch:
        out = Path(scratch)
        image = args.image or build_image(args.dump, out)
        basedir = args.basedir or out / "objects"
        basedir.mkdir(exist_ok=True)
        target = out / "mnt"
        target.mkdir()
        entries = "" if args.image else f", {count_entries(args.dump)} entries"
        print(f"image {image} ({image.stat().st_size} bytes{entries}), {args.cycles} cycles each\n")

        methods = {name: native_cycle(image, target, basedir, plan) for name, plan in PLANS.items()}
        tool = find_tool("mount.composefs")
        if tool is not None:
            methods["mount.composefs"] = upstream_cycle(tool, image, target, basedir)
        else:
            print("mount.composefs not installed: only native paths timed\n")
        times = {name: time_cycles(args.cycles, cycle) for name, cycle in methods.items()}

    # the median resists the noise of other work on the machine; the ratio uses it
    base = statistics.median(times["native (fd lower)"])
    print(f"{'method':<26} {'total s':>8} {'median ms':>10} {'mean ms':>8} {'vs native':>10}")
    for name, t in times.items():
        median = statistics.median(t)
        print(f"{name:<26} {sum(t):>8.3f} {1000 * median:>10.3f} {1000 * statistics.fmean(t):>8.3f} "
              f"{median / base:>9.2f}x")


if __name__ == "__main__":
    main()
