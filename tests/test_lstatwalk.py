"""The lstat walk split across two processes: same result as one, and halves that do not fit are refused.

Real trees, real forks.  The split runs only in a single-threaded process
with two CPUs; the tests that need it skip with the reason otherwise.
"""

from __future__ import annotations

import os
import stat
import time
import zlib
from pathlib import Path

import pytest

from aptlayer.composefs import lstatwalk
from aptlayer.composefs.digestcache import key_of, lstat_of
from aptlayer.linux import forked

SETTLED = 1 << 62  # a limit every ctime is before

needs_split = pytest.mark.skipif(not forked.helper_allowed(),
                                 reason="the split walk needs two CPUs and a single-threaded process")


def owner(base: bytes) -> int:
    """Which of the two parts lists the directory ``base`` (with a trailing slash)."""
    return zlib.crc32(base) % 2


def make_tree(root: Path) -> Path:
    """Sixty directories three deep, with every kind of entry a scan takes."""
    for a in range(4):
        for b in range(5):
            for c in range(3):
                d = root / f"a{a}" / f"b{b}" / f"c{c}"
                d.mkdir(parents=True)
                (d / "small").write_bytes(b"x" * (a + b + c))
                (d / "big").write_bytes(bytes([a, b, c]) * 100)
            os.symlink("c0/small", root / f"a{a}" / f"b{b}" / "link")
    os.mkfifo(root / "a0" / "fifo")
    (root / "empty").write_bytes(b"")
    return root


def split(source: Path, limit: int = SETTLED, **kw) -> lstatwalk.TreeWalk | None:
    return lstatwalk.walk(source, limit, **kw)


def single(source: Path, monkeypatch, limit: int = SETTLED, **kw) -> lstatwalk.TreeWalk | None:
    with monkeypatch.context() as m:
        m.setattr(forked, "helper_allowed", lambda: False)
        return lstatwalk.walk(source, limit, **kw)


def listings(walked: lstatwalk.TreeWalk) -> dict[bytes, list]:
    """Every directory's listing, found by way of the keys."""
    dirs = [b"/"] + [p + b"/" for p, k in walked.keys.items() if p != b"/" and stat.S_ISDIR(lstat_of(k).st_mode)]
    return {d: walked.listing(d) for d in dirs}


@needs_split
def test_split_walk_equals_one_process_walk(tmp_path: Path, monkeypatch) -> None:
    src = make_tree(tmp_path / "src")
    two = split(src)
    one = single(src, monkeypatch)
    assert two is not None and one is not None
    assert two.fingerprint == one.fingerprint is not None
    assert two.keys == one.keys
    assert listings(two) == listings(one)
    assert two.stats == one.stats
    # both parts had work: the tree's directories are owned by both
    assert {owner(b) for b in listings(two)} == {0, 1}


def test_walk_sees_every_entry_as_lstat_does(tmp_path: Path, monkeypatch) -> None:
    src = make_tree(tmp_path / "src")
    for walked in (split(src), single(src, monkeypatch)):
        want = {b"/": key_of(os.lstat(src))}
        for dirpath, dirnames, filenames in os.walk(src):
            for name in dirnames + filenames:
                path = os.path.join(dirpath, name)
                want[os.fsencode("/" + os.path.relpath(path, src))] = key_of(os.lstat(path))
        assert walked.keys == want
        listed = {b + n: k for b, entries in listings(walked).items() for n, k in entries}
        assert listed == {p: k for p, k in want.items() if p != b"/"}
        assert all(entries == sorted(entries) for entries in listings(walked).values())
        assert lstat_of(walked.keys[b"/a0/b0/c0/big"]).st_size == 300
        regular = [p for p, k in want.items() if stat.S_ISREG(lstat_of(k).st_mode)]
        # 60 small (0..9 bytes) + 60 big files and "empty"; the root and the 60+20+4 directories,
        # 20 links and the fifo are entries too
        assert walked.stats == lstatwalk.ScanStats(len(want), len(regular), 60 * 300 + sum(
            a + b + c for a in range(4) for b in range(5) for c in range(3)), 60)


def test_entries_changed_since_the_limit_have_empty_keys(tmp_path: Path, monkeypatch) -> None:
    src = make_tree(tmp_path / "src")
    time.sleep(0.05)  # past the coarse clock's tick: the tree's ctimes are all before the change's
    big = src / "a1" / "b2" / "c1" / "big"
    big.write_bytes(b"new" * 100)
    limit = os.lstat(big).st_ctime_ns  # not before the limit: not settled
    for walked in (split(src, limit), single(src, monkeypatch, limit)):
        assert walked.fingerprint is None
        assert walked.keys[b"/a1/b2/c1/big"] == b""
        assert walked.keys[b"/a3/b0/c0/big"] == key_of(os.lstat(src / "a3" / "b0" / "c0" / "big"))
        # the listing keeps the key itself, for the scan that reads the entry again
        assert dict(walked.listing(b"/a1/b2/c1/"))[b"big"] == key_of(os.lstat(big))


