"""The digest cache: unchanged entries are not read, and the cache is never trusted blindly.

Real files throughout.  A hit is proved to skip reading by planting a wrong
value (digest, xattrs, symlink target, inline content) for an entry's exact
key: had the scan read the entry it would have found the right one.
"""

from __future__ import annotations

import errno
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from aptlayer import inventory
from aptlayer.composefs import fsverity, reader
from aptlayer.composefs.build import render
from aptlayer.composefs.digestcache import DigestCache, key_of, lstat_of
from aptlayer.composefs.objectstore import ObjectStore
from aptlayer.composefs.lstatwalk import walk
from aptlayer.composefs.scan import ScanError, scan, scan_entries
from aptlayer.builder.strategies import manifest_of
from aptlayer.linux import fsops
from aptlayer.store import CreateOptions, Store

FAKE = bytes(range(32))


def make_tree(root: Path, n: int = 40) -> Path:
    (root / "sub").mkdir(parents=True)
    for i in range(n):
        (root / f"f{i:02}").write_bytes(os.urandom(100 + 997 * i))
        (root / "sub" / f"same{i:02}").write_bytes(b"shared content\n" * 20)
        (root / "sub" / f"tiny{i:02}").write_bytes(b"x" * (i % 60))
    os.symlink("f00", root / "link")
    os.setxattr(root / "f01", "user.label", b"one")
    return root


def fingerprint(source: Path, settled_before_ns: int, **options: bool) -> bytes | None:
    """The fingerprint a walk of ``source`` gives."""
    walked = walk(source, settled_before_ns, **options)
    return None if walked is None else walked.fingerprint


def digests(root) -> dict[bytes, bytes]:
    return {p: n.digest for p, n in root.walk() if n.digest is not None}


def nodes(root) -> dict[bytes, object]:
    return dict(root.walk())


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    return make_tree(tmp_path / "tree")


def cache_at(tmp_path: Path) -> DigestCache:
    """A cache that saves every entry (no settling time: the files were all written before it)."""
    return DigestCache(tmp_path / "cache" / "digests", settle_ns=0)


def cached_scan(source: Path, tmp_path: Path, **kw):
    """Scan with the cache at ``tmp_path`` and save it, as the Store does."""
    cache = cache_at(tmp_path)
    result = scan(source, cache=cache, **kw)
    cache.save()
    return result


def plant(tmp_path: Path, path: Path, digest=None, xattrs=(), data=None) -> None:
    cache = cache_at(tmp_path)
    cache.put(os.lstat(path), (digest, xattrs, data))
    cache.save()


@contextmanager
def settled_store(tmp_path: Path, n: int) -> Iterator[tuple[Path, Store]]:
    """A tree of ``n`` files past the cache's settling time (so it gets a fingerprint), and a Store."""
    src = make_tree(tmp_path / "src", n=n)
    time.sleep(2.1)
    store = Store.open(tmp_path / "root")
    try:
        yield src, store
    finally:
        store.close()


def test_round_trip_keeps_every_entry(tree: Path, tmp_path: Path) -> None:
    first = cached_scan(tree, tmp_path)
    cache = cache_at(tmp_path)
    assert len(cache) == first.stats.entries == 123
    digest, xattrs, data = cache.get(key_of(os.lstat(tree / "f05")))
    assert digest == fsverity.digest_file(tree / "f05") and xattrs == () and data is None
    assert cache.get(key_of(os.lstat(tree / "f01")))[1] == ((b"user.label", b"one"),)
    assert cache.get(key_of(os.lstat(tree / "link")))[2] == b"f00"
    assert cache.get(key_of(os.lstat(tree / "sub" / "tiny07")))[2] == b"x" * 7


def test_digest_hit_skips_reading(tree: Path, tmp_path: Path) -> None:
    plant(tmp_path, tree / "f07", digest=FAKE)
    got = digests(cached_scan(tree, tmp_path).root)
    assert got[b"/f07"] == FAKE  # taken from the cache: the file was not read
    assert got[b"/f08"] == fsverity.digest_file(tree / "f08")


