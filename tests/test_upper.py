"""Layered images: the upper directory of a writable mount, laid over its base image.

Each test makes a base image in a real store, mounts it writable on this
kernel, changes the tree through the mount, unmounts, and builds the layered
image (``LayeredSource``). The reference is ``mkcomposefs`` (upstream when
installed, else apt-layer's own) run on the merged view: the same base and
upper directory mounted again, read-only. The two image digests must be
equal. The delta read from the upper directory is checked too: what this
kernel writes for each operation (the table in ``composefs/upper.py``), and
that only new data was read.

Needs root, erofs and overlayfs; skips with the reason otherwise.
"""

from __future__ import annotations

import errno
import itertools
import os
import shutil
import stat
import subprocess
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from aptlayer import errors, mounts
from aptlayer.builder import CreateOptions, LayeredSource, Outcome
from aptlayer.builder.outcome import Delta
from aptlayer.composefs import build, fsverity, reader, upper
from aptlayer.composefs.upper import Added, Directory, MetaCopy, Whiteout
from aptlayer.composefs.tree import Node
from aptlayer.composefs.upstream import find_tool
from aptlayer.store import Store

pytestmark = pytest.mark.root

PY = CreateOptions(backend="python")
#: a valid security.capability value (v2, cap_net_raw permitted and effective)
CAP_NET_RAW = bytes.fromhex("0100000200200000000000000000000000000000")


def blob(tag: str, size: int) -> bytes:
    return (tag.encode() * size)[:size]


BASE_FILES = {
    "etc/os-release": b"ID=debian\n",
    "etc/big.conf": blob("conf", 300),
    "usr/bin/tool": blob("tool", 5000),
    "usr/lib/lib.so": blob("lib", 3000),
    "usr/share/doc/a/README": blob("ra", 200),
    "usr/share/doc/a/copyright": blob("ca", 100),
    "usr/share/doc/b/README": blob("rb", 200),
    "var/lib/x/small": b"tiny\n",
    "var/empty": b"",
}


def make_base(root: Path) -> Path:
    for rel, data in BASE_FILES.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    os.chmod(root / "usr/bin/tool", 0o755)
    os.setxattr(root / "usr/lib/lib.so", "user.base", b"1")
    os.setxattr(root / "etc/big.conf", "trusted.overlay.foo", b"escaped")
    os.symlink("usr/bin/tool", root / "link")
    return root


class Layering:
    """A store with a base image, and a fresh upper directory over it per round."""

    def __init__(self, store: Store, tmp: Path, base: str = "base") -> None:
        self.store = store
        self.tmp = tmp
        self.base = base
        self.rounds = itertools.count()
        self.new_upper()

    def new_upper(self) -> None:
        n = next(self.rounds)
        self.upper, self.work, self.mnt = (self.tmp / f"{what}{n}" for what in ("upper", "work", "mnt"))
        for d in (self.upper, self.work, self.mnt):
            d.mkdir()
        upper.prepare_upper(self.upper, reader.read_image(self.store.image_file(self.base)))
        self.staged = self.tmp / f"layered{n}.cfs"

    @contextmanager
    def mounted(self, readonly: bool = False) -> Iterator[Path]:
        mounts.mount(self.store, self.base, str(self.mnt), upperdir=str(self.upper), workdir=str(self.work),
                     readonly=readonly)
        try:
            yield self.mnt
        finally:
            mounts.unmount(self.store, str(self.mnt))

    def change(self, operation: Callable[[Path], object]) -> None:
        with self.mounted() as mnt:
            operation(mnt)

    def build(self) -> Outcome:
        source = LayeredSource(str(self.store.image_file(self.base)), str(self.upper))
        source.check()
        return self.store.builder.build(source, self.staged, PY)

    def reference(self) -> str:
        """The digest mkcomposefs gives for the merged view, with the store's digest store."""
        image = self.staged.with_suffix(".ref")
        objects = str(self.store.layout.objects)
        with self.mounted(readonly=True) as mnt:
            tool = find_tool("mkcomposefs")
            if tool is not None:
                subprocess.run([tool, f"--digest-store={objects}", str(mnt), str(image)], check=True)
            else:
                image.write_bytes(build.make_image(str(mnt), digest_store=objects).image)
        return fsverity.digest_bytes(image.read_bytes()).hex()

    def check(self) -> Outcome:
        """Build the layered image; it must be byte-identical to mkcomposefs of the merged view."""
        built = self.build()
        assert built.digest == self.reference()
        assert fsverity.digest_bytes(self.staged.read_bytes()).hex() == built.digest
        full = build_manifest(built)
        for obj, size in full:
            assert (self.store.layout.objects / obj).stat().st_size == size
        if isinstance(built.manifest, Delta):  # read from the change alone: it must give the whole manifest
            base = dict(self.store.journal.manifest(built.manifest.base))
            added = dict(built.manifest.added)
            assert built.manifest.removed <= base.keys() and not added.keys() & base.keys()
            assert sorted(({o: n for o, n in base.items() if o not in built.manifest.removed} | added).items()) == full
        return built


