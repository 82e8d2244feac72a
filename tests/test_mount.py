"""Native composefs mounts on the real kernel, checked against the vectors.

Every vector image is mounted with the shared object pool as basedir and
walked; what the mount shows must be what ``dump.txt`` describes, with the
differences composefs-tools.md §2 documents: a whiteout (0/0 char device)
reads back as an empty regular file carrying the overlay whiteout xattrs, its
directory gains the ``...whiteouts`` markers, and the 256 root whiteouts stay
hidden.  The same images are mounted by upstream ``mount.composefs`` when it
is installed, and both views must agree.

Needs root, erofs and overlayfs; skips with the reason otherwise.  Every test
checks that it leaves no mount, temporary directory or loop device behind.
"""

from __future__ import annotations

import dataclasses
import errno
import glob
import hashlib
import os
import re
import shutil
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from aptlayer.composefs import fsverity
from aptlayer.composefs import mount as cfsmount
from aptlayer.composefs.mount import MountError, is_composefs, mount, unmount
from aptlayer.linux import verity
from aptlayer.linux.mountinfo import MountInfo, is_mounted, mount_info
from conftest import VECTORS, vector_names

pytestmark = pytest.mark.root

OBJECTS = VECTORS / "objects"
WHITEOUT_XATTRS = {b"trusted.overlay.whiteout": b"", b"user.overlay.whiteout": b""}
WHITEOUTS_MARKERS = {b"trusted.overlay.whiteouts": b"", b"user.overlay.whiteouts": b""}
#: the composefs header magic, little-endian: enough to get past the header check to erofs
MAGIC = bytes.fromhex("9a6278d0")


# --- the dump, as far as these tests need it ----------------------------------------

_ESCAPE = re.compile(rb"\\(x[0-9a-fA-F]{2}|[\\nrt])")
_ESCAPES = {b"\\": b"\\", b"n": b"\n", b"r": b"\r", b"t": b"\t"}


def _unescape(field: bytes) -> bytes:
    def one(m: re.Match[bytes]) -> bytes:
        g = m.group(1)
        return bytes([int(g[1:], 16)]) if len(g) == 3 else _ESCAPES[g]

    return _ESCAPE.sub(one, field)


def _optional(field: bytes) -> bytes | None:
    return None if field == b"-" else _unescape(field)


@dataclasses.dataclass
class Entry:
    """One dump line; a hard link (``@MODE``) has ``link`` = its target's path."""

    size: int
    mode: int
    uid: int
    gid: int
    rdev: int
    mtime_ns: int
    payload: bytes | None
    content: bytes | None
    digest: bytes | None
    xattrs: dict[bytes, bytes]
    link: bytes | None = None


def parse_dump(text: bytes) -> dict[bytes, Entry]:
    entries: dict[bytes, Entry] = {}
    for line in text.splitlines():
        f = line.split(b" ")
        sec, nsec = f[7].split(b".")
        entry = Entry(
            size=int(f[1]),
            mode=int(f[2].lstrip(b"@"), 8),
            uid=int(f[4]),
            gid=int(f[5]),
            rdev=int(f[6]),
            mtime_ns=int(sec) * 10**9 + int(nsec),
            payload=_optional(f[8]),
            content=_optional(f[9]),
            digest=bytes.fromhex(f[10].decode()) if f[10] != b"-" else None,
            xattrs=dict(_xattr(x) for x in f[11:]),
        )
        if f[2].startswith(b"@"):
            # a hard link shows everything of its target
            entry = dataclasses.replace(entries[entry.payload or b""], link=entry.payload)
        entries[_unescape(f[0])] = entry
    return entries


def _xattr(field: bytes) -> tuple[bytes, bytes]:
    key, value = field.split(b"=", 1)
    return _unescape(key), _unescape(value)


def expected_view(entries: dict[bytes, Entry]) -> dict[bytes, Entry]:
    """What the mount should show for each dump entry (composefs-tools.md §2)."""
    view = {p: dataclasses.replace(e, xattrs=dict(e.xattrs)) for p, e in entries.items()}
    for path, e in view.items():
        if stat.S_ISCHR(e.mode) and e.rdev == 0:
            e.mode = stat.S_IFREG | stat.S_IMODE(e.mode)
            e.xattrs.update(WHITEOUT_XATTRS)
            parent = view[os.path.dirname(path)]
            parent.xattrs.update(WHITEOUTS_MARKERS)
    return view