@pytest.mark.parametrize("what", ["xattrs", "symlink", "inline"])
def test_other_hits_skip_reading(tree: Path, tmp_path: Path, what: str) -> None:
    path, entry, check = {
        "xattrs": (tree / "f02", (None, ((b"user.planted", b"p"),), None),
                   lambda n: n.xattrs == {b"user.planted": b"p"}),
        "symlink": (tree / "link", (None, (), b"elsewhere"), lambda n: n.payload == b"elsewhere"),
        "inline": (tree / "sub" / "tiny09", (None, (), b"y" * 9), lambda n: n.content == b"y" * 9),
    }[what]
    if what == "xattrs":  # the digest is needed too, or the file is read again
        entry = (fsverity.digest_file(path), *entry[1:])
    plant(tmp_path, path, *entry)
    got = nodes(cached_scan(tree, tmp_path).root)
    assert check(got[b"/" + str(path.relative_to(tree)).encode()])


def test_hit_whose_object_is_missing_is_reimported(tree: Path, tmp_path: Path) -> None:
    store = ObjectStore(tmp_path / "store", batch=True)
    cached_scan(tree, tmp_path, store=store)
    store.sync()
    lost = ObjectStore(tmp_path / "store").path_of(fsverity.digest_file(tree / "f09"))
    os.unlink(lost)
    store = ObjectStore(tmp_path / "store", batch=True)
    again = cached_scan(tree, tmp_path, store=store)
    store.sync()
    assert (again.stats.objects_created, again.stats.objects_deduped) == (1, 79)
    assert Path(lost).read_bytes() == (tree / "f09").read_bytes()


def test_wrong_entry_with_missing_object_is_corrected(tree: Path, tmp_path: Path) -> None:
    """A hit is checked against the store; a re-import hashes the file and the computed digest wins."""
    plant(tmp_path, tree / "f07", digest=FAKE)
    store = ObjectStore(tmp_path / "store", batch=True)
    got = digests(cached_scan(tree, tmp_path, store=store).root)
    store.sync()
    real = fsverity.digest_file(tree / "f07")
    assert got[b"/f07"] == real and store.has(real)
    assert cache_at(tmp_path).get(key_of(os.lstat(tree / "f07")))[0] == real


def test_changed_ctime_misses(tree: Path, tmp_path: Path) -> None:
    cached_scan(tree, tmp_path)
    path = tree / "f11"
    before = os.lstat(path)
    new = os.urandom(before.st_size)
    path.write_bytes(new)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))  # same size and mtime: only ctime moved
    after = os.lstat(path)
    assert (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns)
    assert after.st_ctime_ns != before.st_ctime_ns
    got = digests(cached_scan(tree, tmp_path).root)
    assert got[b"/f11"] == fsverity.digest_bytes(new)


def test_changed_xattr_is_seen(tree: Path, tmp_path: Path) -> None:
    cached_scan(tree, tmp_path)
    os.setxattr(tree / "f01", "user.label", b"two")
    assert nodes(cached_scan(tree, tmp_path).root)[b"/f01"].xattrs == {b"user.label": b"two"}


def test_racy_entries_are_not_saved(tmp_path: Path) -> None:
    """A file changed within the settling time could change again unseen: it is not cached."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "old").write_bytes(b"o" * 100)
    time.sleep(0.05)
    cache = DigestCache(tmp_path / "digests", settle_ns=20_000_000)
    (src / "new").write_bytes(b"n" * 100)
    scan(src, cache=cache)
    assert fingerprint(src, cache.settled_before_ns) is None
    cache.save()
    saved = DigestCache(tmp_path / "digests")
    assert saved.get(key_of(os.lstat(src / "old"))) is not None
    assert saved.get(key_of(os.lstat(src / "new"))) is None
    assert cache.get(key_of(os.lstat(src / "new"))) is not None  # known to the object that read it


@pytest.mark.parametrize("damage", ["truncate", "flip", "garbage", "empty"])
def test_damaged_cache_is_ignored_and_rebuilt(tree: Path, tmp_path: Path, damage: str) -> None:
    cached_scan(tree, tmp_path)
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
    got = digests(cached_scan(tree, tmp_path).root)
    assert got == digests(scan(tree).root)
    assert len(cache_at(tmp_path)) == 123


def test_only_the_entries_of_the_last_scan_are_kept(tree: Path, tmp_path: Path) -> None:
    cached_scan(tree, tmp_path)
    gone = os.lstat(tree / "f03")
    os.unlink(tree / "f03")
    cached_scan(tree, tmp_path)
    cache = cache_at(tmp_path)
    assert len(cache) == 122 and cache.get(key_of(gone)) is None


def test_images_identical_with_and_without_cache_and_threads(tree: Path, tmp_path: Path) -> None:
    plain = render(scan(tree).root)[0]
    for threads in (1, 4, 2, 1):  # cold cache, then warm
        store = ObjectStore(tmp_path / f"store{threads}", batch=True)
        assert render(cached_scan(tree, tmp_path, store=store, threads=threads).root)[0] == plain
        store.sync()
    assert render(scan(tree, threads=3).root)[0] == plain


def test_xattr_options_with_a_shared_cache(tree: Path, tmp_path: Path) -> None:
    """What one option set cached never leaks into another's tree."""
    os.setxattr(tree / "f04", "trusted.other", b"t")
    want = {tuple(o): render(scan(tree, **o).root)[0] for o in ({}, {"user_xattrs": True}, {"skip_xattrs": True})}
    for order in (("skip", "all", "user"), ("user", "skip", "all"), ("all", "user", "skip")):
        (tmp_path / "cache" / "digests").unlink(missing_ok=True)
        for name in order:
            opt = {"all": {}, "user": {"user_xattrs": True}, "skip": {"skip_xattrs": True}}[name]
            assert render(cached_scan(tree, tmp_path, **opt).root)[0] == want[tuple(opt)], (order, name)