def build_manifest(built: Outcome) -> list[tuple[str, int]]:
    from aptlayer.builder.strategies import manifest_of

    return manifest_of(reader.read_image(built.staged))


@pytest.fixture
def layering(store: Store, tmp_path: Path, as_root: None) -> Layering:
    store.create(str(make_base(tmp_path / "src")), "base", PY)
    layers = Layering(store, tmp_path)
    try:
        with layers.mounted():
            pass
    except (errors.PermissionDenied, errors.Unsupported) as e:
        pytest.skip(f"cannot mount writable composefs here: {e}")
    layers.new_upper()
    return layers


def kinds(upper_dir: Path) -> dict[str, str]:
    """What the upper directory holds, by path, as the delta reads it."""
    found = {}
    for change in upper.read_upper(upper_dir).changes:
        path = os.fsdecode(change.path)
        if isinstance(change, Whiteout):
            found[path] = "whiteout"
        elif isinstance(change, Directory):
            found[path] = "opaque dir" if change.opaque else (
                f"dir -> {os.fsdecode(change.redirect)}" if change.redirect else "dir")
        elif isinstance(change, MetaCopy):
            found[path] = f"metacopy -> {os.fsdecode(change.redirect)}" if change.redirect else "metacopy"
        else:
            assert isinstance(change, Added)
            found[path] = stat.filemode(change.node.mode)[0] + " new"
    return found


# --- one operation at a time: what the kernel writes, and the bytes ---------------------


def write(path: Path, data: bytes) -> None:
    path.write_bytes(data)


def append(path: Path, data: bytes) -> None:
    with open(path, "ab") as f:
        f.write(data)


def mkdirs_with_file(top: Path, depth: int) -> None:
    d = top.joinpath(*(f"d{i}" for i in range(depth)))
    d.mkdir(parents=True)
    write(d / "bottom", blob("deep", 100))


def recreate(m: Path) -> None:
    shutil.rmtree(m / "usr/share/doc/a")
    (m / "usr/share/doc/a").mkdir()
    write(m / "usr/share/doc/a/NEWS", blob("news", 90))


def move_dir_and_chmod_inside(m: Path) -> None:
    os.rename(m / "usr/share/doc/a", m / "var/a")
    os.chmod(m / "var/a/README", 0o600)
    os.rename(m / "var/a/copyright", m / "var/a/COPYING")


def xattrs(m: Path) -> None:
    os.setxattr(m / "usr/lib/lib.so", "user.new", b"2")
    os.removexattr(m / "usr/lib/lib.so", "user.base")
    os.setxattr(m / "usr/bin/tool", "security.capability", CAP_NET_RAW)
    os.setxattr(m / "var/lib/x/small", "trusted.overlay.bar", b"mine")