# --- walking a mount ------------------------------------------------------------------


@dataclasses.dataclass
class Seen:
    """What a path shows in a mount; ``error`` is the errno of a failed lstat."""

    st: os.stat_result | None
    xattrs: dict[bytes, bytes]
    error: int = 0


def walk(root: Path) -> dict[bytes, Seen]:
    out: dict[bytes, Seen] = {}
    stack = [b""]
    while stack:
        rel = stack.pop()
        full = os.fsencode(root) + rel
        try:
            st = os.lstat(full)
        except OSError as e:
            out[rel or b"/"] = Seen(None, {}, e.errno or 0)
            continue
        names = os.listxattr(full, follow_symlinks=False)
        xattrs = {os.fsencode(n): os.getxattr(full, n, follow_symlinks=False) for n in names}
        out[rel or b"/"] = Seen(st, xattrs)
        if stat.S_ISDIR(st.st_mode):
            stack.extend(rel + b"/" + name for name in os.listdir(full))
    return out


def read_or_errno(path: bytes) -> bytes | int:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        return e.errno or 0


def check_tree(root: Path, dump: bytes, objects: Path = OBJECTS) -> None:
    """Assert that the mount at ``root`` shows exactly what ``dump`` describes."""
    expected = expected_view(parse_dump(dump))
    seen = walk(root)
    assert sorted(seen) == sorted(expected)
    for path, e in expected.items():
        check_entry(os.fsencode(root) + path, e, seen[path], objects)
    for path, e in expected.items():
        if e.link is not None:
            assert seen[path].st is not None and seen[e.link].st is not None
            assert seen[path].st.st_ino == seen[e.link].st.st_ino, path


def check_entry(full: bytes, e: Entry, seen: Seen, objects: Path) -> None:
    if stat.S_ISREG(e.mode) and e.size and e.content is None and e.payload is None:
        # mkcomposefs marks such a file (dumps only) as metacopy with no
        # redirect: overlayfs finds no data and fails the lookup itself.
        assert seen.error == errno.EIO, full
        return
    st = seen.st
    assert st is not None, (full, seen.error)
    assert (st.st_mode, st.st_uid, st.st_gid, st.st_mtime_ns) == (e.mode, e.uid, e.gid, e.mtime_ns), full
    assert st.st_size == e.size, full
    if stat.S_ISCHR(e.mode) or stat.S_ISBLK(e.mode):
        assert st.st_rdev == e.rdev, full
    assert seen.xattrs == e.xattrs, full
    if stat.S_ISLNK(e.mode):
        assert os.readlink(full) == e.payload, full
    elif stat.S_ISREG(e.mode):
        check_content(full, e, objects)


def check_content(full: bytes, e: Entry, objects: Path) -> None:
    data = read_or_errno(full)
    if e.payload is None:
        assert data == (e.content or b""), full
    elif (objects / os.fsdecode(e.payload)).is_file():
        assert isinstance(data, bytes) and len(data) == e.size, full
        obj = (objects / os.fsdecode(e.payload)).read_bytes()
        assert hashlib.sha256(data).digest() == hashlib.sha256(obj).digest(), full
        if e.digest is not None:
            assert fsverity.digest_bytes(data) == e.digest, full
    else:
        # the object is in no basedir: metadata is there, data is not
        assert data == errno.ENOENT, full


# --- fixtures ---------------------------------------------------------------------------


def _mount_set() -> set[tuple[str, str, str]]:
    return {(m.mount_point, m.fstype, m.source) for m in mount_info()}


def _leftovers() -> list[str]:
    temp = glob.glob(f"/tmp/{cfsmount.TEMP_PREFIX}{os.getpid()}.*")
    loops = [p for p in glob.glob("/sys/block/loop*/loop/backing_file")
             if str(VECTORS) in Path(p).read_text() or "/pytest-" in Path(p).read_text()]
    return temp + loops