@needs_split
@pytest.mark.parametrize("moved_by", [0, 1])
def test_halves_that_saw_different_trees_do_not_fit(tmp_path: Path, monkeypatch, moved_by: int) -> None:
    """A directory replaced between the two parts' traversals: its parent's owner saw one inode,
    its own owner listed another.  The part ``moved_by`` walks after the change, the other before."""
    src = make_tree(tmp_path / "src")
    # a directory whose owner is not its parent's owner, parent owned by the part that walks first
    victim = next(f"/a{a}/b{b}/".encode() for a in range(4) for b in range(5)
                  if owner(f"/a{a}/".encode()) != moved_by and owner(f"/a{a}/b{b}/".encode()) == moved_by)
    done = tmp_path / "first part done"
    walk = lstatwalk._Part.walk

    def ordered(self):
        if self.me != moved_by:  # the first part: walk, then let the other go
            result = walk(self)
            done.write_bytes(b"")
            return result
        deadline = time.monotonic() + 30
        while not done.exists() and time.monotonic() < deadline:
            time.sleep(0.001)
        path = src / os.fsdecode(victim.strip(b"/"))
        os.rename(path, tmp_path / "old")
        path.mkdir()
        return walk(self)

    monkeypatch.setattr(lstatwalk._Part, "walk", ordered)
    assert split(src) is None


@needs_split
def test_halves_that_saw_the_same_tree_fit(tmp_path: Path, monkeypatch) -> None:
    """The ordering of the test above, without the change: the walk succeeds."""
    src = make_tree(tmp_path / "src")
    done = tmp_path / "first part done"
    walk = lstatwalk._Part.walk

    def ordered(self):
        if self.me == 0:
            result = walk(self)
            done.write_bytes(b"")
            return result
        while not done.exists():
            time.sleep(0.001)
        return walk(self)

    monkeypatch.setattr(lstatwalk._Part, "walk", ordered)
    assert split(src) is not None


@pytest.mark.parametrize("part", [0, 1])
def test_what_a_scan_refuses_fails_the_walk_in_either_part(tmp_path: Path, monkeypatch, part: int) -> None:
    src = make_tree(tmp_path / "src")
    where = next(f"/a{a}/b{b}/".encode() for a in range(4) for b in range(5) if owner(f"/a{a}/b{b}/".encode()) == part)
    os.mkfifo(src / os.fsdecode(where.strip(b"/")) / "pipe")
    monkeypatch.setattr(lstatwalk, "REPRESENTABLE", lstatwalk.REPRESENTABLE - {stat.S_IFIFO})
    assert split(src) is None
    assert single(src, monkeypatch) is None


def test_skipped_devices_are_listed_but_not_keyed(tmp_path: Path, monkeypatch) -> None:
    if os.geteuid() != 0:
        pytest.skip("making a device node needs root")
    src = make_tree(tmp_path / "src")
    os.mknod(src / "a2" / "null", stat.S_IFCHR | 0o600, os.makedev(1, 3))
    fingerprints = set()
    for walked in (split(src, skip_devices=True), single(src, monkeypatch, skip_devices=True)):
        assert b"/a2/null" not in walked.keys
        assert b"null" in dict(walked.listing(b"/a2/"))
        fingerprints.add(walked.fingerprint)
    assert len(fingerprints) == 1 and None not in fingerprints
    assert split(src).stats.entries == walked.stats.entries + 1
    assert b"/a2/null" in split(src).keys


@needs_split
def test_the_helper_leaves_nothing_behind(tmp_path: Path) -> None:
    src = make_tree(tmp_path / "src")
    fds = sorted(os.listdir("/proc/self/fd"))
    for _ in range(3):
        assert split(src) is not None
    assert sorted(os.listdir("/proc/self/fd")) == fds
    with pytest.raises(ChildProcessError):
        os.waitpid(-1, os.WNOHANG)


def test_a_missing_source_is_none(tmp_path: Path) -> None:
    assert split(tmp_path / "nowhere") is None
    (tmp_path / "file").write_bytes(b"")
    assert split(tmp_path / "file") is None


def brute_changed(old: lstatwalk.TreeWalk, new: lstatwalk.TreeWalk) -> list[bytes] | None:
    """changed_since as the definition says it, from the keys by path."""
    if old.keys.keys() != new.keys.keys():
        return None
    return sorted(p for p, key in new.keys.items() if old.keys[p] != key or not key)


@pytest.mark.parametrize("seed", range(12))
def test_changed_since_agrees_with_the_keys(tmp_path: Path, monkeypatch, seed: int) -> None:
    """Random trees and random changes: the listing comparison gives what comparing every key gives."""
    import random

    rng = random.Random(seed)
    src = tmp_path / "src"
    dirs = [src]
    src.mkdir()
    for i in range(rng.randint(5, 40)):
        d = rng.choice(dirs) / f"d{i}"
        d.mkdir()
        dirs.append(d)
    files = []
    for i in range(rng.randint(20, 200)):
        f = rng.choice(dirs) / f"f{i}"
        f.write_bytes(os.urandom(rng.randint(0, 300)))
        files.append(f)
    time.sleep(0.02)
    limit = time.time_ns()
    old = split(src, limit)
    time.sleep(0.02)
    for _ in range(rng.randint(0, 8)):
        f = rng.choice(files)
        change = rng.choice(["rewrite", "chmod", "touch", "add", "remove", "mkdir"])
        if change == "rewrite" and f.exists():
            f.write_bytes(os.urandom(rng.randint(0, 300)))
        elif change == "chmod" and f.exists():
            os.chmod(f, 0o600)
        elif change == "touch" and f.exists():
            os.utime(f, ns=(1, rng.randint(1, 10**18)))
        elif change == "add":
            (rng.choice(dirs) / f"new{rng.random()}").write_bytes(b"")
        elif change == "remove" and f.exists():
            f.unlink()
        elif change == "mkdir":
            (rng.choice(dirs) / f"newdir{rng.random()}").mkdir()
    for new_limit in (limit, time.time_ns() + 10**9):  # the changes not settled, then settled
        for new in (split(src, new_limit), single(src, monkeypatch, new_limit)):
            assert new.changed_since(old.state) == brute_changed(old, new)
            assert new.changed_since(new.state) == brute_changed(new, new)
