"""The digest store: layout, dedupe, durability order, refusals, listings."""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

import pytest

from aptlayer.composefs import fsverity
from aptlayer.composefs import objectstore
from aptlayer.composefs.objectstore import (
    ObjectStore,
    SourceChanged,
    UnsupportedSource,
)
from aptlayer.linux import fsops, verity


@pytest.fixture
def recorded(monkeypatch):
    ops: list[tuple[str, tuple]] = []
    monkeypatch.setattr(fsops, "recorder", lambda op, args: ops.append((op, args)))
    return ops


def make(tmp_path: Path, name: str, data: bytes) -> Path:
    p = tmp_path / name
    p.write_bytes(data)
    return p


def test_import_creates_object(tmp_path: Path) -> None:
    data = os.urandom(10_000)
    src = make(tmp_path, "src", data)
    os.chmod(src, 0o700)
    store = ObjectStore(tmp_path / "store")
    r = store.import_file(src)
    digest = fsverity.digest_bytes(data)
    assert r.digest == digest and r.created and r.size == len(data)
    assert r.path == str(tmp_path / "store" / fsverity.object_path(digest))
    assert Path(r.path).read_bytes() == data
    st = os.lstat(r.path)
    assert stat.S_IMODE(st.st_mode) == 0o644 and st.st_ino != os.stat(src).st_ino
    assert store.has(digest) and store.path_of(digest) == r.path
    assert not list(store.iter_temp_files())


def test_dedupe_hit_refreshes_mtime(tmp_path: Path) -> None:
    store = ObjectStore(tmp_path / "store")
    first = store.import_file(make(tmp_path, "a", b"same" * 100))
    os.utime(first.path, ns=(1_000_000_000, 1_000_000_000))
    ino = os.stat(first.path).st_ino
    again = store.import_file(make(tmp_path, "b", b"same" * 100))
    assert (again.digest, again.path, again.created) == (first.digest, first.path, False)
    st = os.stat(first.path)
    assert st.st_ino == ino  # not rewritten
    assert st.st_mtime_ns > 1_000_000_000


def test_dedupe_hit_with_known_digest_does_not_read(tmp_path: Path) -> None:
    store = ObjectStore(tmp_path / "store")
    r = store.import_file(make(tmp_path, "a", b"x" * 100))
    other = make(tmp_path, "b", b"y" * 100)  # same size, other bytes: the digest is trusted
    assert not store.import_file(other, digest=r.digest).created


def test_import_from_fd(tmp_path: Path) -> None:
    src = make(tmp_path, "a", b"fd" * 5000)
    store = ObjectStore(tmp_path / "store")
    fd = os.open(src, os.O_RDONLY)
    try:
        r = store.import_file(fd)
        os.fstat(fd)  # still open: the fd stays the caller's
    finally:
        os.close(fd)
    assert Path(r.path).read_bytes() == src.read_bytes()


def test_symlink_refused_not_followed(tmp_path: Path) -> None:
    make(tmp_path, "target", b"t" * 100)
    (tmp_path / "link").symlink_to("target")
    store = ObjectStore(tmp_path / "store")
    with pytest.raises(UnsupportedSource, match="symbolic link"):
        store.import_file(tmp_path / "link")
    assert not (tmp_path / "store").exists()


@pytest.mark.parametrize("kind", ["dir", "fifo"])
def test_non_regular_refused(tmp_path: Path, kind: str) -> None:
    p = tmp_path / kind
    if kind == "dir":
        p.mkdir()
    else:
        os.mkfifo(p)  # must not block on open
    with pytest.raises(UnsupportedSource, match="not a regular file"):
        ObjectStore(tmp_path / "store").import_file(p)


def test_verity_reported_not_fatal(tmp_path: Path) -> None:
    store = ObjectStore(tmp_path / "store")
    r = store.import_file(make(tmp_path, "a", b"v" * 100))
    if verity.supported(tmp_path):
        assert r.verity and r.verity_error is None
    else:
        assert not r.verity
        assert "not supported" in r.verity_error
        assert fsverity.measure_file(r.path) == r.digest  # computed instead


