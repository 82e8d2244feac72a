"""Hashing ahead on two cores: the digests are the files', and a file that moved is hashed again.

Real files and a real forked helper.  Where the helper cannot run (one CPU,
or threads in this process) the tests that need it skip with the reason.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from aptlayer.composefs import fsverity, prehash, scan
from aptlayer.composefs.build import render
from aptlayer.composefs.digestcache import DigestCache
from aptlayer.composefs.lstatwalk import walk
from aptlayer.composefs.objectstore import ObjectStore
from aptlayer.linux import forked

needs_helper = pytest.mark.skipif(not forked.helper_allowed(),
                                  reason="hashing ahead needs two CPUs and a single-threaded process")


@pytest.fixture
def small_min(monkeypatch):
    """Hash ahead whatever the amount, in batches of 64 KiB (several batches)."""
    monkeypatch.setattr(prehash, "MIN_BYTES", 1)
    monkeypatch.setattr(prehash, "BATCH_BYTES", 64 << 10)


def make_tree(root: Path) -> Path:
    for d in range(6):
        sub = root / f"d{d}"
        sub.mkdir(parents=True)
        for i in range(12):
            (sub / f"f{i}").write_bytes(os.urandom(100 + 4096 * i + d))
        (sub / "small").write_bytes(b"s" * 64)
        (sub / "same").write_bytes(b"shared" * 100)
    os.symlink("d0/f1", root / "link")
    return root


@needs_helper
def test_digests_are_the_files_digests(tmp_path: Path, small_min) -> None:
    src = make_tree(tmp_path / "src")
    walked = walk(src, 0)
    files = prehash.wanted(walked.entries(), None)
    # regular files over 64 bytes only: 6 x (12 + "same")
    assert len(files) == 6 * 13 and all(size > 64 for _, _, size in files)
    progress = []
    found = prehash.digests(src, files, progress=lambda done, total: progress.append((done, total)))
    assert found == {key: fsverity.digest_file(src / os.fsdecode(path[1:])) for path, key, _ in files}
    total = sum(size for _, _, size in files)
    assert len(progress) > 2 and progress[0] == (0, total) and progress[-1] == (total, total)
    assert progress == sorted(progress)


def test_nothing_is_hashed_ahead_below_the_minimum(tmp_path: Path) -> None:
    src = make_tree(tmp_path / "src")
    assert prehash.digests(src, prehash.wanted(walk(src, 0).entries(), None)) == {}


def test_cached_digests_are_not_wanted(tmp_path: Path) -> None:
    src = make_tree(tmp_path / "src")
    cache = DigestCache(tmp_path / "cache", settle_ns=0)
    scan.scan(src, cache=cache)
    cache.save()
    cache = DigestCache(tmp_path / "cache", settle_ns=0)
    assert prehash.wanted(walk(src, 0).entries(), cache) == []
    (src / "d3" / "f5").write_bytes(b"changed" * 50)
    assert [path for path, _, _ in prehash.wanted(walk(src, 0).entries(), cache)] == [b"/d3/f5"]


@needs_helper
def test_a_file_that_is_no_longer_the_walked_one_is_left_out(tmp_path: Path, small_min) -> None:
    src = make_tree(tmp_path / "src")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    walked = walk(src, 0)
    files = prehash.wanted(walked.entries(), None)
    # d1 becomes a symlink to a directory outside with a file of the same name and size
    (elsewhere / "f3").write_bytes((src / "d1" / "f3").read_bytes())
    os.rename(src / "d1", tmp_path / "d1-old")
    os.symlink(elsewhere, src / "d1")
    # d2/f4 is rewritten in place: same inode and size, new content and ctime
    time.sleep(0.01)
    (src / "d2" / "f4").write_bytes(os.urandom(100 + 4096 * 4 + 2))
    found = prehash.digests(src, files)
    by_path = {path: key for path, key, _ in files}
    assert by_path[b"/d1/f3"] not in found and by_path[b"/d2/f4"] not in found
    assert by_path[b"/d0/f3"] in found
    assert not any(path.startswith(b"/d1/") and key in found for path, key, _ in files)


@needs_helper
@pytest.mark.parametrize("with_store", [False, True])
def test_a_file_changed_after_it_was_hashed_ahead(tmp_path: Path, monkeypatch, small_min, with_store: bool) -> None:
    """Rewritten (same size) between the hashing ahead and the scan.

    The scan takes metadata from the walk made before the hashing.  Without
    a store, the digest hashed ahead under that same key is the content of
    that moment, and it is taken.  With a store lacking that object, the
    file is opened to be copied: its key has moved, so it is hashed again,
    and the object is named after what was copied.  Never a digest of one
    content with another's bytes.
    """
    src = make_tree(tmp_path / "src")
    victim = src / "d4" / "f7"
    before = victim.read_bytes()
    ahead = prehash.digests

    def then_change(source, files, progress=None):
        found = ahead(source, files, progress)
        time.sleep(0.01)  # a new ctime tick
        victim.write_bytes(os.urandom(len(before)))
        return found

    monkeypatch.setattr(prehash, "digests", then_change)
    store = ObjectStore(tmp_path / "objects") if with_store else None
    result = scan.scan(src, threads=2, store=store)
    digest = result.root.children[b"d4"].children[b"f7"].digest
    if with_store:
        store.sync()
        assert digest == fsverity.digest_file(victim)
        assert (tmp_path / "objects" / fsverity.object_path(digest)).read_bytes() == victim.read_bytes()
    else:
        assert digest == fsverity.digest_bytes(before)


@needs_helper
def test_a_threaded_scan_hashes_ahead_and_then_hashes_nothing(tmp_path: Path, monkeypatch, small_min) -> None:
    src = make_tree(tmp_path / "src")
    ahead = prehash.digests
    after: list[int | None] = []  # sizes hashed once the hashing ahead is done

    def digests(*args, **kw):
        found = ahead(*args, **kw)
        after.append(None)
        return found

    digest_fd = fsverity.digest_fd
    monkeypatch.setattr(prehash, "digests", digests)
    monkeypatch.setattr(fsverity, "digest_fd",
                        lambda fd, size=None, **kw: (after and after.append(size)) or digest_fd(fd, size, **kw))
    store = ObjectStore(tmp_path / "objects")
    two = scan.scan(src, threads=2, store=store)
    assert after == [None]  # ahead once, and nothing hashed after it
    assert render(two.root)[0] == render(scan.scan(src, threads=1).root)[0]
    for path, _, _ in prehash.wanted(walk(src, 0).entries(), None):
        content = (src / os.fsdecode(path[1:])).read_bytes()
        assert (tmp_path / "objects" / fsverity.object_path(fsverity.digest_bytes(content))).read_bytes() == content


@needs_helper
def test_progress_shows_the_hashing_ahead_then_the_scan(tmp_path: Path, small_min) -> None:
    src = make_tree(tmp_path / "src")
    seen = []
    scan.scan(src, threads=2, progress=lambda s: seen.append((s.files, s.hashed_ahead, s.hash_ahead)))
    total = sum(size for _, _, size in prehash.wanted(walk(src, 0).entries(), None))
    ahead = [(done, of) for files, done, of in seen if files == 0]
    assert ahead[0] == (0, total) and ahead[-1] == (total, total) and len(ahead) > 2
    assert ahead == sorted(ahead)
    files = [files for files, _, _ in seen if files]
    assert files == list(range(1, 6 * 14 + 1))  # then one call per regular file, as before


@needs_helper
def test_reading_single_entries_hashes_ahead_too(tmp_path: Path, monkeypatch, small_min) -> None:
    src = make_tree(tmp_path / "src")
    walked = walk(src, 0)
    paths = [b"/d1/f9", b"/d2/f11", b"/d3/small", b"/link", b"/d5/same"]
    ahead = prehash.digests
    hashed_ahead = []
    monkeypatch.setattr(prehash, "digests", lambda source, files, progress=None:
                        hashed_ahead.extend(p for p, _, _ in files) or ahead(source, files, progress))
    two, _ = scan.scan_entries(src, walked, paths, threads=2)
    assert sorted(hashed_ahead) == [b"/d1/f9", b"/d2/f11", b"/d5/same"]
    one, _ = scan.scan_entries(src, walked, paths, threads=1)
    assert {p: (n.digest, n.content, n.payload) for p, n in two.items()} == \
        {p: (n.digest, n.content, n.payload) for p, n in one.items()}
    assert two[b"/d2/f11"].digest == fsverity.digest_file(src / "d2" / "f11")