def test_fingerprint_names_the_tree(tree: Path, tmp_path: Path) -> None:
    """Every kind of change a scan would see gives a new fingerprint; a scan changes nothing."""
    fp = fingerprint(tree, time.time_ns())
    assert fp is not None and fingerprint(tree, time.time_ns()) == fp
    cached_scan(tree, tmp_path)
    assert fingerprint(tree, time.time_ns()) == fp
    options = [{"use_epoch": True}, {"skip_xattrs": True}, {"user_xattrs": True}, {"skip_devices": True}]
    assert len({fp} | {fingerprint(tree, time.time_ns(), **o) for o in options}) == 5
    assert fingerprint(tree, os.lstat(tree / "f09").st_ctime_ns) is None  # f09 has not settled by then
    seen = {fp}
    for change in (
        lambda: (tree / "f05").write_bytes(b"new content" * 20),
        lambda: os.chmod(tree / "f06", 0o600),
        lambda: os.setxattr(tree / "sub", "user.x", b"1"),
        lambda: os.rename(tree / "f07", tree / "f07b"),
        lambda: (tree / "sub" / "added").write_bytes(b""),
        lambda: os.unlink(tree / "sub" / "tiny03"),
        lambda: os.utime(tree / "f08", ns=(0, 0)),
    ):
        time.sleep(0.01)
        change()
        fp = fingerprint(tree, time.time_ns())
        assert fp is not None and fp not in seen
        seen.add(fp)


def test_scan_takes_the_fingerprint_walks_listings(tree: Path, tmp_path: Path) -> None:
    """The walk lists every directory, settled or not, and a scan given its listings reads the same tree."""
    plain = render(scan(tree).root)[0]
    for limit in (time.time_ns(), 0):  # settled, then nothing settled: the walk goes on for the listings
        walked = walk(tree, limit)
        assert (walked.fingerprint is None) == (limit == 0)
        assert len(walked.listing(b"/")) == 42 and len(walked.listing(b"/sub/")) == 80
        assert walked.listing(b"/f00") is None and walked.listing(b"/nowhere/") is None
        assert render(scan(tree, walked=walked).root)[0] == plain
        # every entry has its key, b"" where it had not settled
        assert len(walked.keys) == walked.stats.entries
        assert walked.stats == scan(tree).stats  # entries, files, bytes, external files
        assert all(key == b"" for key in walked.keys.values()) == (limit == 0)


def test_store_reuses_the_image_of_an_unchanged_tree(tmp_path: Path) -> None:
    """Same fingerprint: the live image with the remembered digest is linked, once its bytes check out."""
    with settled_store(tmp_path, n=10) as (src, store):
        opts = CreateOptions(backend="python")
        first = store.create(str(src), "one", opts)
        assert first["reused"] is None
        second = store.create(str(src), "two", opts)
        assert second["reused"] == "one" and second["digest"] == first["digest"]
        good = store.image_path("one").read_bytes()
        assert store.image_path("two").read_bytes() == good
        assert store.image_path("two").stat().st_ino == store.image_path("one").stat().st_ino
        # Deleting one name leaves the other whole.
        store.delete("one")
        assert store.image_path("two").read_bytes() == good and store.image_path("two").stat().st_nlink == 1
        # A live image whose bytes no longer match is not reused: the tree is rendered again.
        store.image_path("two").write_bytes(good[:-1] + bytes([good[-1] ^ 0xFF]))
        third = store.create(str(src), "three", opts)
        assert third["reused"] is None and third["digest"] == first["digest"]
        assert store.image_path("three").read_bytes() == good
        # A different version option is a different image: not the remembered one.
        fourth = store.create(str(src), "four", CreateOptions(backend="python", min_version=1))
        assert fourth["reused"] is None and fourth["digest"] != first["digest"]