def test_durability_order(tmp_path: Path, recorded) -> None:
    store = ObjectStore(tmp_path / "store")
    r = store.import_file(make(tmp_path, "a", b"d" * 5000))
    ops = [op for op, _ in recorded]
    root, fan = str(tmp_path / "store"), os.path.dirname(r.path)
    tmp = recorded[ops.index("create")][1][0]
    assert os.path.basename(tmp).startswith(".tmp-") and f"-{os.getpid()}-" in tmp
    assert recorded.index(("mkdir", (root, 0o755))) < recorded.index(("fsync", (str(tmp_path),)))
    i_fsync_file = recorded.index(("fsync", (tmp,)))
    i_chmod = recorded.index(("chmod", (tmp, 0o644)))
    i_rename = recorded.index(("rename", (tmp, r.path)))
    assert i_chmod < i_fsync_file < i_rename
    assert recorded.index(("mkdir", (fan, 0o755))) < recorded.index(("fsync", (root,))) < i_rename
    assert recorded[-1] == ("fsync", (fan,))
    assert any(op in ("clone", "write") for op in ops[:i_fsync_file])


def test_batch_durability_order(tmp_path: Path, recorded) -> None:
    """Batch: every copy, one syncfs, the renames, one syncfs; nothing is named before its data is durable."""
    store = ObjectStore(tmp_path / "store", batch=True)
    a = store.import_file(make(tmp_path, "a", b"d" * 5000))
    again = store.import_file(make(tmp_path, "a2", b"d" * 5000))
    b = store.import_file(make(tmp_path, "b", b"e" * 5000))
    assert a.created and b.created and not again.created and again.path == a.path
    assert not os.path.exists(a.path) and not os.path.exists(b.path)
    temps = [args[0] for op, args in recorded if op == "create"]
    assert len(temps) == 2 and all(os.path.exists(t) for t in temps)
    assert not [op for op, _ in recorded if op in ("fsync", "syncfs", "rename")]
    recorded.clear()
    store.sync()
    root = str(tmp_path / "store")
    ops = [op for op, _ in recorded]
    assert ops[0] == "syncfs" and ops[-1] == "syncfs" and ops.count("syncfs") == 2
    assert sorted(args for op, args in recorded if op == "rename") == sorted(zip(temps, [a.path, b.path]))
    assert all(args == (root,) for op, args in recorded if op == "syncfs")
    assert Path(a.path).read_bytes() == b"d" * 5000 and Path(b.path).read_bytes() == b"e" * 5000
    assert not list(store.iter_temp_files())
    recorded.clear()
    store.sync()
    assert recorded == []  # nothing new: no syncfs


def test_batch_commits_when_full(tmp_path: Path, monkeypatch, recorded) -> None:
    monkeypatch.setattr(objectstore, "BATCH_OBJECTS", 2)
    store = ObjectStore(tmp_path / "store", batch=True)
    made = [store.import_file(make(tmp_path, str(n), bytes([65 + n]) * 100)) for n in range(3)]
    assert [os.path.exists(r.path) for r in made] == [True, True, False]
    assert [op for op, _ in recorded].count("syncfs") == 1
    store.sync()
    assert all(os.path.exists(r.path) for r in made)


def test_batch_discard(tmp_path: Path) -> None:
    store = ObjectStore(tmp_path / "store", batch=True)
    r = store.import_file(make(tmp_path, "a", b"f" * 500))
    assert list(store.iter_temp_files())
    store.discard()
    assert not list(store.iter_temp_files()) and not os.path.exists(r.path)
    again = store.import_file(make(tmp_path, "b", b"f" * 500))
    assert again.created  # the discarded claim is gone too
    store.sync()
    assert Path(again.path).read_bytes() == b"f" * 500


def test_claim(tmp_path: Path) -> None:
    store = ObjectStore(tmp_path / "store", batch=True)
    r = store.import_file(make(tmp_path, "a", b"g" * 500))
    assert store.claim(r.digest, 500)  # staged in this batch
    store.sync()
    os.utime(r.path, ns=(0, 0))
    assert ObjectStore(tmp_path / "store").claim(r.digest, 500)
    assert os.stat(r.path).st_mtime_ns > 0  # refreshed for gc's grace period
    os.unlink(r.path)
    assert not ObjectStore(tmp_path / "store").claim(r.digest, 500)


def test_an_object_of_the_wrong_size_is_no_dedupe_hit_and_is_written_anew(tmp_path: Path) -> None:
    store = ObjectStore(tmp_path / "store")
    r = store.import_file(make(tmp_path, "a", b"h" * 500))
    Path(r.path).write_bytes(b"h" * 100)  # truncated behind the store's back
    assert not store.claim(r.digest, 500)
    again = store.import_file(make(tmp_path, "b", b"h" * 500))
    assert again.created
    assert Path(r.path).read_bytes() == b"h" * 500


