"""The layered image made by moving the base's inodes (aptlayer.composefs.relocate) is the full render's.

Random base trees (inline and external files, shared and unique xattrs,
long symlinks, big directories, compact and extended inodes) and random
deltas over them (new entries, whiteouts, replaced files, metadata-only
copies, opaque and renamed directories): wherever the fast path does not
decline, its bytes must equal the writer's image of the merged tree, and
that must equal upstream mkcomposefs of the merged tree's dump (when
APT_LAYER_COMPOSEFS_BIN has it). No mounts: the deltas are built as
:func:`aptlayer.composefs.upper.read_upper` would give them.
"""

from __future__ import annotations

import random
import stat
import subprocess

import pytest

from aptlayer.composefs import relocate, upper
from aptlayer.composefs.dumpfile import format_dump
from aptlayer.composefs.fsverity import object_path
from aptlayer.composefs.reader import read_image
from aptlayer.composefs.tree import Node
from aptlayer.composefs.upstream import find_tool
from aptlayer.composefs.writer import build_image

CASES = 150
MIN_MTIME = 1_000_000


class Gen:
    """Random trees and deltas from one seed."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.digests = [bytes(self.rng.randrange(256) for _ in range(32)) for _ in range(12)]
        self.values = [b"a", b"bb", b"shared-value", bytes(40)]
        self.count = 0

    def name(self) -> bytes:
        self.count += 1
        r = self.rng.random()
        if r < 0.05:
            return b"-%d" % self.count  # sorts before "."
        if r < 0.15:
            return b"long-" + b"n" * self.rng.randrange(20, 200) + b"%d" % self.count
        return b"e%d" % self.count

    def meta(self, mode: int) -> dict:
        rng = self.rng
        mtime = MIN_MTIME + rng.choice((0, 0, 0, 1, 2, 50))
        return dict(mode=mode, uid=rng.choice((0, 0, 0, 1000, 70_000)), gid=rng.choice((0, 0, 5)),
                    mtime_sec=mtime, mtime_nsec=rng.choice((0, 0, 7)))

    def xattrs(self) -> dict[bytes, bytes]:
        rng = self.rng
        out = {}
        if rng.random() < 0.15:
            out[b"user.tag"] = rng.choice(self.values)
        if rng.random() < 0.05:
            out[b"security.capability"] = rng.choice(self.values)
        return out

    def leaf(self) -> Node:
        rng = self.rng
        kind = rng.random()
        if kind < 0.35:
            size = rng.choice((0, 1, 10, 64, 300, 2048, 2049, 4096, 4500, 5000))
            content = bytes(rng.randrange(256) for _ in range(min(size, 16))) * (size // 16 + 1)
            return Node(**self.meta(stat.S_IFREG | 0o644), size=size, content=content[:size] or None,
                        xattrs=self.xattrs())
        if kind < 0.75:
            digest = rng.choice(self.digests)
            return Node(**self.meta(stat.S_IFREG | 0o644), size=rng.choice((65, 4096, 100_000)), digest=digest,
                        payload=object_path(digest).encode(), xattrs=self.xattrs())
        if kind < 0.9:
            target = b"t" * rng.choice((1, 30, 2000, 4000))
            return Node(**self.meta(stat.S_IFLNK | 0o777), size=len(target), payload=target)
        if kind < 0.95:
            return Node(**self.meta(stat.S_IFIFO | 0o644))
        return Node(**self.meta(stat.S_IFCHR | 0o600), rdev=rng.choice((0x103, 0x501)))

    def directory(self) -> Node:
        return Node(**self.meta(stat.S_IFDIR | 0o755), xattrs=self.xattrs())

    def base(self) -> Node:
        rng = self.rng
        root = Node(mode=stat.S_IFDIR | 0o755, mtime_sec=MIN_MTIME)
        dirs = [root]
        for _ in range(rng.randrange(5, 250)):
            parent = rng.choice(dirs)
            if rng.random() < 0.2:
                child = parent.children[self.name()] = self.directory()
                dirs.append(child)
            else:
                parent.children[self.name()] = self.leaf()
        return root

    def delta(self, base: Node) -> upper.Delta:
        """Changes as an upper directory gives them: each below a directory of the upper layer."""
        rng = self.rng
        root_meta = Node(mode=base.mode, uid=base.uid, gid=base.gid, mtime_sec=base.mtime_sec + rng.choice((0, 0, 3)),
                         xattrs=dict(base.xattrs))
        delta = upper.Delta(root_meta)
        in_upper: dict[bytes, Node] = {b"": base}  # directories of the upper layer: their base nodes
        used: set[bytes] = set()

        def touch(path: bytes, node: Node) -> None:
            """``path`` (a base directory) and its parents, as copied-up directories."""
            if path in in_upper:
                return
            parent = path.rpartition(b"/")[0]
            touch(parent, _node_at(base, parent))
            meta = Node(mode=node.mode, uid=node.uid, gid=node.gid, mtime_sec=node.mtime_sec + rng.choice((0, 1)),
                        mtime_nsec=node.mtime_nsec, xattrs=dict(node.xattrs))
            delta.changes.append(upper.Directory(path, meta, opaque=False, redirect=None))
            in_upper[path] = node

        paths = [(p.rstrip(b"/"), n) for p, n in base.walk() if p != b"/"]
        dirs = [(b"", base)] + [(p, n) for p, n in paths if n.is_dir]
        for _ in range(rng.randrange(0, 10)):
            op = rng.random()
            if op < 0.35 or not paths:
                at, node = rng.choice(dirs)
                if any(at == u or at.startswith(u + b"/") for u in used):
                    continue
                touch(at, node)
                path = at + b"/" + self.name()
                leaf = self.directory() if rng.random() < 0.2 else self.leaf()
                if leaf.is_dir:
                    delta.changes.append(upper.Directory(path, leaf, opaque=True, redirect=None))
                    in_upper[path] = leaf
                else:
                    delta.changes.append(upper.Added(path, leaf))
                used.add(path)
                continue
            path, node = rng.choice(paths)
            parent = path.rpartition(b"/")[0]
            if path in in_upper or any(path == u or path.startswith(u + b"/") or u.startswith(path + b"/")
                                       for u in [*used, *in_upper]):
                continue
            touch(parent, _node_at(base, parent))
            used.add(path)
            if op < 0.55:
                delta.changes.append(upper.Whiteout(path))
            elif op < 0.7 and not node.is_dir:
                delta.changes.append(upper.Added(path, self.leaf()))
            elif op < 0.85 and node.is_reg:
                meta = Node(mode=stat.S_IFREG | 0o600, uid=node.uid, gid=node.gid, size=node.size,
                            mtime_sec=node.mtime_sec + 1, xattrs=dict(node.xattrs))
                delta.changes.append(upper.MetaCopy(path, meta, redirect=None))
            elif node.is_dir and op < 0.92:
                delta.changes.append(upper.Directory(path, self.directory(), opaque=True, redirect=None))
                in_upper[path] = node
            elif node.is_dir:
                new = parent + b"/" + self.name()
                meta = Node(mode=node.mode, uid=node.uid, gid=node.gid, mtime_sec=node.mtime_sec,
                            xattrs=dict(node.xattrs))
                delta.changes.append(upper.Whiteout(path))
                delta.changes.append(upper.Directory(new, meta, opaque=False, redirect=path.rpartition(b"/")[2]))
                in_upper[new] = node
                used.add(new)
        return delta


def _node_at(root: Node, path: bytes) -> Node:
    node = root
    for name in path.split(b"/")[1:]:
        node = node.children[name]
    return node


def _digests(root: Node) -> set[bytes]:
    return {n.digest for _p, n in root.walk() if n.is_reg and n.content is None and n.size > 0}


@pytest.mark.parametrize("chunk", range(3))
def test_moving_the_base_inodes_gives_the_full_render_and_mkcomposefs_bytes(chunk: int) -> None:
    tool = find_tool("mkcomposefs")
    moved = 0
    for seed in range(chunk * CASES, (chunk + 1) * CASES):
        gen = Gen(seed)
        tree = gen.base()
        base = build_image(tree)
        base_digests = _digests(tree)
        delta = gen.delta(read_image(base))
        fast = relocate.layered_image(base, delta, base_digests.__contains__)
        merged = upper.apply(read_image(base), delta)
        full = build_image(merged)
        if fast is None:
            continue
        moved += 1
        assert bytes(fast.image) == full, f"seed {seed}: moved inodes differ from the render"
        now = _digests(merged)
        assert fast.removed == base_digests - now, f"seed {seed}"
        assert set(fast.added) == now - base_digests, f"seed {seed}"
        if tool is not None:
            dump = _dump(merged)
            run = subprocess.run([tool, "--from-file", "-", "-"], input=dump, capture_output=True, check=True)
            assert run.stdout == full, f"seed {seed}: mkcomposefs differs"
    # the fast path must be the usual one, not a decline
    assert moved > CASES // 2, f"only {moved} of {CASES} cases moved the base's inodes"


def _dump(root: Node) -> bytes:
    import io

    out = io.BytesIO()
    format_dump(root, out)
    return out.getvalue()


def test_a_new_smallest_mtime_is_declined() -> None:
    gen = Gen(1)
    tree = gen.base()
    base = build_image(tree)
    old = Node(mode=stat.S_IFREG | 0o644, mtime_sec=MIN_MTIME - 1)
    delta = upper.Delta(Node(mode=tree.mode, mtime_sec=tree.mtime_sec), [upper.Added(b"/older", old)])
    assert relocate.layered_image(base, delta, lambda d: True) is None
    assert build_image(upper.apply(read_image(base), delta))  # the render does it