def test_reused_image_is_copied_where_the_file_system_cannot_link(tmp_path: Path, monkeypatch) -> None:
    with settled_store(tmp_path, n=10) as (src, store):
        opts = CreateOptions(backend="python")
        first = store.create(str(src), "one", opts)

        def cross_device(src, dst):
            raise OSError(errno.EXDEV, os.strerror(errno.EXDEV))

        monkeypatch.setattr(fsops, "link", cross_device)
        second = store.create(str(src), "two", opts)
        assert second["reused"] == "one" and second["digest"] == first["digest"]
        assert store.image_path("two").read_bytes() == store.image_path("one").read_bytes()
        assert store.image_path("two").stat().st_ino != store.image_path("one").stat().st_ino

        def refused(src, dst):
            raise OSError(errno.EACCES, os.strerror(errno.EACCES))

        monkeypatch.setattr(fsops, "link", refused)  # not a file system without links: an error
        with pytest.raises(Exception, match="Permission denied"):
            store.create(str(src), "three", opts)
        assert "three" not in {i["name"] for i in inventory.images(store)}


def test_reused_image_in_a_transaction_keeps_the_journal_whole(tmp_path: Path) -> None:
    """A reused image's event takes the manifest already recorded; the chain and the projection verify."""
    with settled_store(tmp_path, n=10) as (src, store):
        opts = CreateOptions(backend="python")
        first = store.create(str(src), "one", opts)
        tx = store.tx_begin()
        staged = store.create(str(src), "two", opts, tx=tx)
        assert staged["reused"] == "one" and staged["objects"] == first["objects"]
        store.tx_commit(tx)
        assert store.journal.manifest(first["digest"]) and store.journal.verify() > 0
        assert store.journal.check() == []
        assert inventory.image_info(store, "two")["objects"] == first["objects"]


def test_store_create_uses_the_cache(tmp_path: Path) -> None:
    """The Store keeps its cache in ROOT/cache/digests: a planted entry whose object exists is used."""
    src = make_tree(tmp_path / "src", n=10)
    store = Store.open(tmp_path / "root")
    try:
        opts = CreateOptions(backend="python", threads=2)
        first = store.create(str(src), "one", opts)
        planted = DigestCache(tmp_path / "root" / "cache" / "digests", settle_ns=0)
        planted.put(os.lstat(src / "f04"), (FAKE, (), None))
        planted.save()
        fake_object = Path(ObjectStore(store.objects_dir).path_of(FAKE))
        fake_object.parent.mkdir(exist_ok=True)
        fake_object.write_bytes(b"stands in for f04".ljust((src / "f04").stat().st_size, b"."))  # of its size
        second = store.create(str(src), "two", opts)
        objects = set(reader.image_objects((tmp_path / "root" / "images" / "two.composefs").read_bytes()))
    finally:
        store.close()
    assert second["digest"] != first["digest"]
    assert fsverity.object_path(FAKE).encode() in objects


def test_store_patches_the_last_image_when_a_few_files_changed(tmp_path: Path) -> None:
    """A few files rewritten: just they are read, the last image patched; bytes as a full render's."""
    with settled_store(tmp_path, n=40) as (src, store):  # 163 entries: up to 16 may change
        opts = CreateOptions(backend="python")
        first = store.create(str(src), "one", opts)
        for name in ("f03", "f07"):  # unique content, new content, same size
            (src / name).write_bytes(os.urandom((src / name).stat().st_size))
        (src / "sub" / "tiny05").write_bytes(b"y" * 5)  # inline content, same size
        second = store.create(str(src), "two", opts)
        assert second["patched"] == {"from": "one", "changed": 3}
        assert store.image_path("two").read_bytes() == render(scan(src).root)[0]
        assert second["objects"] == first["objects"]  # two objects out, two in
        assert second["objects_created"] == 2 and second["files"] == first["files"]
        assert store.journal.verify() > 0 and store.journal.check() == []
        assert store.journal.manifest(second["digest"]) == manifest_of(scan(src).root)
        # The changed files have not settled: the next build reads them again, and patches again.
        (src / "f09").write_bytes(os.urandom((src / "f09").stat().st_size))
        third = store.create(str(src), "three", opts)
        assert third["patched"] == {"from": "two", "changed": 4}
        assert store.image_path("three").read_bytes() == render(scan(src).root)[0]