def test_failed_copy_leaves_no_temp(tmp_path: Path, monkeypatch) -> None:
    def broken(*args):
        raise OSError(errno.EIO, "I/O error")

    monkeypatch.setattr(fsops, "clone", broken)
    store = ObjectStore(tmp_path / "store")
    with pytest.raises(OSError, match="I/O error"):
        store.import_file(make(tmp_path, "a", b"e" * 5000))
    assert os.listdir(tmp_path / "store") == []


def test_plain_copy_fallback(tmp_path: Path, monkeypatch, recorded) -> None:
    def unsupported(*args):
        raise OSError(errno.EXDEV, "cross-device")

    monkeypatch.setattr(fsops, "clone", unsupported)
    monkeypatch.setattr(os, "copy_file_range", unsupported)
    data = os.urandom(3 << 20)
    r = ObjectStore(tmp_path / "store").import_file(make(tmp_path, "a", data))
    assert Path(r.path).read_bytes() == data
    assert sum(a[2] for op, a in recorded if op == "write") == len(data)


def test_source_changed_during_copy(tmp_path: Path, monkeypatch) -> None:
    src = make(tmp_path, "a", b"c" * 5000)

    def grow(op, args):
        if op == "create":
            with open(src, "ab") as f:
                f.write(b"more")

    monkeypatch.setattr(fsops, "recorder", grow)
    store = ObjectStore(tmp_path / "store")
    with pytest.raises(SourceChanged):
        store.import_file(src)
    assert os.listdir(tmp_path / "store") == []


def test_missing(tmp_path: Path) -> None:
    store = ObjectStore(tmp_path / "store")
    other = ObjectStore(tmp_path / "other")
    a = store.import_file(make(tmp_path, "a", b"a" * 100))
    b = other.import_file(make(tmp_path, "b", b"b" * 100))
    absent = fsverity.object_path(fsverity.digest_bytes(b"absent"))
    rel_a, rel_b = fsverity.object_path(a.digest), fsverity.object_path(b.digest)
    paths = [rel_a, rel_b.encode(), absent, absent, "../a", rel_a]
    assert store.missing(paths) == sorted({rel_b, absent, "../a"})
    assert store.missing(paths, other.path) == sorted({absent, "../a"})


def test_iter_objects_and_temp_files(tmp_path: Path) -> None:
    store = ObjectStore(tmp_path / "store")
    made = [store.import_file(make(tmp_path, str(n), bytes([n]) * (100 + n))) for n in range(5)]
    root = tmp_path / "store"
    (root / "zz").mkdir()  # not a fan-out dir
    (root / os.path.dirname(fsverity.object_path(made[0].digest)) / "stray").write_bytes(b"")
    dead = root / ".tmp-00000000-1-abc"  # another boot
    dead.write_bytes(b"")
    live = root / f".tmp-{objectstore.BOOT_TAG}-{os.getpid()}-abc"
    live.write_bytes(b"")
    objs = list(store.iter_objects())
    assert [o.relpath for o in objs] == sorted(fsverity.object_path(r.digest) for r in made)
    assert {o.relpath: o.size for o in objs} == {fsverity.object_path(r.digest): r.size for r in made}
    temps = {t.path: t.stale for t in store.iter_temp_files()}
    assert temps == {str(dead): True, str(live): False}


def test_empty_store_listings(tmp_path: Path) -> None:
    store = ObjectStore(tmp_path / "never-created")
    assert list(store.iter_objects()) == [] and list(store.iter_temp_files()) == []
    assert not store.has(fsverity.digest_bytes(b"x"))


def test_fanout_dir_collected_between_imports(tmp_path: Path) -> None:
    store = ObjectStore(tmp_path / "store")
    first = store.import_file(make(tmp_path, "a", b"first" * 20))
    n = 0
    while True:  # other content whose object lands in the same xx/
        data = b"second %d" % n * 10
        if fsverity.digest_bytes(data)[0] == first.digest[0]:
            break
        n += 1
    os.unlink(first.path)  # what a collector does to an unreferenced object
    os.rmdir(os.path.dirname(first.path))
    second = store.import_file(make(tmp_path, "b", data))
    assert second.created and Path(second.path).read_bytes() == data
