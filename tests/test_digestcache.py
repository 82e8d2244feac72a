"""The digest cache: unchanged files are not read, and the cache is never trusted blindly.

Real files throughout.  A hit is proved to skip reading by planting a wrong
digest for a file's exact stat key: if the scan read the file it would
compute the right one.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from aptlayer.composefs import fsverity, reader
from aptlayer.composefs.build import render
from aptlayer.composefs.digestcache import DigestCache
from aptlayer.composefs.objectstore import ObjectStore
from aptlayer.composefs.scan import scan
from aptlayer.store import CreateOptions, Store

FAKE = bytes(range(32))


def make_tree(root: Path, n: int = 40) -> Path:
    (root / "sub").mkdir(parents=True)
    for i in range(n):
        (root / f"f{i:02}").write_bytes(os.urandom(100 + 997 * i))
        (root / "sub" / f"same{i:02}").write_bytes(b"shared content\n" * 20)
        (root / "sub" / f"tiny{i:02}").write_bytes(b"x" * (i % 60))
    os.symlink("f00", root / "link")
    return root


def digests(root) -> dict[bytes, bytes]:
    return {p: n.digest for p, n in root.walk() if n.digest is not None}


def image(source: Path, **kw) -> bytes:
    return render(scan(source, **kw).root)[0]


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    return make_tree(tmp_path / "tree")


def cache_at(tmp_path: Path) -> DigestCache:
    """A cache that saves every entry (no settling time: the files were all written before it)."""
    return DigestCache(tmp_path / "cache" / "digests", settle_ns=0)


def test_round_trip(tree: Path, tmp_path: Path) -> None:
    first = scan(tree, cache=cache_at(tmp_path))
    cache = cache_at(tmp_path)
    assert len(cache) == first.stats.external == 80
    assert cache.get(os.lstat(tree / "f05")) == fsverity.digest_file(tree / "f05")


def test_hit_skips_reading(tree: Path, tmp_path: Path) -> None:
    cache = cache_at(tmp_path)
    cache.put(os.lstat(tree / "f07"), FAKE)
    cache.save()
    got = digests(scan(tree, cache=cache_at(tmp_path)).root)
    assert got[b"/f07"] == FAKE  # taken from the cache: the file was not read
    assert got[b"/f08"] == fsverity.digest_file(tree / "f08")


def test_hit_whose_object_is_missing_is_reimported(tree: Path, tmp_path: Path) -> None:
    store = ObjectStore(tmp_path / "store", batch=True)
    scan(tree, store=store, cache=cache_at(tmp_path))
    store.sync()
    lost = ObjectStore(tmp_path / "store").path_of(fsverity.digest_file(tree / "f09"))
    os.unlink(lost)
    store = ObjectStore(tmp_path / "store", batch=True)
    again = scan(tree, store=store, cache=cache_at(tmp_path))
    store.sync()
    assert (again.stats.objects_created, again.stats.objects_deduped) == (1, 79)
    assert Path(lost).read_bytes() == (tree / "f09").read_bytes()


def test_wrong_entry_with_missing_object_is_corrected(tree: Path, tmp_path: Path) -> None:
    """A hit is checked against the store; a re-import hashes the file and the computed digest wins."""
    cache = cache_at(tmp_path)
    cache.put(os.lstat(tree / "f07"), FAKE)
    cache.save()
    store = ObjectStore(tmp_path / "store", batch=True)
    got = digests(scan(tree, store=store, cache=cache_at(tmp_path)).root)
    store.sync()
    real = fsverity.digest_file(tree / "f07")
    assert got[b"/f07"] == real and store.has(real)
    assert cache_at(tmp_path).get(os.lstat(tree / "f07")) == real


def test_changed_ctime_misses(tree: Path, tmp_path: Path) -> None:
    scan(tree, cache=cache_at(tmp_path))
    path = tree / "f11"
    before = os.lstat(path)
    new = os.urandom(before.st_size)
    path.write_bytes(new)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))  # same size and mtime: only ctime moved
    after = os.lstat(path)
    assert (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns)
    assert after.st_ctime_ns != before.st_ctime_ns
    got = digests(scan(tree, cache=cache_at(tmp_path)).root)
    assert got[b"/f11"] == fsverity.digest_bytes(new)


def test_racy_entries_are_not_saved(tmp_path: Path) -> None:
    """A file changed within the settling time could change again unseen: it is not cached."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "old").write_bytes(b"o" * 100)
    time.sleep(0.05)
    cache = DigestCache(tmp_path / "digests", settle_ns=20_000_000)
    (src / "new").write_bytes(b"n" * 100)
    scan(src, cache=cache)
    saved = DigestCache(tmp_path / "digests")
    assert saved.get(os.lstat(src / "old")) is not None
    assert saved.get(os.lstat(src / "new")) is None


@pytest.mark.parametrize("damage", ["truncate", "flip", "garbage", "empty"])
def test_damaged_cache_is_ignored_and_rebuilt(tree: Path, tmp_path: Path, damage: str) -> None:
    scan(tree, cache=cache_at(tmp_path))
    path = tmp_path / "cache" / "digests"
    data = bytearray(path.read_bytes())
    if damage == "truncate":
        data = data[: len(data) - 50]
    elif damage == "flip":
        data[len(data) // 2] ^= 0x01
    elif damage == "garbage":
        data = bytearray(os.urandom(len(data)))
    else:
        data = bytearray()
    path.write_bytes(bytes(data))
    assert len(cache_at(tmp_path)) == 0
    got = digests(scan(tree, cache=cache_at(tmp_path)).root)
    assert got == digests(scan(tree).root)
    assert len(cache_at(tmp_path)) == 80


def test_only_the_files_of_the_last_scan_are_kept(tree: Path, tmp_path: Path) -> None:
    scan(tree, cache=cache_at(tmp_path))
    gone = os.lstat(tree / "f03")
    os.unlink(tree / "f03")
    scan(tree, cache=cache_at(tmp_path))
    cache = cache_at(tmp_path)
    assert len(cache) == 79 and cache.get(gone) is None


def test_images_identical_with_and_without_cache_and_threads(tree: Path, tmp_path: Path) -> None:
    plain = image(tree)
    for n, threads in enumerate((1, 4, 2, 1)):  # cold cache, then warm
        store = ObjectStore(tmp_path / f"store{threads}", batch=True)
        assert image(tree, store=store, cache=cache_at(tmp_path), threads=threads) == plain
        store.sync()
    assert image(tree, threads=3) == plain


def test_store_create_uses_the_cache(tmp_path: Path) -> None:
    """The Store keeps its cache in ROOT/cache/digests: a planted entry whose object exists is used."""
    src = make_tree(tmp_path / "src", n=10)
    store = Store.open(tmp_path / "root")
    try:
        opts = CreateOptions(backend="python", threads=2)
        first = store.create(str(src), "one", opts)
        planted = DigestCache(tmp_path / "root" / "cache" / "digests", settle_ns=0)
        planted.put(os.lstat(src / "f04"), FAKE)
        planted.save()
        fake_object = Path(ObjectStore(store.objects_dir).path_of(FAKE))
        fake_object.parent.mkdir(exist_ok=True)
        fake_object.write_bytes(b"stands in for f04")
        second = store.create(str(src), "two", opts)
        objects = set(reader.image_objects((tmp_path / "root" / "images" / "two.composefs").read_bytes()))
    finally:
        store.close()
    assert second["digest"] != first["digest"]
    assert fsverity.object_path(FAKE).encode() in objects