@pytest.fixture
def clean(kernel: None) -> Iterator[None]:
    """Fails the test if it leaves a mount, a temp dir or a loop device behind."""
    before = _mount_set()
    yield
    assert _mount_set() == before
    assert _leftovers() == []


def _force_unmount(path: Path) -> None:
    while is_mounted(path):
        subprocess.run(["umount", "-l", str(path)], check=True)


@pytest.fixture
def mnt(tmp_path: Path, clean: None) -> Iterator[Path]:
    """An empty mount point, unmounted afterwards whatever the test did."""
    path = tmp_path / "mnt"
    path.mkdir()
    try:
        yield path
    finally:
        _force_unmount(path)


def image(name: str) -> Path:
    return VECTORS / name / "image.cfs"


def dump_of(name: str) -> bytes:
    return (VECTORS / name / "dump.txt").read_bytes()


def composefs_mount(target: Path) -> MountInfo:
    [info] = [m for m in mount_info() if m.mount_point == str(target)]
    return info


def option_keys(info: MountInfo) -> list[str]:
    return [o.split("=", 1)[0] for o in info.super_options]


# --- every vector, mounted natively ---------------------------------------------------------


@pytest.mark.parametrize("name", vector_names())
def test_vector_mounts_as_its_dump(vectors: Path, mnt: Path, name: str) -> None:
    mount(image(name), mnt, [OBJECTS])
    try:
        info = composefs_mount(mnt)
        assert (info.fstype, info.source) == ("overlay", "composefs")
        assert option_keys(info) == ["ro", "lowerdir+", "datadir+", "redirect_dir", "metacopy"]
        check_tree(mnt, dump_of(name))
    finally:
        unmount(mnt)


def _listing(root: Path) -> dict[bytes, tuple[object, ...]]:
    """Everything a reader can see, for comparing two mounts of one image."""
    out: dict[bytes, tuple[object, ...]] = {}
    for path, s in walk(root).items():
        if s.st is None:
            out[path] = ("error", s.error)
            continue
        st = s.st
        full = os.fsencode(root) + path
        extra: object = None
        if stat.S_ISLNK(st.st_mode):
            extra = os.readlink(full)
        elif stat.S_ISREG(st.st_mode):
            data = read_or_errno(full)
            extra = hashlib.sha256(data).hexdigest() if isinstance(data, bytes) else data
        out[path] = (st.st_mode, st.st_uid, st.st_gid, st.st_size, st.st_nlink, st.st_rdev,
                     st.st_mtime_ns, sorted(s.xattrs.items()), extra)
    return out


@pytest.mark.upstream
@pytest.mark.parametrize("name", vector_names())
def test_same_as_mount_composefs(vectors: Path, tmp_path: Path, clean: None, mount_composefs: str,
                                 name: str) -> None:
    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    ours.mkdir()
    theirs.mkdir()
    mount(image(name), ours, [OBJECTS])
    try:
        subprocess.run([mount_composefs, str(image(name)), str(theirs), "-o", f"basedir={OBJECTS}"],
                       check=True, capture_output=True)
        try:
            a, b = composefs_mount(ours), composefs_mount(theirs)
            assert (a.fstype, a.source, a.options) == (b.fstype, b.source, b.options)
            assert option_keys(a) == option_keys(b)
            datadirs = [o for o in a.super_options if o.startswith("datadir+=")]
            assert datadirs == [o for o in b.super_options if o.startswith("datadir+=")]
            assert _listing(ours) == _listing(theirs)
        finally:
            _force_unmount(theirs)
    finally:
        unmount(ours)


# --- the fallbacks, each on the real kernel ------------------------------------------------

PLANS = {
    "file-fd": cfsmount._Plan(),
    "loop-fd": cfsmount._Plan(backing="loop"),
    "file-tmpdir": cfsmount._Plan(lower="tmpdir"),
    "legacy": cfsmount._Plan(lower="tmpdir", api="legacy"),
    "legacy-loop": cfsmount._Plan(backing="loop", lower="tmpdir", api="legacy"),
    "legacy-no-data-only": cfsmount._Plan(lower="tmpdir", api="legacy", data_only=False),
}


