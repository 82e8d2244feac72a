#!/usr/bin/env python3
"""A fleet pulling updates from a registry: bytes each machine transfers per version, chunked and in one layer.

One builder store makes versions v1..v5 of an image from the cached bookworm
minbase of the tests (tests/debian_base.py): v1 is the minbase, each later
version changes a few packages (chosen with a fixed seed) as an update
would: every regular file the package lists gets new content, its version
in dpkg's status file changes, and the files and their directories get a
new mtime. Each version is pushed to a local registry (Debian's
docker-registry on 127.0.0.1, as the tests run it) twice: chunked by
package, and as one layer (``--single-layer``). Then ``--machines`` machine
stores (separate roots on this host) per layout pull v1..v5 in order,
through skopeo, and the bytes each fetched are read from its pull report.

The table gives, per version, the image's size (the sum of its compressed
layers) and what one machine fetched (the same on every machine: the
bench checks that, and that each pulled image has the builder's digest).
Goal (issue 16): an update that changes 1% of the packages transfers at most
5% of the image's bytes.

Needs root (the base, owners in the tree), skopeo and docker-registry.

Usage: tools/bench_fleet.py [--machines N] [--workdir DIR] [--seed N]
"""

from __future__ import annotations

import argparse
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from aptlayer.oci import distribute  # noqa: E402
from aptlayer.packages import dpkgdb  # noqa: E402
from aptlayer.packages.rootfs import TreeRoot  # noqa: E402
from aptlayer.store import Store  # noqa: E402
from debian_base import base_tree  # noqa: E402
from test_oci import Registry  # noqa: E402

#: packages each version changes (v2..v5); the minbase has about 90
CHANGES = {2: 1, 3: 1, 4: 2, 5: 5}
T0 = 1_750_000_000


def update_packages(tree: Path, packages: list[str], version: int) -> None:
    """What an update of ``packages`` does to the tree, as far as its bytes go."""
    root = TreeRoot(tree)
    db = dpkgdb.read_database(root)
    chosen = [p for p in db.installed if p.name in packages]
    lists = dpkgdb.read_file_lists(root, chosen)
    when = T0 + version * 86400
    real_tree = os.path.realpath(tree)
    for key, paths in lists.items():
        for listed in paths:
            parent = os.path.realpath(os.path.join(tree, os.path.dirname(listed).lstrip("/")))
            if not parent.startswith(real_tree + "/") and parent != real_tree:
                continue
            path = os.path.join(parent, os.path.basename(listed))
            if os.path.islink(path) or not os.path.isfile(path):
                continue
            with open(path, "ab") as f:
                f.write(f"\n# {key} rebuilt for v{version}\n".encode())
            os.utime(path, (when, when))
            os.utime(parent, (when, when))
    status = tree / "var/lib/dpkg/status"
    text = status.read_text()
    for name in packages:
        text = re.sub(rf"(\nPackage: {re.escape(name)}\n(?:[^\n]+\n)*?Version: )([^\n]+)",
                      rf"\g<1>\g<2>+fleet{version}", "\n" + text, count=1)[1:]
    status.write_text(text)


def human(n: int) -> str:
    return f"{n / 1e6:.2f} MB"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--machines", type=int, default=20)
    parser.add_argument("--workdir", type=Path)
    parser.add_argument("--seed", type=int, default=16)
    args = parser.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench-fleet-"))
    work.mkdir(parents=True, exist_ok=True)
    tree = work / "tree"
    if tree.exists():
        shutil.rmtree(tree)
    subprocess.run(["cp", "-a", str(base_tree()), str(tree)], check=True)
    registry = Registry(work / "registry")
    registry.start()
    try:
        return run(args, work, tree, registry)
    finally:
        registry.stop()
        if args.workdir is None:
            shutil.rmtree(work)


def run(args, work: Path, tree: Path, registry: Registry) -> int:
    builder = Store.open(work / "builder")
    installed = [p.name for p in dpkgdb.read_database(TreeRoot(tree)).installed]
    rng = random.Random(args.seed)
    changed: dict[int, list[str]] = {1: []}
    full: dict[tuple[str, int], int] = {}
    digests = {}
    for version in range(1, 6):
        if version > 1:
            changed[version] = sorted(rng.sample(installed, CHANGES[version]))
            update_packages(tree, changed[version], version)
        digests[version] = builder.create(str(tree), f"v{version}")["digest"]
        for mode in ("chunked", "single"):
            pushed = distribute.push(builder, f"v{version}", registry.ref(f"fleet/{mode}:v{version}"),
                                     tls_verify=False, chunked=mode == "chunked")
            full[mode, version] = pushed["bytes"]
            if version == 1:
                print(f"{mode}: {pushed['layers']} layers", file=sys.stderr)
    fetched: dict[tuple[str, int], set[int]] = {}
    for mode in ("chunked", "single"):
        for machine in range(args.machines):
            store = Store.open(work / "machines" / f"{mode}-{machine:02d}")
            for version in range(1, 6):
                got = distribute.pull(store, registry.ref(f"fleet/{mode}:v{version}"), f"v{version}",
                                      tls_verify=False)
                assert got["digest"] == digests[version], (mode, machine, version)
                fetched.setdefault((mode, version), set()).add(got["fetched_bytes"])
            store.close()
            print(f"{mode}: machine {machine + 1}/{args.machines} done", file=sys.stderr)
    print(f"{args.machines} machines; minbase (bookworm) has {len(installed)} packages\n")
    print("| version | packages changed | image, chunked | fetched per machine | share | image, one layer "
          "| fetched per machine | share |")
    print("|---|---|---|---|---|---|---|---|")
    for version in range(1, 6):
        row = [f"v{version}", ", ".join(changed[version]) or "(all: first pull)"]
        for mode in ("chunked", "single"):
            per = fetched[mode, version]
            assert len(per) == 1, (mode, version, per)  # every machine fetched the same
            got = per.pop()
            row += [human(full[mode, version]), human(got), f"{100 * got / full[mode, version]:.1f}%"]
        print("| " + " | ".join(row) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
