"""The directory scanner: unit cases, and the scanner oracle on the vector trees.

The oracle materialises each tree-sourced vector with the shared
``make_trees.py`` (root only), scans it with the vector's flags, writes the
image and compares it byte for byte with ``image.cfs``; the digest store
must list exactly ``store.txt``.  With upstream ``mkcomposefs`` installed,
the same tree is also run through it and both stores and images compared.
"""

from __future__ import annotations

import io
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from aptlayer.composefs import fsverity, scan as scanmod
from aptlayer.composefs.objectstore import ObjectStore
from aptlayer.composefs.scan import ScanError, scan
from aptlayer.composefs.tree import Node
from conftest import VECTORS, vector_names

MAKE_TREES = VECTORS / "make_trees.py"


def manifest(name: str) -> dict:
    return json.loads((VECTORS / name / "manifest.json").read_text())


def tree_vectors() -> list[str]:
    return [n for n in vector_names() if manifest(n)["source"]["kind"] == "tree"]


def scan_options(flags: list[str]) -> dict[str, bool]:
    names = {"--use-epoch", "--skip-devices", "--skip-xattrs", "--user-xattrs"}
    unknown = [f for f in flags if f.split("=")[0] not in names | {"--min-version", "--max-version"}]
    assert not unknown, f"flag not understood by this test: {unknown}"
    return {f[2:].replace("-", "_"): True for f in flags if f in names}


def version_options(flags: list[str]) -> dict[str, int]:
    """mkcomposefs's rule: one of the two alone leaves the other at 0, then max >= min."""
    given = dict(f[2:].split("=") for f in flags if f.split("=")[0] in ("--min-version", "--max-version"))
    if not given:
        return {"min_version": 0, "max_version": 1}
    lo, hi = int(given.get("min-version", 0)), int(given.get("max-version", 0))
    return {"min_version": lo, "max_version": max(hi, lo)}


def store_listing(store: Path) -> str:
    """``RELPATH SIZE`` of every file in the store, sorted, as in store.txt."""
    if not store.exists():
        return ""
    lines = sorted(
        f"{p.relative_to(store)} {p.stat().st_size}\n" for p in store.rglob("*") if not p.is_dir()
    )
    return "".join(lines)


def canonical(root: Node) -> list[tuple]:
    return [
        (p, n.mode, n.uid, n.gid, n.nlink, n.rdev, n.size, n.mtime_sec, n.mtime_nsec, n.payload,
         n.content, n.digest, tuple(sorted(n.xattrs.items())))
        for p, n in root.walk()
    ]


def write_image(root: Node, flags: list[str]) -> bytes:
    writer = pytest.importorskip("aptlayer.composefs.writer")
    if not hasattr(writer, "write_image"):
        pytest.skip("aptlayer.composefs.writer.write_image not available yet")
    out = io.BytesIO()
    writer.write_image(root, out, **version_options(flags))
    return out.getvalue()


@pytest.fixture(scope="session")
def trees(tmp_path_factory):
    """Materialise a vector tree once per session: ``trees(name) -> Path``."""
    if os.geteuid() != 0:
        pytest.skip("make_trees.py needs root (device nodes, chown, trusted.* xattrs)")
    if not MAKE_TREES.is_file():
        pytest.skip(f"{MAKE_TREES} not found: the tree-scan oracle needs the shared vectors tooling")
    base = tmp_path_factory.mktemp("trees")
    made: dict[str, Path] = {}

    def get(tree: str) -> Path:
        if tree not in made:
            subprocess.run([sys.executable, str(MAKE_TREES), str(base), tree], check=True,
                           capture_output=True)
            made[tree] = base / tree
        return made[tree]

    return get


# -- the scanner oracle -------------------------------------------------------


@pytest.mark.root
@pytest.mark.parametrize("name", tree_vectors())
def test_vector_tree(trees, tmp_path: Path, name: str) -> None:
    m = manifest(name)
    src = trees(m["source"]["name"])
    fp = subprocess.run([sys.executable, str(MAKE_TREES), "--fingerprint", str(src)],
                        check=True, capture_output=True, text=True).stdout
    if json.loads(fp)["sha256"] != m["tree_fingerprint"]["sha256"]:
        pytest.skip(f"materialised tree differs from the vector's (file system or LSM labels?): {fp}")
    store = tmp_path / "store"
    result = scan(src, store=ObjectStore(store), **scan_options(m["flags"]))
    assert store_listing(store) == (VECTORS / name / "store.txt").read_text()
    assert not list(ObjectStore(store).iter_temp_files())
    for obj in ObjectStore(store).iter_objects():
        assert fsverity.digest_file(store / obj.relpath).hex() == obj.relpath.replace("/", "")
    assert result.stats.objects_created == m["store"]["objects"]
    assert write_image(result.root, m["flags"]) == (VECTORS / name / "image.cfs").read_bytes()