def _request(img: Path, target: Path, basedirs: list[Path], **kw: object) -> cfsmount._Request:
    args: dict[str, object] = dict(digest=None, verity="off", upperdir=None, workdir=None, idmap=None,
                                   readonly=False, overmount=False)
    args.update(kw)
    return cfsmount._request(img, target, basedirs, **args)  # type: ignore[arg-type]


@pytest.mark.parametrize("plan", PLANS, ids=list(PLANS))
def test_every_fallback_path_mounts_the_same_tree(vectors: Path, mnt: Path, plan: str) -> None:
    """The kernel here takes the first plan; the others are forced to prove they work."""
    used = cfsmount._mount(_request(image("devices"), mnt, [OBJECTS]), PLANS[plan])
    assert used == PLANS[plan]
    try:
        info = composefs_mount(mnt)
        lower = [o for o in info.super_options if o.startswith("lowerdir")]
        if plan.endswith("fd"):
            assert lower == ["lowerdir+=/"]
        else:
            tmp = re.sub(r"^lowerdir\+?=|:.*$", "", lower[0])
            assert tmp.startswith(f"/tmp/{cfsmount.TEMP_PREFIX}") and not os.path.exists(tmp)
        check_tree(mnt, dump_of("devices"))
    finally:
        unmount(mnt)


@pytest.mark.parametrize("plan", PLANS, ids=list(PLANS))
def test_failed_fallback_path_leaves_nothing(tmp_path: Path, mnt: Path, plan: str) -> None:
    junk = tmp_path / "junk.cfs"
    junk.write_bytes(MAGIC + os.urandom(20000))
    with pytest.raises(MountError) as exc:
        cfsmount._mount(_request(junk, mnt, [OBJECTS]), PLANS[plan])
    assert exc.value.errno == errno.EINVAL
    assert "not a valid composefs image" in str(exc.value)


@pytest.mark.parametrize("plan", ["file-fd", "legacy", "legacy-no-data-only"])
def test_basedir_with_separators_in_its_name(vectors: Path, tmp_path: Path, mnt: Path, plan: str) -> None:
    """fsconfig takes the path as is; the legacy option string must escape ``,`` and ``:``."""
    odd = tmp_path / "objects, a:b\\c"
    shutil.copytree(OBJECTS, odd)
    cfsmount._mount(_request(image("sizes"), mnt, [odd]), PLANS[plan])
    try:
        options = composefs_mount(mnt).super_options
        if plan == "file-fd":
            assert f"datadir+={odd}" in options
        else:
            sep = "::" if PLANS[plan].data_only else ":"
            [lower] = [o for o in options if o.startswith("lowerdir=")]
            assert lower.endswith(sep + cfsmount._legacy_escape(str(odd)))
        check_tree(mnt, dump_of("sizes"), objects=odd)
    finally:
        unmount(mnt)


def test_this_kernel_takes_the_fd_path(vectors: Path, mnt: Path) -> None:
    assert cfsmount._mount(_request(image("xattrs"), mnt, [OBJECTS]), cfsmount._Plan()) == cfsmount._Plan()
    unmount(mnt)


# --- options ------------------------------------------------------------------------------


def _tree_digest(path: Path) -> dict[str, str]:
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


def test_writable_mount_writes_to_upper(vectors: Path, tmp_path: Path, mnt: Path) -> None:
    upper, work = tmp_path / "upper", tmp_path / "work"
    upper.mkdir()
    work.mkdir()
    before = (hashlib.sha256(image("hardlinks").read_bytes()).hexdigest(), _tree_digest(OBJECTS))
    mount(image("hardlinks"), mnt, [OBJECTS], upperdir=upper, workdir=work)
    try:
        assert "uuid=on" in composefs_mount(mnt).super_options
        (mnt / "new.txt").write_bytes(b"new file")
        with open(mnt / "data" / "file5000", "r+b") as f:  # copy-up of an external file
            f.write(b"CHANGED")
        os.unlink(mnt / "data" / "small")
        assert not (mnt / "data" / "small").exists()
        assert (mnt / "data" / "file5000").read_bytes()[:7] == b"CHANGED"
    finally:
        unmount(mnt)
    assert (upper / "new.txt").read_bytes() == b"new file"
    assert (upper / "data" / "file5000").read_bytes()[:7] == b"CHANGED"
    assert len((upper / "data" / "file5000").read_bytes()) == 5000
    gone = os.lstat(upper / "data" / "small")
    assert stat.S_ISCHR(gone.st_mode) and gone.st_rdev == 0
    assert before == (hashlib.sha256(image("hardlinks").read_bytes()).hexdigest(), _tree_digest(OBJECTS))