def devices(m: Path) -> None:
    os.mknod(m / "dev-null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    os.mknod(m / "dev-loop", stat.S_IFBLK | 0o660, os.makedev(7, 0))
    os.mkfifo(m / "fifo", 0o600)
    os.mknod(m / "sock", stat.S_IFSOCK | 0o755)


def new_hard_links(m: Path) -> None:
    write(m / "usr/bin/new", blob("new", 500))
    os.link(m / "usr/bin/new", m / "usr/bin/new2")
    os.link(m / "usr/lib/lib.so", m / "usr/lib/lib2.so")


def replace_symlink(m: Path) -> None:
    os.unlink(m / "link")
    os.symlink("etc/os-release", m / "link")
    os.symlink("/nowhere", m / "etc/dangling")
    os.lchown(m / "etc/dangling", 5, 6)


def file_to_dir_and_back(m: Path) -> None:
    os.unlink(m / "etc/big.conf")
    (m / "etc/big.conf").mkdir()
    write(m / "etc/big.conf/part", b"x")
    shutil.rmtree(m / "usr/share/doc/b")
    write(m / "usr/share/doc/b", blob("was a dir", 80))


OPERATIONS: dict[str, tuple[Callable[[Path], object], dict[str, str]]] = {
    "new files": (lambda m: (write(m / "usr/bin/new", blob("new", 500)), write(m / "etc/new.conf", b"a=1\n"),
                             write(m / "etc/empty", b"")),
                  {"/usr": "dir", "/usr/bin": "dir", "/usr/bin/new": "- new", "/etc": "dir",
                   "/etc/new.conf": "- new", "/etc/empty": "- new"}),
    "overwrite": (lambda m: write(m / "etc/big.conf", blob("other", 400)),
                  {"/etc": "dir", "/etc/big.conf": "- new"}),
    "append": (lambda m: append(m / "usr/lib/lib.so", b"more"),
               {"/usr": "dir", "/usr/lib": "dir", "/usr/lib/lib.so": "- new"}),
    "truncate": (lambda m: os.truncate(m / "usr/bin/tool", 10),
                 {"/usr": "dir", "/usr/bin": "dir", "/usr/bin/tool": "- new"}),
    "chmod": (lambda m: os.chmod(m / "usr/bin/tool", 0o700),
              {"/usr": "dir", "/usr/bin": "dir", "/usr/bin/tool": "metacopy"}),
    "chown": (lambda m: os.chown(m / "usr/lib/lib.so", 1000, 1000),
              {"/usr": "dir", "/usr/lib": "dir", "/usr/lib/lib.so": "metacopy"}),
    "chmod inline file": (lambda m: os.chmod(m / "var/lib/x/small", 0o600),
                          {"/var": "dir", "/var/lib": "dir", "/var/lib/x": "dir", "/var/lib/x/small": "metacopy"}),
    "utime": (lambda m: os.utime(m / "etc/big.conf", ns=(5, 7_000_000_001)),
              {"/etc": "dir", "/etc/big.conf": "metacopy"}),
    "rename file": (lambda m: os.rename(m / "usr/bin/tool", m / "usr/bin/tool2"),
                    {"/usr": "dir", "/usr/bin": "dir", "/usr/bin/tool": "whiteout",
                     "/usr/bin/tool2": "metacopy -> tool"}),
    "move file across": (lambda m: os.rename(m / "usr/share/doc/a/README", m / "etc/README"),
                         {"/etc": "dir", "/etc/README": "metacopy -> /usr/share/doc/a/README", "/usr": "dir",
                          "/usr/share": "dir", "/usr/share/doc": "dir", "/usr/share/doc/a": "dir",
                          "/usr/share/doc/a/README": "whiteout"}),
    "rename dir": (lambda m: os.rename(m / "usr/share/doc/a", m / "usr/share/doc/c"),
                   {"/usr": "dir", "/usr/share": "dir", "/usr/share/doc": "dir", "/usr/share/doc/a": "whiteout",
                    "/usr/share/doc/c": "dir -> a"}),
    "move dir across, change inside": (move_dir_and_chmod_inside,
                                       {"/usr": "dir", "/usr/share": "dir", "/usr/share/doc": "dir",
                                        "/usr/share/doc/a": "whiteout", "/var": "dir",
                                        "/var/a": "dir -> /usr/share/doc/a", "/var/a/README": "metacopy",
                                        "/var/a/COPYING": "metacopy -> copyright", "/var/a/copyright": "whiteout"}),
    "rm": (lambda m: os.unlink(m / "etc/big.conf"), {"/etc": "dir", "/etc/big.conf": "whiteout"}),
    "rm -r": (lambda m: shutil.rmtree(m / "usr/share"), {"/usr": "dir", "/usr/share": "whiteout"}),
    "dir removed and made again": (recreate, {"/usr": "dir", "/usr/share": "dir", "/usr/share/doc": "dir",
                                              "/usr/share/doc/a": "opaque dir", "/usr/share/doc/a/NEWS": "- new"}),
    "chmod dir": (lambda m: os.chmod(m / "usr/share/doc", 0o700),
                  {"/usr": "dir", "/usr/share": "dir", "/usr/share/doc": "dir"}),
    "xattrs": (xattrs, {"/usr": "dir", "/usr/lib": "dir", "/usr/lib/lib.so": "metacopy", "/usr/bin": "dir",
                        "/usr/bin/tool": "metacopy", "/var": "dir", "/var/lib": "dir", "/var/lib/x": "dir",
                        "/var/lib/x/small": "metacopy"}),
    "hard links": (new_hard_links, {"/usr": "dir", "/usr/bin": "dir", "/usr/bin/new": "- new",
                                    "/usr/bin/new2": "- new", "/usr/lib": "dir",
                                    "/usr/lib/lib.so": "metacopy -> /usr/lib/lib.so",
                                    "/usr/lib/lib2.so": "metacopy -> /usr/lib/lib.so"}),
    "symlinks": (replace_symlink, {"/link": "l new", "/etc": "dir", "/etc/dangling": "l new"}),
    "devices, fifo, socket": (devices, {"/dev-null": "c new", "/dev-loop": "b new", "/fifo": "p new",
                                        "/sock": "s new"}),
    "deep tree": (lambda m: mkdirs_with_file(m / "usr", 40),
                  {"/usr": "dir", "/usr/d0": "opaque dir",
                   **{"/usr/" + "/".join(f"d{i}" for i in range(n)): "dir" for n in range(2, 41)},
                   "/usr/" + "/".join(f"d{i}" for i in range(40)) + "/bottom": "- new"}),
    "file to dir, dir to file": (file_to_dir_and_back,
                                 {"/etc": "dir", "/etc/big.conf": "opaque dir", "/etc/big.conf/part": "- new",
                                  "/usr": "dir", "/usr/share": "dir", "/usr/share/doc": "dir",
                                  "/usr/share/doc/b": "- new"}),
}


@pytest.mark.parametrize("name", list(OPERATIONS))
def test_each_operation_is_read_as_the_kernel_wrote_it_and_gives_mkcomposefs_bytes(
        layering: Layering, name: str) -> None:
    operation, expected = OPERATIONS[name]
    layering.change(operation)
    assert kinds(layering.upper) == expected
    layering.check()


def test_an_untouched_upper_gives_back_the_base_image(layering: Layering) -> None:
    layering.change(lambda m: None)
    built = layering.check()
    assert built.digest == layering.store.journal.image("base").digest
    assert (built.stats.files, built.changed) == (0, 0)


def test_a_change_that_alters_kept_inodes_is_rendered_whole(layering: Layering) -> None:
    """A new smallest mtime changes every inode's stored time: relocate declines, the render runs, same bytes."""
    layering.change(lambda m: write(m / "etc/ancient", b"old\n") or os.utime(m / "etc/ancient", ns=(1, 1)))
    built = layering.check()
    assert built.provenance()["layered"]["relocated"] is False


def test_only_new_data_is_read_and_unchanged_files_keep_their_objects(layering: Layering) -> None:
    def many(m: Path) -> None:
        write(m / "usr/bin/new", blob("new", 500))
        write(m / "etc/new.conf", b"a=1\n")
        append(m / "etc/big.conf", b"more")
        os.chmod(m / "usr/bin/tool", 0o700)
        os.rename(m / "usr/share/doc/a", m / "usr/share/doc/c")
        os.unlink(m / "usr/share/doc/b/README")

    layering.change(many)
    built = layering.check()
    # read: usr/bin/new, etc/new.conf, etc/big.conf; not the chmod-ed tool nor the renamed docs
    assert (built.stats.files, built.stats.bytes, built.stats.external) == (3, 500 + 4 + 304, 2)
    assert built.stats.objects_created == 2
    tree = reader.read_image(built.staged)
    base = reader.read_image(layering.store.image_file("base"))
    tool = tree.children[b"usr"].children[b"bin"].children[b"tool"]
    base_tool = base.children[b"usr"].children[b"bin"].children[b"tool"]
    assert (tool.mode, tool.digest) == (stat.S_IFREG | 0o700, base_tool.digest)
    docs = tree.children[b"usr"].children[b"share"].children[b"doc"].children
    assert sorted(docs) == [b"b", b"c"] and sorted(docs[b"c"].children) == [b"README", b"copyright"]
    assert built.provenance() == {"layered": {"base": layering.store.journal.image("base").digest, "changed": 13,
                                              "relocated": True}}  # the base's inodes moved, no full render
    # recorded as a delta of the base's manifest: only the objects that came and went
    assert built.manifest.base == layering.store.journal.image("base").digest
    assert sorted(o for o, _ in built.manifest.added) == sorted(
        fsverity.object_path(fsverity.digest_bytes(d)) for d in (blob("new", 500), blob("conf", 300) + b"more"))
    assert built.manifest.removed == {fsverity.object_path(fsverity.digest_bytes(d))
                                      for d in (blob("conf", 300), blob("rb", 200))}


def test_prepare_upper_gives_the_merged_root_the_base_root(layering: Layering, tmp_path: Path) -> None:
    base = reader.read_image(layering.store.image_file("base"))
    bare = tmp_path / "bare"
    bare.mkdir(mode=0o700)
    delta = upper.read_upper(bare)
    assert stat.S_IMODE(delta.root.mode) == 0o700  # what the mount would show, unprepared
    upper.prepare_upper(bare, base)
    delta = upper.read_upper(bare)
    assert (delta.root.mode, delta.root.mtime_sec, delta.root.mtime_nsec, delta.root.xattrs) == (
        base.mode, base.mtime_sec, base.mtime_nsec, base.xattrs)


def test_base_hard_links_become_the_files_a_scan_of_the_merged_view_gives(store: Store, layering: Layering,
                                                                         tmp_path: Path) -> None:
    dump = tmp_path / "linked.dump"
    dump.write_bytes(b"/ 0 40755 2 0 0 0 0.0 - - -\n"
                     b"/a 5 100644 3 0 0 0 0.0 - hello -\n/b 0 @100644 0 0 0 0 0.0 /a - -\n"
                     b"/c 0 @100644 0 0 0 0 0.0 /a - -\n")
    store.create(str(dump), "linked", CreateOptions(backend="python", from_file=True))
    (tmp_path / "linked").mkdir()
    linked = Layering(store, tmp_path / "linked", base="linked")
    linked.change(lambda m: (os.unlink(m / "a"), os.chmod(m / "c", 0o600)))
    built = linked.check()
    tree = reader.read_image(built.staged)
    assert sorted(tree.children) == [b"b", b"c"]
    assert [(n.link, n.nlink, n.content) for n in tree.children.values()] == [(None, 1, b"hello")] * 2


def test_a_layered_source_is_checked_and_built_by_apt_layer_alone(store: Store, tmp_path: Path) -> None:
    store.create(str(make_base(tmp_path / "src")), "base", PY)
    base = str(store.image_file("base"))
    (tmp_path / "up").mkdir()
    with pytest.raises(errors.NotFound, match="^upper directory .*/nosuch: no such directory$"):
        LayeredSource(base, str(tmp_path / "nosuch")).check()
    with pytest.raises(errors.NotFound, match="^base image .*/nosuch.cfs: no such file$"):
        LayeredSource(str(tmp_path / "nosuch.cfs"), str(tmp_path / "up")).check()
    source = LayeredSource(base, str(tmp_path / "up"))
    with pytest.raises(errors.Unsupported, match="mkcomposefs cannot lay an upper directory over an image"):
        store.builder.build(source, tmp_path / "x.cfs", CreateOptions(backend="upstream"))
    with pytest.raises(errors.InvalidInput, match="takes no scan options"):
        store.builder.build(source, tmp_path / "x.cfs", CreateOptions(use_epoch=True))
    (tmp_path / "bad.cfs").write_bytes(b"not an image")
    with pytest.raises(errors.InvalidInput, match="^base image .*/bad.cfs: image too small"):
        store.builder.build(LayeredSource(str(tmp_path / "bad.cfs"), str(tmp_path / "up")), tmp_path / "x.cfs", PY)
    assert not (tmp_path / "x.cfs").exists()


# --- a hostile or malformed upper directory ----------------------------------------------


def test_symlinks_in_the_upper_directory_are_never_followed(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    write(outside / "secret", blob("secret", 200))
    up = tmp_path / "up"
    up.mkdir()
    os.symlink(outside, up / "etc")
    delta = upper.read_upper(up)
    assert [(c.path, c.node.payload) for c in delta.changes] == [(b"/etc", os.fsencode(outside))]
    assert delta.stats.files == 0
    os.symlink(outside, tmp_path / "up-link")
    with pytest.raises(upper.UpperError, match="not a directory"):
        upper.read_upper(tmp_path / "up-link")


def test_an_upper_directory_deeper_than_the_limit_is_refused(tmp_path: Path) -> None:
    deepest = tmp_path.joinpath("up", *["d"] * upper.MAX_DEPTH)
    deepest.mkdir(parents=True)
    assert len(upper.read_upper(tmp_path / "up").changes) == upper.MAX_DEPTH
    (deepest / "d").mkdir()
    with pytest.raises(upper.UpperError, match=f"more than {upper.MAX_DEPTH} levels deep$"):
        upper.read_upper(tmp_path / "up")


def test_a_metacopy_without_base_data_is_refused(tmp_path: Path) -> None:
    up = tmp_path / "up"
    up.mkdir()
    write(up / "ghost", b"\0" * 100)
    os.setxattr(up / "ghost", "trusted.overlay.metacopy", b"")
    delta = upper.read_upper(up)
    with pytest.raises(upper.UpperError, match="^/ghost: metadata-only copy without its data in the base$"):
        upper.apply(Node(), delta)


def test_a_metacopy_recording_another_digest_than_its_base_data_is_refused(tmp_path: Path) -> None:
    data = blob("data", 100)
    digest = fsverity.digest_bytes(data)

    def base() -> Node:
        return Node(children={b"f": Node(mode=stat.S_IFREG | 0o644, size=100, digest=digest,
                                         payload=fsverity.object_path(digest).encode())})

    up = tmp_path / "up"
    up.mkdir()
    (up / "f").touch()
    os.truncate(up / "f", 100)
    os.setxattr(up / "f", "trusted.overlay.metacopy", bytes.fromhex("00240001") + digest)
    assert upper.apply(base(), upper.read_upper(up)).children[b"f"].digest == digest
    os.setxattr(up / "f", "trusted.overlay.metacopy", bytes.fromhex("00240001") + bytes(32))
    with pytest.raises(upper.UpperError, match="^/f: metadata-only copy records another digest"):
        upper.apply(base(), upper.read_upper(up))


def test_a_relative_redirect_with_a_slash_is_refused(tmp_path: Path) -> None:
    up = tmp_path / "up"
    (up / "d").mkdir(parents=True)
    os.setxattr(up / "d", "trusted.overlay.redirect", b"a/b")
    with pytest.raises(upper.UpperError, match="invalid redirect"):
        upper.apply(Node(), upper.read_upper(up))


# --- random sequences ---------------------------------------------------------------------------

STEPS = ("write", "append", "truncate", "chmod", "chown", "utime", "rename", "unlink", "mkdir", "rmtree",
         "symlink", "link", "setxattr", "mknod")


def entries(mnt: Path) -> list[Path]:
    found = []
    for dirpath, dirnames, filenames in os.walk(mnt):
        dirnames.sort()
        found += [Path(dirpath, n) for n in sorted(dirnames + filenames)]
    return found


def step(mnt: Path, data, n: int) -> None:
    """One random change through the mount (one that the file system refuses is skipped)."""
    kind = data.draw(st.sampled_from(STEPS))
    paths = entries(mnt)
    target = data.draw(st.sampled_from(paths)) if paths else mnt / "x"
    dirs = [mnt] + [p for p in paths if p.is_dir() and not p.is_symlink()]
    place = data.draw(st.sampled_from(dirs)) / f"n{n}"
    size = data.draw(st.sampled_from((0, 7, 64, 65, 3000)))
    try:
        if kind == "write":
            write(place if data.draw(st.booleans()) else target, blob(f"w{n}", size))
        elif kind == "append":
            append(target, blob(f"a{n}", size))
        elif kind == "truncate":
            os.truncate(target, size)
        elif kind == "chmod":
            os.chmod(target, 0o700, follow_symlinks=False) if not target.is_symlink() else None
        elif kind == "chown":
            os.lchown(target, n, 2 * n)
        elif kind == "utime":
            os.utime(target, ns=(n, n * 1_000_000_007), follow_symlinks=False)
        elif kind == "rename":
            os.rename(target, place)
        elif kind == "unlink":
            os.unlink(target)
        elif kind == "mkdir":
            place.mkdir()
        elif kind == "rmtree" and target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        elif kind == "symlink":
            os.symlink(os.path.relpath(target, place.parent), place)
        elif kind == "link":
            os.link(target, place, follow_symlinks=False)
        elif kind == "setxattr":
            os.setxattr(target, f"user.k{n % 3}", blob("v", n % 5), follow_symlinks=False)
        elif kind == "mknod":
            os.mknod(place, stat.S_IFCHR | 0o600, os.makedev(1, n % 8))
    except OSError as e:
        if e.errno not in (errno.EISDIR, errno.ENOTDIR, errno.EINVAL, errno.ENOTEMPTY, errno.EEXIST, errno.EPERM,
                           errno.ENOENT, errno.ENAMETOOLONG, errno.EXDEV):
            raise


def test_random_changes_give_mkcomposefs_bytes(layering: Layering) -> None:
    @settings(max_examples=10, deadline=None, suppress_health_check=list(HealthCheck))
    @given(st.data())
    def run(data) -> None:
        layering.new_upper()
        steps = data.draw(st.integers(1, 12))
        layering.change(lambda m: [step(m, data, n) for n in range(1, steps + 1)])
        layering.check()

    run()


# --- dpkg -i in a chroot of the writable mount ---------------------------------------------------------

CHROOT_PROGRAMS = ("dpkg", "dpkg-deb", "dpkg-split", "tar", "sh", "rm")


def chroot_base(root: Path) -> None:
    """A tree in which ``dpkg -i`` runs: the host's dpkg and helpers with their libraries, an empty database."""
    for d in ("usr/bin", "usr/lib/x86_64-linux-gnu", "usr/lib64", "proc", "dev", "tmp", "etc",
              "var/lib/dpkg/info", "var/lib/dpkg/updates", "var/lib/dpkg/triggers"):
        (root / d).mkdir(parents=True, exist_ok=True)
    for name in ("bin", "lib", "lib64"):
        os.symlink(f"usr/{name}", root / name)
    (root / "var/lib/dpkg/status").write_bytes(b"")
    for program in CHROOT_PROGRAMS:
        path = shutil.which(program)
        shutil.copy(path, root / "usr/bin" / program)
        libs = subprocess.run(["ldd", path], capture_output=True, text=True, check=True).stdout.split()
        for lib in (word for word in libs if word.startswith("/")):
            into = root / ("usr/lib64" if lib.startswith("/lib64/") else "usr/lib/x86_64-linux-gnu")
            shutil.copy(os.path.realpath(lib), into / os.path.basename(lib))


def make_deb(tmp: Path, version: str, files: dict[str, bytes]) -> Path:
    """A package ``hello-layer`` of ``files``; its postinst writes the version into /etc."""
    pkg = tmp / f"pkg-{version}"
    (pkg / "DEBIAN").mkdir(parents=True)
    (pkg / "DEBIAN/control").write_text(f"Package: hello-layer\nVersion: {version}\nArchitecture: all\n"
                                        "Maintainer: apt-layer tests <tests@example.org>\nDescription: a test\n")
    (pkg / "DEBIAN/postinst").write_text(f"#!/bin/sh\necho configured {version} > /etc/hello-layer.state\n")
    os.chmod(pkg / "DEBIAN/postinst", 0o755)
    for rel, data in files.items():
        (pkg / rel).parent.mkdir(parents=True, exist_ok=True)
        write(pkg / rel, data)
    os.chmod(pkg / "usr/bin/hello-layer", 0o755)
    deb = tmp / f"hello-layer_{version}_all.deb"
    subprocess.run(["dpkg-deb", "--root-owner-group", "--build", str(pkg), str(deb)], check=True, capture_output=True)
    return deb


def dpkg_install(root: Path, deb: Path) -> None:
    """``dpkg -i`` in a chroot of ``root``, with /proc and /dev bound."""
    shutil.copy(deb, root / "tmp/package.deb")
    subprocess.run(["mount", "--bind", "/proc", str(root / "proc")], check=True)
    try:
        subprocess.run(["mount", "--rbind", "/dev", str(root / "dev")], check=True)
        try:
            subprocess.run([shutil.which("chroot"), str(root), "/usr/bin/dpkg", "--force-bad-path", "-i",
                            "/tmp/package.deb"], check=True, capture_output=True, env={"PATH": "/usr/bin:/bin"})
        finally:
            subprocess.run(["umount", "-R", str(root / "dev")], check=True)
    finally:
        subprocess.run(["umount", str(root / "proc")], check=True)
    os.unlink(root / "tmp/package.deb")


SCRIPT = b"#!/bin/sh\necho hello\n"


def test_dpkg_upgrade_in_a_chroot_gives_mkcomposefs_bytes(store: Store, tmp_path: Path, as_root: None) -> None:
    for tool in (*CHROOT_PROGRAMS, "ldd", "chroot", "mount", "umount"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed")
    if not Path("/lib64/ld-linux-x86-64.so.2").exists():
        pytest.skip("the chroot is laid out for x86-64")
    src = tmp_path / "src"
    chroot_base(src)
    dpkg_install(src, make_deb(tmp_path, "1.0", {"usr/share/hello-layer/data": blob("data", 3000),
                                                 "usr/share/hello-layer/old": blob("old", 200),
                                                 "usr/bin/hello-layer": SCRIPT}))
    store.create(str(src), "base", PY)
    v2 = make_deb(tmp_path, "2.0", {"usr/share/hello-layer/data": blob("data2", 3000),
                                    "usr/share/hello-layer/extra/new": blob("new", 100),
                                    "usr/bin/hello-layer": SCRIPT})
    layering = Layering(store, tmp_path)
    try:
        layering.change(lambda m: dpkg_install(m, v2))
    except (errors.PermissionDenied, errors.Unsupported) as e:
        pytest.skip(f"cannot mount writable composefs here: {e}")
    found = kinds(layering.upper)
    assert found["/usr/share/hello-layer/old"] == "whiteout"
    assert found["/usr/share/hello-layer/extra"] == "opaque dir"  # a directory dpkg made inside a base one
    assert found["/usr/share/hello-layer/data"] == found["/etc/hello-layer.state"] == "- new"
    built = layering.check()
    # read: only the regular files the upper directory holds data for, none of the base's programs
    assert built.stats.files == sum(kind == "- new" for kind in found.values()) < 30
    base_bytes = sum(p.stat().st_size for p in src.rglob("*") if p.is_file() and not p.is_symlink())
    assert built.stats.bytes < 20_000 < base_bytes
    tree = reader.read_image(built.staged)
    status = reader.read_path(built.staged, b"/var/lib/dpkg/status")
    recorded = (store.layout.objects / os.fsdecode(status.payload)).read_bytes() if status.payload else status.content
    assert b"Package: hello-layer\nStatus: install ok installed\n" in recorded and b"Version: 2.0\n" in recorded
    assert reader.read_path(built.staged, b"/etc/hello-layer.state").content == b"configured 2.0\n"
    share = tree.children[b"usr"].children[b"share"].children[b"hello-layer"].children
    assert sorted(share) == [b"data", b"extra"]
    assert share[b"data"].digest == fsverity.digest_bytes(blob("data2", 3000))