@pytest.mark.root
@pytest.mark.upstream
@pytest.mark.parametrize("name", tree_vectors())
def test_vector_tree_vs_mkcomposefs(trees, mkcomposefs: str, tmp_path: Path, name: str) -> None:
    m = manifest(name)
    src = trees(m["source"]["name"])
    up_store, up_img = tmp_path / "up-store", tmp_path / "up.cfs"
    subprocess.run([mkcomposefs, f"--digest-store={up_store}", *m["flags"], str(src), str(up_img)],
                   check=True, capture_output=True)
    store = tmp_path / "store"
    result = scan(src, store=ObjectStore(store), threads=2, **scan_options(m["flags"]))
    assert store_listing(store) == store_listing(up_store)
    for obj in ObjectStore(store).iter_objects():
        assert (store / obj.relpath).read_bytes() == (up_store / obj.relpath).read_bytes()
    assert write_image(result.root, m["flags"]) == up_img.read_bytes()


# -- unit cases ---------------------------------------------------------------


def test_inline_and_external_thresholds(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    for size in (0, 1, 64, 65, 5000):
        (src / f"f{size}").write_bytes(b"z" * size)
    root = scan(src).root
    for size in (0, 1, 64, 65, 5000):
        n = root.children[f"f{size}".encode()]
        assert n.size == size and n.nlink == 1
        if size == 0:
            assert (n.content, n.payload, n.digest) == (None, None, None)
        elif size <= scanmod.INLINE_MAX:
            assert (n.content, n.payload, n.digest) == (b"z" * size, None, None)
        else:
            assert n.content is None
            assert n.digest == fsverity.digest_bytes(b"z" * size)
            assert n.payload == fsverity.object_path(n.digest).encode()


def test_metadata_from_lstat(tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "file").write_bytes(b"x" * 100)
    os.link(src / "file", src / "hard")
    os.symlink("/etc", src / "sym")
    os.mkfifo(src / "fifo")
    os.chmod(src, 0o1750)
    os.utime(src / "file", ns=(0, -1_500_000_000))
    root = scan(src).root
    st = os.stat(src)
    assert (root.mode, root.mtime_sec, root.mtime_nsec) == (
        st.st_mode, *divmod(st.st_mtime_ns, 1_000_000_000))
    f, h = root.children[b"file"], root.children[b"hard"]
    assert (f.mtime_sec, f.mtime_nsec) == (-2, 500_000_000)  # floor, as mkcomposefs stores it
    assert f is not h and f.nlink == h.nlink == 1 and f.payload == h.payload
    sym = root.children[b"sym"]
    assert stat.S_ISLNK(sym.mode) and sym.payload == b"/etc" and sym.size == 4 and not sym.children
    assert stat.S_ISFIFO(root.children[b"fifo"].mode)
    assert root.children[b"sub"].is_dir and root.children[b"sub"].children == {}
    epoch = scan(src, use_epoch=True).root
    assert {(n.mtime_sec, n.mtime_nsec) for _, n in epoch.walk()} == {(0, 0)}


def test_xattr_options(tmp_path: Path, as_root) -> None:
    src = tmp_path / "src"
    src.mkdir()
    f = src / "f"
    f.write_bytes(b"x")
    os.setxattr(f, "user.a", b"1")
    os.setxattr(f, "trusted.b", b"2")
    os.symlink("f", src / "l")
    os.setxattr(src / "l", "trusted.on-link", b"3", follow_symlinks=False)
    root = scan(src).root
    assert root.children[b"f"].xattrs == {b"trusted.b": b"2", b"user.a": b"1"}
    assert root.children[b"l"].xattrs == {b"trusted.on-link": b"3"}
    assert scan(src, user_xattrs=True).root.children[b"f"].xattrs == {b"user.a": b"1"}
    assert scan(src, skip_xattrs=True).root.children[b"f"].xattrs == {}
    with pytest.raises(ValueError, match="conflict"):
        scan(src, skip_xattrs=True, user_xattrs=True)


def test_skip_devices(tmp_path: Path, as_root) -> None:
    src = tmp_path / "src"
    src.mkdir()
    os.mknod(src / "whiteout", stat.S_IFCHR | 0o644, 0)
    os.mknod(src / "blk", stat.S_IFBLK | 0o600, os.makedev(8, 1))
    os.mkfifo(src / "fifo")
    assert sorted(scan(src).root.children) == [b"blk", b"fifo", b"whiteout"]
    assert scan(src).root.children[b"blk"].rdev == os.makedev(8, 1)
    assert sorted(scan(src, skip_devices=True).root.children) == [b"fifo"]


def test_store_stats_threads_and_progress(tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "d").mkdir(parents=True)
    for i in range(30):
        (src / f"u{i:02}").write_bytes(os.urandom(4000 + i))
        (src / "d" / f"same{i}").write_bytes(b"same content" * 50)
    seen = []
    one = scan(src, store=ObjectStore(tmp_path / "s1"), progress=lambda s: seen.append(s.files))
    two = scan(src, store=ObjectStore(tmp_path / "s2"), threads=2)
    assert canonical(one.root) == canonical(two.root)
    assert store_listing(tmp_path / "s1") == store_listing(tmp_path / "s2")
    assert one.stats == two.stats
    assert (one.stats.external, one.stats.objects_created, one.stats.objects_deduped) == (60, 31, 29)
    assert seen == list(range(1, 61))
    again = scan(src, store=ObjectStore(tmp_path / "s1"), threads=2)
    assert (again.stats.objects_created, again.stats.objects_deduped) == (0, 60)
    assert scan(src).stats.objects_created == 0  # no store, nothing written


@pytest.mark.parametrize("kind", ["file", "symlink", "missing"])
def test_source_must_be_a_directory(tmp_path: Path, kind: str) -> None:
    (tmp_path / "dir").mkdir()
    (tmp_path / "file").write_bytes(b"")
    os.symlink("dir", tmp_path / "symlink")
    with pytest.raises(ScanError, match="Not a directory" if kind != "missing" else "No such file"):
        scan(tmp_path / kind)


def test_unreadable_entry(tmp_path: Path, monkeypatch) -> None:
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "sub" / "secret").write_bytes(b"s" * 100)
    real_open = os.open

    def deny(path, flags, mode=0o777, *, dir_fd=None):
        if path == b"secret":
            raise PermissionError(13, "Permission denied")
        return real_open(path, flags, mode, dir_fd=dir_fd)

    monkeypatch.setattr(os, "open", deny)
    with pytest.raises(ScanError) as err:
        scan(src)
    assert err.value.path == b"/sub/secret" and "Permission denied" in err.value.reason
    assert isinstance(err.value.__cause__, PermissionError)