def test_store_renders_when_the_patch_cannot_be_made(tmp_path: Path, monkeypatch) -> None:
    """Content another file shares, a tampered last image, a new file: the tree is rendered."""
    hashed = []
    real_digest_fd = fsverity.digest_fd
    monkeypatch.setattr(fsverity, "digest_fd", lambda fd, size: hashed.append(size) or real_digest_fd(fd, size))
    with settled_store(tmp_path, n=40) as (src, store):
        opts = CreateOptions(backend="python")
        store.create(str(src), "one", opts)
        (src / "sub" / "same03").write_bytes(b"other content\n" * 20)  # its old xattrs were shared
        hashed.clear()
        two = store.create(str(src), "two", opts)
        assert two["patched"] is None
        assert hashed == [280]  # read by the refused patch; the render took it from the cache
        assert two["objects_created"] == 1
        assert store.image_path("two").read_bytes() == render(scan(src).root)[0]
        good = store.image_path("two").read_bytes()
        store.image_path("two").write_bytes(good[:-1] + bytes([good[-1] ^ 0xFF]))
        (src / "f04").write_bytes(os.urandom((src / "f04").stat().st_size))
        three = store.create(str(src), "three", opts)
        assert three["patched"] is None
        assert store.image_path("three").read_bytes() == render(scan(src).root)[0]
        (src / "new").write_bytes(b"a new file, a new layout\n" * 4)
        four = store.create(str(src), "four", opts)
        assert four["patched"] is None
        assert store.image_path("four").read_bytes() == render(scan(src).root)[0]
        assert store.journal.verify() > 0 and store.journal.check() == []


def test_changed_since_and_scan_entries(tree: Path) -> None:
    """Two walks tell the changed entries; scan_entries reads them as a scan does, and checks them."""
    before = walk(tree, time.time_ns())
    assert before.changed_since(before.state) == []
    (tree / "f05").write_bytes(os.urandom(300))
    os.setxattr(tree / "sub" / "tiny02", "user.x", b"1")
    after = walk(tree, 0)  # nothing settled: every key is b"", every entry changed
    assert after.changed_since(before.state) == sorted(after.keys)
    after = walk(tree, time.time_ns() + 10**10)
    changed = after.changed_since(before.state)
    assert set(changed) == {b"/f05", b"/sub/tiny02"}
    nodes, stats = scan_entries(tree, after, changed)
    full = dict(scan(tree).root.walk())
    for path, node in nodes.items():
        assert (node.mode, node.size, node.digest, node.content, node.xattrs) == (
            full[path].mode, full[path].size, full[path].digest, full[path].content, full[path].xattrs)
    assert stats.files == 2
    (tree / "later").write_bytes(b"1")
    assert walk(tree, 0).changed_since(after.state) is None  # a path came: not a few changes
    for junk in (None, b"state", ("a", "b", "c", "d"), (b"", {b"/": 1}, [], [])):  # not a walk's
        assert after.changed_since(junk) is None
    (tree / "f05").write_bytes(os.urandom(301))  # no longer the file the walk saw
    with pytest.raises(ScanError, match="changed during the scan"):
        scan_entries(tree, after, [b"/f05"])


def test_keys_hold_times_past_2262(tmp_path: Path) -> None:
    """Nanoseconds since 1970 overflow 64 bits in 2262; ext4 keeps times to 2446.  Such a tree is
    walked, cached and rebuilt like any other (it once stopped the Store with a struct error)."""
    src = make_tree(tmp_path / "src", n=4)
    far = 10**19 + 123  # 2286
    os.utime(src / "f01", ns=(far, far))
    os.utime(src / "sub", ns=(-(10**18), -(10**18)))  # 1938
    st = os.lstat(src / "f01")
    assert st.st_mtime_ns == far, "the file system keeps the time"
    assert lstat_of(key_of(st)) == tuple(getattr(st, f) for f in lstat_of(key_of(st))._fields)
    assert lstat_of(key_of(os.lstat(src / "sub"))).st_mtime_ns == -(10**18)
    walked = walk(src, time.time_ns())
    assert walked is not None and walked.keys[b"/f01"] == key_of(st)
    time.sleep(2.1)
    store = Store.open(tmp_path / "root")
    try:
        first = store.create(str(src), "one", CreateOptions(backend="python"))
        again = store.create(str(src), "two", CreateOptions(backend="python"))
        assert again["reused"] == "one" and again["digest"] == first["digest"]
        assert render(scan(src).root)[1].hex() == first["digest"]
    finally:
        store.close()