def test_objects_are_looked_up_in_every_basedir(vectors: Path, tmp_path: Path, mnt: Path) -> None:
    """An object only in the second basedir reads; one in neither stats but cannot be opened."""
    entries = parse_dump(dump_of("dedupe"))
    by_payload = {e.payload: p for p, e in entries.items() if e.payload and stat.S_ISREG(e.mode)}
    present, absent = sorted(by_payload)[:2]
    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir()
    only = second / os.fsdecode(present)
    only.parent.mkdir(parents=True)
    shutil.copyfile(OBJECTS / os.fsdecode(present), only)
    mount(image("dedupe"), mnt, [first, second])
    try:
        info = composefs_mount(mnt)
        assert [o for o in info.super_options if o.startswith("datadir+")] == [
            f"datadir+={first}", f"datadir+={second}"]
        assert (mnt / os.fsdecode(by_payload[present][1:])).read_bytes() == only.read_bytes()
        missing = mnt / os.fsdecode(by_payload[absent][1:])
        assert missing.stat().st_size == entries[by_payload[absent]].size
        with pytest.raises(FileNotFoundError):
            missing.read_bytes()
        check_tree(mnt, dump_of("dedupe"), objects=second)
    finally:
        unmount(mnt)


def test_readonly_upper_refuses_writes(vectors: Path, tmp_path: Path, mnt: Path) -> None:
    upper, work = tmp_path / "upper", tmp_path / "work"
    upper.mkdir()
    work.mkdir()
    mount(image("symlinks"), mnt, [OBJECTS], upperdir=upper, workdir=work, readonly=True)
    try:
        assert "ro" in composefs_mount(mnt).options
        with pytest.raises(OSError) as exc:
            (mnt / "x").write_bytes(b"x")
        assert exc.value.errno == errno.EROFS
    finally:
        unmount(mnt)


@pytest.fixture
def userns() -> Iterator[str]:
    """A user namespace mapping 0..65535 to 100000.., held by a sleeping child."""
    child = subprocess.Popen(["unshare", "--user", "sleep", "600"])
    try:
        for _ in range(100):
            if os.readlink(f"/proc/{child.pid}/ns/user") != os.readlink("/proc/self/ns/user"):
                break
            subprocess.run(["sleep", "0.02"], check=True)
        for name in ("uid_map", "gid_map"):
            Path(f"/proc/{child.pid}/{name}").write_text("0 100000 65536\n")
        yield f"/proc/{child.pid}/ns/user"
    finally:
        child.kill()
        child.wait()


def _mapped(kid: int) -> int:
    """An id seen through the map ``0 100000 65536``; unmapped ids show as the overflow id."""
    return kid + 100000 if kid < 65536 else 65534


def test_idmap_shifts_owners(vectors: Path, mnt: Path, userns: str) -> None:
    mount(image("modes-owners"), mnt, [OBJECTS], idmap=userns)
    try:
        expected = parse_dump(dump_of("modes-owners"))
        for path, seen in walk(mnt).items():
            assert seen.st is not None
            want = expected[path]
            assert (seen.st.st_uid, seen.st.st_gid) == (_mapped(want.uid), _mapped(want.gid)), path
    finally:
        unmount(mnt)


def test_idmap_needs_a_user_namespace(vectors: Path, mnt: Path) -> None:
    with pytest.raises(MountError) as exc:
        mount(image("symlinks"), mnt, [OBJECTS], idmap="/proc/self/ns/user")
    assert "idmap=/proc/self/ns/user" in str(exc.value)
    with pytest.raises(MountError) as exc:
        mount(image("symlinks"), mnt, [OBJECTS], idmap="/nonexistent/ns")
    assert exc.value.errno == errno.ENOENT


