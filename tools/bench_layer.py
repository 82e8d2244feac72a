#!/usr/bin/env python3
"""Package layering: ``apt-layer install`` of one small package against plain ``apt-get install``, same run.

On the cached bookworm minbase of the tests (tests/debian_base.py, about
8,700 entries), with a signed local repository holding one small package
(``al-small``, one file), and the download cache warm (one install first,
untimed), times, best of ``--rounds``:

  layer total     ``layering.install(store, ["al-small"], from_image="base",
                  deploy=False)``: mount, apt + dpkg, unmount, layered
                  build, commit
  inside apt      the part of it spent in ``aptlayer.packages.apt.install``
                  (apt-get update of the local repository, resolving,
                  downloading from the cache, apt + dpkg in the sandbox)
  own part        total - inside apt (the least over the rounds): everything
                  apt-layer adds; then the median of its parts: mounting the
                  base writable, unmounting it, building and recording the
                  image (``Store.create``), and the rest
  apt-get         ``chroot COPY apt-get install -y al-small`` in a plain
                  ``cp -a`` copy of the same tree (copied before the timing),
                  its sources the same repository, ``apt-get update`` done
                  before: the work that cannot be avoided
  mkcomposefs     upstream mkcomposefs (APT_LAYER_COMPOSEFS_BIN or PATH;
                  else apt-layer's own) of the layered image's merged tree,
                  mounted read-only, into a scratch --digest-store

Goals (issue 12): total <= 1.5x apt-get; own part <= 0.25x mkcomposefs.
Then (unless ``--skip-big``) a desktop-sized base: the minbase plus about
136,000 small files in 5,000 directories under /usr/share/bench-filler,
owned by a fake installed package ``bench-filler`` (its .list names them
all, so dpkg reads them as it would a desktop's), created as image ``big``,
and the same install timed on it. Goal: own part < 1 s.

Needs root (mounts, chroot, the sandbox), bubblewrap, dpkg-deb,
apt-ftparchive and gpg; mmdebstrap if the minbase is not cached yet.

Usage: tools/bench_layer.py [--rounds N] [--skip-big] [--filler N] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from aptlayer import layering, mounts  # noqa: E402
from aptlayer.builder import CreateOptions  # noqa: E402
from aptlayer.composefs import build, reader  # noqa: E402
from aptlayer.composefs.upstream import find_tool  # noqa: E402
from aptlayer.packages import apt  # noqa: E402
from aptlayer.store import Store  # noqa: E402
from aptrepo import AptRepo, Pkg  # noqa: E402
from debian_base import base_tree  # noqa: E402

PY = CreateOptions(backend="python")
PACKAGE = "al-small"
FILLER = "bench-filler"


class Clocks:
    """Wraps some functions (in this process only) and adds up the time spent inside each."""

    #: (label, owner, attribute): the parts of an install worth telling apart
    PARTS = (("inside apt", apt, "install"), ("mount", mounts, "mount"), ("unmount", mounts, "unmount"),
             ("build + record the image", Store, "create"))

    def __init__(self) -> None:
        self.spent = {label: 0.0 for label, _, _ in self.PARTS}
        self._real = [(owner, name, getattr(owner, name)) for _, owner, name in self.PARTS]

    def __enter__(self) -> "Clocks":
        for (label, owner, name), (_, _, real) in zip(self.PARTS, self._real):
            setattr(owner, name, self._timed(label, real))
        return self

    def _timed(self, label, real):
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return real(*args, **kwargs)
            finally:
                self.spent[label] += time.perf_counter() - start
        return timed

    def __exit__(self, *exc) -> None:
        for owner, name, real in self._real:
            setattr(owner, name, real)


def layer_once(store: Store, base: str, repo: AptRepo) -> tuple[float, float, str, dict]:
    """One ``apt-layer install`` of the package on ``base``: (total, inside apt) seconds, the new image, the parts."""
    with Clocks() as clocks:
        start = time.perf_counter()
        result = layering.install(store, [PACKAGE], from_image=base, deploy=False, sources=[repo.source()])
        total = time.perf_counter() - start
    if not any(c["change"] == "added" and c["package"] == PACKAGE for c in result["changes"]):
        raise SystemExit(f"the install did not add {PACKAGE}: {result['changes']}")
    return total, clocks.spent["inside apt"], result["image"], clocks.spent


def parts_rows(rounds: list[tuple]) -> None:
    """The median of each part over the rounds, and what is left (apt-layer's own Python around them)."""
    import statistics

    labels = [label for label, _, _ in Clocks.PARTS]
    for label in labels[1:]:
        print(f"{'    ' + label:38s} {ms(statistics.median(r[3][label] for r in rounds))}")
    rest = statistics.median(r[0] - sum(r[3].values()) for r in rounds)
    print(f"{'    the rest (dpkg status, staging, ...)':38s} {ms(rest)}")


def chroot_template(tree: Path, repo: AptRepo, dest: Path) -> Path:
    """A plain copy of ``tree`` whose apt knows only the local repository, lists already fetched."""
    subprocess.run(["cp", "-a", str(tree), str(dest)], check=True)
    shutil.copytree(repo.path, dest / "srv/bench-repo")
    (dest / "etc/apt/keyrings").mkdir(parents=True, exist_ok=True)
    shutil.copyfile(repo.keyring, dest / "etc/apt/keyrings/bench-repo.gpg")
    (dest / "etc/apt/sources.list").write_text(
        "deb [signed-by=/etc/apt/keyrings/bench-repo.gpg] file:///srv/bench-repo stable main\n")
    for extra in (dest / "etc/apt/sources.list.d").glob("*"):
        extra.unlink()
    subprocess.run(["chroot", str(dest), "apt-get", "-q", "update"], check=True, stdout=subprocess.DEVNULL)
    return dest


def apt_get_once(template: Path, scratch: Path) -> float:
    """``apt-get install`` of the package in a fresh copy of the template (copying it is not timed)."""
    copy = scratch / "chroot"
    subprocess.run(["cp", "-a", str(template), str(copy)], check=True)
    try:
        start = time.perf_counter()
        subprocess.run(["chroot", str(copy), "apt-get", "-q", "-y", "-o", "Dpkg::Use-Pty=false", "install", PACKAGE],
                       check=True, stdout=subprocess.DEVNULL,
                       env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
        return time.perf_counter() - start
    finally:
        shutil.rmtree(copy)


def mkcomposefs_once(store: Store, image: str, scratch: Path) -> tuple[float, str]:
    """mkcomposefs of ``image``'s merged tree into an empty digest store: (seconds, which tool)."""
    mnt, objects, out = scratch / "mnt", scratch / "objects", scratch / "merged.cfs"
    for d in (mnt, objects):
        d.mkdir()
    tool = find_tool("mkcomposefs")
    mounts.mount(store, image, str(mnt), readonly=True)
    try:
        start = time.perf_counter()
        if tool is not None:
            subprocess.run([tool, f"--digest-store={objects}", str(mnt), str(out)], check=True)
        else:
            build.make_image(str(mnt), digest_store=str(objects), threads=os.cpu_count() or 1)
        return time.perf_counter() - start, "upstream" if tool else "apt-layer"
    finally:
        mounts.unmount(store, str(mnt))
        shutil.rmtree(objects)
        out.unlink(missing_ok=True)
        mnt.rmdir()


def add_filler(root: Path, files: int, dirs: int) -> int:
    """``files`` small files in ``dirs`` directories, owned by an installed fake package; returns entries added."""
    top = root / "usr/share" / FILLER
    paths = ["/usr/share/" + FILLER]
    top.mkdir()
    for d in range(dirs):
        sub = top / f"d{d:04d}"
        sub.mkdir()
        paths.append(f"/usr/share/{FILLER}/d{d:04d}")
        for f in range(d, files, dirs):
            (sub / f"f{f:06d}").write_text(f"filler {f}\n")
            paths.append(f"/usr/share/{FILLER}/d{d:04d}/f{f:06d}")
    info = root / "var/lib/dpkg/info"
    (info / f"{FILLER}.list").write_text("/.\n/usr\n/usr/share\n" + "\n".join(paths) + "\n")
    with open(root / "var/lib/dpkg/status", "a") as status:
        status.write(f"\nPackage: {FILLER}\nStatus: install ok installed\nPriority: optional\nSection: misc\n"
                     "Installed-Size: 1\nMaintainer: apt-layer bench <bench@apt-layer.invalid>\n"
                     f"Architecture: all\nVersion: 1.0\nDescription: files standing in for a desktop's\n")
    return len(paths)


def entries_of(store: Store, image: str) -> int:
    return sum(1 for _ in reader.read_image(store.image_file(image)).walk())


def best(rows: list[tuple]) -> tuple:
    return min(rows, key=lambda r: r[0])


def ms(seconds: float) -> str:
    return f"{seconds * 1000:9.0f} ms"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds of each (the best is shown)")
    parser.add_argument("--skip-big", action="store_true", help="skip the 150,000-entry base")
    parser.add_argument("--filler", type=int, default=136_000, help="files added for the big base")
    parser.add_argument("--workdir", default=None, help="where the store and copies go (default: TMPDIR)")
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("bench_layer.py needs root (mounts, chroot, the sandbox)")
    tree = base_tree()
    tmp = Path(tempfile.mkdtemp(prefix="bench-layer-", dir=args.workdir))
    store = None
    try:
        repo = AptRepo.build(tmp / "repo", [Pkg(PACKAGE, files={"/usr/share/al-small/README": "small\n"})])
        store = Store.open(tmp / "store")
        store.create(str(tree), "base", PY)
        print(f"base: {entries_of(store, 'base')} entries (bookworm minbase)")
        layer_once(store, "base", repo)  # the download cache and the lists warm
        layer = [layer_once(store, "base", repo) for _ in range(args.rounds)]
        template = chroot_template(tree, repo, tmp / "template")
        (tmp / "scratch").mkdir()
        plain = [apt_get_once(template, tmp / "scratch") for _ in range(args.rounds)]
        shutil.rmtree(template)
        made = [mkcomposefs_once(store, layer[-1][2], tmp / "scratch") for _ in range(args.rounds)]
        total, inside, _, _ = best(layer)
        own = min(t - a for t, a, _, _ in layer)
        apt_get = min(plain)
        mkcfs, tool = best(made)
        print(f"{'minbase':38s} {'time':>12s} {'ratio':>8s} {'goal':>8s}")
        print(f"{'apt-layer install, total':38s} {ms(total)} {total / apt_get:7.2f}x {'<= 1.5x':>8s}"
              "  (against apt-get)")
        print(f"{'  inside apt (incl. apt-get update)':38s} {ms(inside)}")
        print(f"{'  own part (total - apt)':38s} {ms(own)} {own / mkcfs:7.2f}x {'<= 0.25x':>8s}"
              "  (against mkcomposefs)")
        parts_rows(layer)
        print(f"{'chroot apt-get install':38s} {ms(apt_get)}")
        print(f"{tool + ' mkcomposefs of merged tree':38s} {ms(mkcfs)}")
        if not args.skip_big:
            big_tree = tmp / "big-tree"
            subprocess.run(["cp", "-a", str(tree), str(big_tree)], check=True)
            added = add_filler(big_tree, args.filler, 5000)
            start = time.perf_counter()
            store.create(str(big_tree), "big", PY)
            created = time.perf_counter() - start
            shutil.rmtree(big_tree)
            print(f"\nbig: {entries_of(store, 'big')} entries ({added} added, image created in {created:.1f} s)")
            layer_once(store, "big", repo)
            big = [layer_once(store, "big", repo) for _ in range(args.rounds)]
            total, inside, _, _ = best(big)
            own = min(t - a for t, a, _, _ in big)
            print(f"{'apt-layer install, total':38s} {ms(total)}")
            print(f"{'  inside apt (incl. apt-get update)':38s} {ms(inside)}")
            print(f"{'  own part (total - apt)':38s} {ms(own)} {'':8s} {'< 1000 ms':>8s}")
            parts_rows(big)
    finally:
        if store is not None:
            store.close()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