def test_name_too_long(tmp_path: Path, monkeypatch) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "abcdefghijk").write_bytes(b"")
    monkeypatch.setattr(scanmod, "NAME_MAX", 10)
    with pytest.raises(ScanError, match="longer than 10 bytes"):
        scan(src)


def test_unrepresentable_type(tmp_path: Path, monkeypatch) -> None:
    src = tmp_path / "src"
    src.mkdir()
    os.mkfifo(src / "p")
    monkeypatch.setattr(scanmod, "REPRESENTABLE", scanmod.REPRESENTABLE - {stat.S_IFIFO})
    with pytest.raises(ScanError, match="cannot be represented"):
        scan(src)


def make_deep(src: Path, depth: int, *, branch_every: int = 0) -> None:
    """A chain of ``depth`` directories ``d``, each with a file and, every
    ``branch_every`` levels, a sibling directory ``e`` (so the walk comes back)."""
    src.mkdir()
    fd = os.open(src, os.O_RDONLY)
    try:
        for level in range(depth):  # relative opens keep the paths short
            with open(os.open("f", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd), "wb") as f:
                f.write(str(level).encode() * 30)
            if branch_every and level % branch_every == 0:
                os.mkdir("e", dir_fd=fd)
            os.mkdir("d", dir_fd=fd)
            nfd = os.open("d", os.O_RDONLY, dir_fd=fd)
            os.close(fd)
            fd = nfd
    finally:
        os.close(fd)


@pytest.fixture
def deep_dir(tmp_path: Path):
    yield tmp_path / "deep"
    subprocess.run(["rm", "-rf", str(tmp_path / "deep")], check=True)  # shutil recurses


def test_deep_tree_iterative(deep_dir: Path) -> None:
    depth = sys.getrecursionlimit() + 50
    make_deep(deep_dir, depth)
    root = scan(deep_dir).root
    assert sum(1 for _, n in root.walk() if n.is_dir) == depth + 1


def test_few_open_dirs(deep_dir: Path, monkeypatch) -> None:
    make_deep(deep_dir, 40, branch_every=3)
    expected = canonical(scan(deep_dir).root)
    monkeypatch.setattr(scanmod, "MAX_OPEN_DIRS", 3)
    real_open, real_close = os.open, os.close
    dir_fds: set[int] = set()
    peak = 0

    def counting_open(path, flags, *args, **kwargs):
        nonlocal peak
        fd = real_open(path, flags, *args, **kwargs)
        if flags & os.O_DIRECTORY:
            dir_fds.add(fd)
            peak = max(peak, len(dir_fds))
        return fd

    def counting_close(fd):
        dir_fds.discard(fd)
        real_close(fd)

    monkeypatch.setattr(os, "open", counting_open)
    monkeypatch.setattr(os, "close", counting_close)
    assert canonical(scan(deep_dir).root) == expected
    assert peak <= 4 and not dir_fds  # the limit, plus one while reopening; all closed