def _kernel_has_fsverity() -> bool:
    return not verity.kernel_lacks_fsverity()


def test_verity_require_is_refused_without_fsverity(vectors: Path, mnt: Path) -> None:
    if _kernel_has_fsverity():
        pytest.skip("this kernel has fs-verity")
    with pytest.raises(MountError) as exc:
        mount(image("sizes"), mnt, [OBJECTS], verity="require")
    assert exc.value.errno == errno.EOPNOTSUPP
    assert str(exc.value) == (
        f"verity=require: basedir {OBJECTS} cannot have fs-verity: this kernel was built without "
        "fs-verity (CONFIG_FS_VERITY is not set); every external file would fail to read with EIO "
        "(mount with verity 'try' or 'off')")


def test_verity_try_mounts_without_verity_where_unsupported(vectors: Path, mnt: Path) -> None:
    if _kernel_has_fsverity():
        pytest.skip("this kernel has fs-verity")
    mount(image("sizes"), mnt, [OBJECTS], verity="try")
    try:
        assert "verity=require" not in composefs_mount(mnt).super_options
        check_tree(mnt, dump_of("sizes"))
    finally:
        unmount(mnt)


def test_digest_needs_fsverity_on_the_image(vectors: Path, mnt: Path) -> None:
    if _kernel_has_fsverity():
        pytest.skip("this kernel has fs-verity")
    digest = (VECTORS / "sizes" / "digest.txt").read_text().strip()
    with pytest.raises(MountError) as exc:
        mount(image("sizes"), mnt, [OBJECTS], digest=digest)
    assert exc.value.errno == errno.EOPNOTSUPP
    assert str(exc.value) == (f"cannot check digest= of {image('sizes')}: this kernel was built without "
                              "fs-verity (CONFIG_FS_VERITY is not set)")


def test_mount_on_a_path_that_needs_escaping(vectors: Path, tmp_path: Path, clean: None) -> None:
    odd = tmp_path / "a b\tc\\d\ne"
    odd.mkdir()
    mount(image("symlinks"), odd, [OBJECTS])
    try:
        assert is_mounted(odd)
        assert is_composefs(composefs_mount(odd))
    finally:
        unmount(odd)
    assert not is_mounted(odd)


def test_overmount_only_when_asked(vectors: Path, mnt: Path) -> None:
    mount(image("symlinks"), mnt, [OBJECTS])
    try:
        with pytest.raises(MountError) as exc:
            mount(image("sizes"), mnt, [OBJECTS])
        assert exc.value.errno == errno.EBUSY
        assert "already a mount point" in str(exc.value)
        mount(image("sizes"), mnt, [OBJECTS], overmount=True)
        assert {p.name for p in mnt.iterdir()} == {
            os.fsdecode(p[1:]) for p in parse_dump(dump_of("sizes")) if p.count(b"/") == 1 and p != b"/"}
        unmount(mnt)
    finally:
        unmount(mnt)


# --- errors -------------------------------------------------------------------------------


def _junk(tmp: Path, data: bytes) -> Path:
    path = tmp / "bad.cfs"
    path.write_bytes(data)
    return path


ERRORS = {
    "junk-with-magic": (lambda t: (_junk(t, MAGIC + bytes(20000)), t / "m", [OBJECTS], {}),
                        errno.EINVAL, "not a valid composefs image: "),  # the reader refuses it first (redirects)
    "junk": (lambda t: (_junk(t, os.urandom(4096)), t / "m", [OBJECTS], {}),
             errno.EINVAL, "is not a composefs image (bad magic"),
    "empty-image": (lambda t: (_junk(t, b""), t / "m", [OBJECTS], {}),
                    errno.EINVAL, "is not a composefs image: only 0 bytes long"),
    "missing-image": (lambda t: (t / "nope.cfs", t / "m", [OBJECTS], {}),
                      errno.ENOENT, "nope.cfs does not exist"),
    "missing-mountpoint": (lambda t: (image("symlinks"), t / "nowhere", [OBJECTS], {}),
                           errno.ENOENT, "mount point"),
    "mountpoint-is-a-file": (lambda t: (image("symlinks"), image("sizes"), [OBJECTS], {}),
                             errno.ENOTDIR, "is not a directory"),
    "missing-basedir": (lambda t: (image("symlinks"), t / "m", [OBJECTS, t / "gone"], {}),
                        errno.ENOENT, "gone does not exist"),
    "no-basedir": (lambda t: (image("symlinks"), t / "m", [], {}),
                   errno.EINVAL, "at least one object directory"),
    "upper-without-work": (lambda t: (image("symlinks"), t / "m", [OBJECTS], {"upperdir": t}),
                           errno.EINVAL, "upperdir and workdir must be given together"),
    "bad-digest": (lambda t: (image("symlinks"), t / "m", [OBJECTS], {"digest": "xyz"}),
                   errno.EINVAL, "is not a hex fs-verity digest"),
    "bad-verity": (lambda t: (image("symlinks"), t / "m", [OBJECTS], {"verity": "maybe"}),
                   errno.EINVAL, "verity must be"),
}


