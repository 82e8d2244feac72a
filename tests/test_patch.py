"""patch_image: a patched image equals a full render of the changed tree, or the patch is refused."""

from __future__ import annotations

import copy
import random
import stat

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aptlayer.composefs.fsverity import object_path
from aptlayer.composefs.patch import patch_image
from aptlayer.composefs.tree import Node
from aptlayer.composefs.writer import build_image

MTIMES = [(100, 0), (100, 5), (200, 0), (300, 7)]
EXTERNAL_SIZES = [65, 4096, 5000, 1 << 20, 0xFFFFFFFF, 1 << 33, (1 << 43) + 1]


def detached(node: Node) -> Node:
    """A copy of a node's own metadata and data, without its children."""
    twin = copy.copy(node)
    twin.children = {}
    twin.xattrs = dict(node.xattrs)
    return twin


def _digest(rng: random.Random, pool: list[bytes]) -> bytes:
    if pool and rng.random() < 0.2:
        return rng.choice(pool)  # the same content twice: its xattrs are shared
    digest = rng.randbytes(32)
    pool.append(digest)
    return digest


def _file(rng: random.Random, pool: list[bytes], mtime) -> Node:
    kind = rng.random()
    node = Node(mode=stat.S_IFREG | 0o644, mtime_sec=mtime[0], mtime_nsec=mtime[1])
    if kind < 0.6:
        node.size = rng.choice(EXTERNAL_SIZES)
        node.digest = _digest(rng, pool)
        node.payload = object_path(node.digest).encode()
    elif kind < 0.85:
        node.content = rng.randbytes(rng.randint(1, 64))
        node.size = len(node.content)
    elif kind < 0.95:
        node.mode = stat.S_IFLNK | 0o777
        node.payload = rng.randbytes(rng.randint(1, 30)).replace(b"\0", b"x")
        node.size = len(node.payload)
    else:
        node.mode = stat.S_IFIFO | 0o600
    return node


def _spec(seed: int) -> dict[bytes, Node]:
    """A random tree as path -> node (directories without children)."""
    rng = random.Random(seed)
    pool: list[bytes] = []
    nodes = {b"/": Node(mtime_sec=300, mtime_nsec=7)}
    dirs = [b"/"]
    for i in range(rng.randint(1, 6)):
        parent = rng.choice(dirs)
        path = parent.rstrip(b"/") + b"/d%d" % i
        nodes[path] = Node(mtime_sec=rng.choice(MTIMES)[0], uid=rng.choice([0, 0, 70000]))
        dirs.append(path)
    for i in range(rng.randint(1, 40)):
        path = rng.choice(dirs).rstrip(b"/") + b"/f%d" % i
        node = nodes[path] = _file(rng, pool, rng.choice(MTIMES))
        if rng.random() < 0.3:
            node.xattrs[rng.choice([b"user.a", b"user.b", b"trusted.overlay.x"])] = rng.choice([b"1", b"22"])
        if rng.random() < 0.1:
            node.uid = 70000
    return nodes


def _build(spec: dict[bytes, Node]) -> Node:
    """The tree of a spec, from fresh copies of its nodes."""
    copies = {path: detached(node)
              for path, node in spec.items()}
    for path in sorted(copies):
        if path != b"/":
            parent, name = path.rsplit(b"/", 1)
            copies[parent or b"/"].children[name] = copies[path]
    return copies[b"/"]


def _mutate(spec: dict[bytes, Node], seed: int) -> dict[bytes, Node]:
    """New nodes for a few paths: new times, contents, sizes, sometimes more."""
    rng = random.Random(seed)
    pool = [n.digest for n in spec.values() if n.digest]
    changes = {}
    for path in rng.sample(sorted(spec), rng.randint(1, min(4, len(spec)))):
        node = detached(spec[path])
        node.mtime_sec, node.mtime_nsec = rng.choice(MTIMES + [(50, 0), (400, 1)])
        if node.digest is not None:
            node.digest = _digest(rng, pool) if rng.random() < 0.9 else node.digest
            node.payload = object_path(node.digest).encode()
            if rng.random() < 0.3:
                node.size = rng.choice(EXTERNAL_SIZES)
        elif node.content is not None:
            node.content = rng.randbytes(len(node.content) if rng.random() < 0.7 else rng.randint(1, 64))
            node.size = len(node.content)
        elif stat.S_ISLNK(node.mode):
            node.payload = rng.randbytes(len(node.payload) if rng.random() < 0.7 else 3).replace(b"\0", b"y")
            node.size = len(node.payload)
        if rng.random() < 0.05:
            node.mode ^= 0o001
        if rng.random() < 0.05:
            node.xattrs[b"user.a"] = b"changed"
        changes[path] = node
    return changes


