#!/usr/bin/env python3
"""Recreate a real root filesystem's tree from a composefs dump, with synthetic content.

Benchmarks need a source tree shaped like a real rootfs: its layout, names,
modes, owners, xattrs, file sizes and, above all, which files share content,
since that decides how much the object store deduplicates.  The upstream
rootfs dumps (e.g. CentOS Stream 9 minimal) give all of that except the
bytes, so regular-file content is synthesized: deterministic from a seed,
identical for files with the same digest (or backing object), different
otherwise.  Only whole-file duplication is realistic: past a 32-byte header
every file repeats one random 64 KiB block, which keeps writing ~1 GB fast.

Usage: tools/rootfs_tree.py DUMP_GZ DEST [--seed N]
"""

from __future__ import annotations

import argparse
import errno
import gzip
import hashlib
import os
import random
import shutil
import stat
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from aptlayer.composefs.dumpfile import parse_dump  # noqa: E402
from aptlayer.composefs.tree import Node  # noqa: E402

#: size of the random block that fills every synthesized file after its header
BLOCK_SIZE = 64 * 1024
#: largest single write: the block repeated, so big files take few syscalls
WRITE_SIZE = 64 * BLOCK_SIZE


@dataclass
class TreeStats:
    entries: int = 0
    file_bytes: int = 0
    xattrs_skipped: int = 0
    #: device nodes, fifos and sockets that could not be created (and hard links to them)
    specials_skipped: int = 0


class _Builder:
    """Creates one dump's entries under ``dest``; all paths are bytes."""

    def __init__(self, dest: bytes, seed: int) -> None:
        self.dest = dest
        self.seed_prefix = b"%d:" % seed
        self.fill = memoryview(random.Random(seed).randbytes(BLOCK_SIZE) * (WRITE_SIZE // BLOCK_SIZE))
        self.stats = TreeStats()
        #: dump path of every created non-link entry, for hard links to find their target
        self.created: dict[int, bytes] = {}

    def build(self, root: Node) -> TreeStats:
        dirs: list[tuple[bytes, Node]] = []
        links: list[tuple[bytes, Node]] = []
        for path, node in root.walk():
            if node.link is not None:
                links.append((path, node))  # the target may come later in the walk
            elif self.create(path, node):
                self.created[id(node)] = path
                self.stats.entries += 1
                if node.is_dir:
                    dirs.append((path, node))
        for path, node in links:
            target = self.created.get(id(node.resolve()))
            if target is None:
                self.stats.specials_skipped += 1
                continue
            os.link(self.full(target), self.full(path), follow_symlinks=False)
            self.stats.entries += 1
        # modes and mtimes of directories last, children before parents, so that
        # creating entries neither is refused by a read-only mode nor bumps an mtime
        for path, node in reversed(dirs):
            os.chmod(self.full(path), stat.S_IMODE(node.mode))
            self.set_mtime(self.full(path), node)
        return self.stats

    def full(self, path: bytes) -> bytes:
        return self.dest + path.rstrip(b"/")

    def create(self, path: bytes, node: Node) -> bool:
        """Create one entry with its owner, xattrs and (except directories) mode and mtime."""
        full = self.full(path)
        kind = node.ftype
        if kind == stat.S_IFDIR:
            os.mkdir(full, 0o700)
        elif kind == stat.S_IFREG:
            self.write_file(full, path, node)
        elif kind == stat.S_IFLNK:
            os.symlink(node.payload, full)
        else:
            try:
                os.mknod(full, node.mode, node.rdev)
            except OSError:
                self.stats.specials_skipped += 1
                return False
        # chown first: it clears setuid/setgid bits and security.capability
        os.lchown(full, node.uid, node.gid)
        if kind != stat.S_IFDIR and kind != stat.S_IFLNK:
            os.chmod(full, stat.S_IMODE(node.mode))
        for name, value in node.xattrs.items():
            try:
                os.setxattr(full, name, value, follow_symlinks=False)
            except OSError:
                self.stats.xattrs_skipped += 1
        if kind != stat.S_IFDIR:
            self.set_mtime(full, node)
        return True

    def write_file(self, full: bytes, path: bytes, node: Node) -> None:
        """The dump's inline content, else a hash of the file's identity then the fill block."""
        if node.content is not None:
            head = node.content
        else:
            if node.digest is not None:
                identity = b"digest:" + node.digest
            elif node.payload is not None:
                identity = b"payload:" + node.payload  # content-addressed object path
            else:
                identity = b"path:" + path
            head = hashlib.sha256(self.seed_prefix + identity).digest()[: node.size]
        with open(full, "xb") as f:
            f.write(head)
            left = node.size - len(head)
            while left > 0:
                n = f.write(self.fill[: min(left, WRITE_SIZE)])
                left -= n
        self.stats.file_bytes += node.size

    @staticmethod
    def set_mtime(full: bytes, node: Node) -> None:
        ns = node.mtime_sec * 1_000_000_000 + node.mtime_nsec
        os.utime(full, ns=(ns, ns), follow_symlinks=False)


def build_rootfs_tree(dump_gz: Path, dest: Path, seed: int = 1) -> TreeStats:
    """Recreate ``dump_gz`` (a gzipped composefs dump) under ``dest``, which must not exist."""
    with gzip.open(dump_gz) as f:
        root = parse_dump(f.read())
    # some upstream test dumps declare petabyte files: refuse before filling the disk
    needed = sum(node.size for _, node in root.walk() if node.is_reg)
    free = shutil.disk_usage(dest.parent).free
    if needed > free:
        raise OSError(errno.ENOSPC, f"the dump needs {needed} bytes of files, {free} are free", str(dest))
    return _Builder(os.fsencode(dest), seed).build(root)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dump_gz", type=Path, help="gzipped composefs dump, e.g. cs9-x86_64-minimal.dump.gz")
    parser.add_argument("dest", type=Path, help="directory to create (must not exist)")
    parser.add_argument("--seed", type=int, default=1, help="seed of the synthesized content (default 1)")
    args = parser.parse_args()
    start = time.perf_counter()
    stats = build_rootfs_tree(args.dump_gz, args.dest, args.seed)
    print(
        f"{stats.entries} entries, {stats.file_bytes / 1e6:.1f} MB written, "
        f"{stats.xattrs_skipped} xattrs and {stats.specials_skipped} special files skipped, "
        f"{time.perf_counter() - start:.2f} s"
    )


if __name__ == "__main__":
    main()