@pytest.mark.parametrize("case", ERRORS, ids=list(ERRORS))
def test_failed_mount_says_why_and_leaves_nothing(vectors: Path, tmp_path: Path, clean: None,
                                                  case: str) -> None:
    make, code, message = ERRORS[case]
    (tmp_path / "m").mkdir()
    img, target, basedirs, options = make(tmp_path)
    with pytest.raises(MountError) as exc:
        mount(img, target, basedirs, **options)
    assert exc.value.errno == code
    assert message in str(exc.value)


def test_not_root_is_told_so(vectors: Path, tmp_path: Path, clean: None) -> None:
    """A forked child drops to nobody and tries; it reports back through a pipe."""
    target = tmp_path / "m"
    target.mkdir()
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        os.close(r)
        try:
            os.setgroups([])
            os.setresgid(65534, 65534, 65534)
            os.setresuid(65534, 65534, 65534)
            mount(image("symlinks"), target, [OBJECTS])
            os.write(w, b"mounted")
        except MountError as e:
            os.write(w, f"{e.errno} {e}".encode())
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        said = f.read().decode()
    os.waitpid(pid, 0)
    assert said == f"{errno.EPERM} {cfsmount._NOT_ROOT}"
    assert cfsmount._NOT_ROOT == "mounting composefs needs root (CAP_SYS_ADMIN in the initial user namespace)"


def test_unmount_refuses_what_is_not_composefs(tmp_path: Path, clean: None) -> None:
    target = tmp_path / "m"
    target.mkdir()
    with pytest.raises(MountError) as exc:
        unmount(target)
    assert (exc.value.errno, str(exc.value)) == (errno.EINVAL, f"{target} is not mounted")
    subprocess.run(["mount", "-t", "tmpfs", "apt-layer-test", str(target)], check=True)
    try:
        with pytest.raises(MountError) as exc:
            unmount(target)
        assert str(exc.value) == f"{target} is not a composefs mount (it is tmpfs from apt-layer-test)"
    finally:
        subprocess.run(["umount", str(target)], check=True)


def test_unmount_busy_then_lazy(vectors: Path, mnt: Path) -> None:
    mount(image("symlinks"), mnt, [OBJECTS])
    fd = os.open(mnt, os.O_RDONLY | os.O_DIRECTORY)
    try:
        with pytest.raises(MountError) as exc:
            unmount(mnt)
        assert exc.value.errno == errno.EBUSY and "busy" in str(exc.value)
        unmount(mnt, lazy=True)
        assert not is_mounted(mnt)
    finally:
        os.close(fd)


# --- which mounts are composefs ---------------------------------------------------------


def test_composefs_overlay_is_told_by_its_source() -> None:
    line = (rb"45 27 0:40 / /tmp/a\040b\011c\012d\134e rw,relatime shared:1 master:2 - overlay composefs "
            rb"ro,lowerdir+=/,datadir+=/srv/o\054x,redirect_dir=on,metacopy=on" b"\n")
    assert is_composefs(MountInfo.parse(line))
    assert not is_composefs(MountInfo.parse(line.replace(b" overlay composefs ", b" overlay overlay ")))
    assert not is_composefs(MountInfo.parse(line.replace(b" overlay composefs ", b" erofs composefs ")))