def _objects(spec: dict[bytes, Node]) -> dict[bytes, int]:
    return {n.digest: n.size for n in spec.values() if n.digest is not None and n.size}


@settings(max_examples=400, deadline=None)
@given(seed=st.integers(0, 2**32), change_seed=st.integers(0, 2**32))
def test_patched_image_equals_full_render(seed, change_seed):
    spec = _spec(seed)
    changes = _mutate(spec, change_seed)
    new_spec = {**spec, **changes}
    old_image = build_image(_build(spec))
    old_objects = _objects(spec)
    try:
        expected = build_image(_build(new_spec))
    except ValueError:
        expected = None
    patched = patch_image(old_image, changes, old_objects.__contains__)
    if patched is None:
        return
    assert expected is not None
    assert bytes(patched.image) == expected
    new_objects = _objects(new_spec)
    assert patched.removed == old_objects.keys() - new_objects.keys()
    assert patched.added == {d: s for d, s in new_objects.items() if d not in old_objects}


def test_most_content_changes_patch():
    """Rewriting files with new content, later mtimes and the same sizes patches nearly always."""
    patched = 0
    for seed in range(200):
        spec = _spec(seed)
        rng = random.Random(f"changes {seed}")  # not the spec's sequence: new digests must be new
        unique = [p for p, n in spec.items()
                  if n.digest is not None and sum(m.digest == n.digest for m in spec.values()) == 1]
        if not unique:
            continue
        build_time = min((n.mtime_sec, n.mtime_nsec) for n in spec.values())
        changes = {}
        for path in rng.sample(unique, min(3, len(unique))):
            if (spec[path].mtime_sec, spec[path].mtime_nsec) == build_time:
                continue  # the build time might move
            node = detached(spec[path])
            node.digest = rng.randbytes(32)
            node.payload = object_path(node.digest).encode()
            node.mtime_sec = 500
            changes[path] = node
        if not changes:
            continue
        result = patch_image(build_image(_build(spec)), changes, _objects(spec).__contains__)
        assert result is not None, seed
        assert bytes(result.image) == build_image(_build({**spec, **changes}))
        patched += 1
    assert patched > 100


def _one_file_tree(**file_fields) -> tuple[dict[bytes, Node], Node]:
    digest = bytes(range(32))
    spec = {
        b"/": Node(mtime_sec=100),
        b"/a": Node(mode=stat.S_IFREG | 0o644, size=5000, digest=digest,
                    payload=object_path(digest).encode(), mtime_sec=200),
        b"/b": Node(mode=stat.S_IFREG | 0o644, size=5000, digest=bytes(32),
                    payload=object_path(bytes(32)).encode(), mtime_sec=200),
    }
    new = detached(spec[b"/a"])
    for name, value in file_fields.items():
        setattr(new, name, value)
    if new.digest is not None:
        new.payload = object_path(new.digest).encode()
    return spec, new


@pytest.mark.parametrize("fields, patches", [
    ({"digest": b"\1" * 32, "mtime_sec": 300}, True),
    ({"digest": b"\1" * 32, "size": 70000}, True),
    ({"digest": bytes(32)}, False),  # the content of /b: its xattrs would become shared
    ({"mtime_sec": 50}, False),  # before the build time
    ({"mtime_sec": 100}, False),  # now at the build time: compact
    ({"mode": stat.S_IFREG | 0o600}, False),
    ({"uid": 1}, False),
    ({"xattrs": {b"user.new": b"1"}}, False),
    ({"size": 10, "content": b"0123456789", "digest": None}, False),  # external to inline
])
def test_refusals(fields, patches):
    spec, new = _one_file_tree(**fields)
    old_image = build_image(_build(spec))
    result = patch_image(old_image, {b"/a": new}, _objects(spec).__contains__)
    assert (result is not None) == patches
    if patches:
        assert bytes(result.image) == build_image(_build({**spec, b"/a": new}))


def test_root_and_unknown_paths_are_refused():
    spec, new = _one_file_tree(digest=b"\1" * 32)
    image = build_image(_build(spec))
    assert patch_image(image, {b"/": spec[b"/"]}, lambda d: False) is None
    assert patch_image(image, {b"/nope": new}, lambda d: False) is None
    assert patch_image(image, {b"/a/x": new}, lambda d: False) is None
    assert patch_image(b"junk" * 2000, {b"/a": new}, lambda d: False) is None
