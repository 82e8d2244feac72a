"""Reading dpkg databases: synthetic status files, this machine's own, and images.

The host's database is compared with dpkg-query on a snapshot of it (other
work may install packages meanwhile); images are built with the project's
writer from trees holding a database, and must read exactly like the tree.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aptlayer import errors
from aptlayer.composefs import build
from aptlayer.composefs.reader import read_path
from aptlayer.packages import dpkgdb, rootfs
from aptlayer.packages.dpkgdb import Conffile, MalformedDatabase, NoDpkgDatabase, Package, parse_status
from aptlayer.packages.rootfs import DamagedImage, ImageRoot, NotAFile, TreeRoot
from aptlayer.store import CreateOptions, Store

HOST_DPKG = Path("/var/lib/dpkg")

TRICKY = b"""\
Package: libfoo1
Status: install ok installed
Priority: optional
Section: libs
Installed-Size: 120
Maintainer: J\xc3\xb6rg Example <j@example.org>
Architecture: amd64
Multi-Arch: same
Source: foo (1:2.0-1)
Version: 1:2.0-1+b1
Description: the foo library
 Longer text that continues
 .
 over several lines.

Package: libfoo1
Status: install ok installed
Architecture: i386
Multi-Arch: same
Source: foo (1:2.0-1)
Version: 1:2.0-1+b1
Description: the foo library

Package: tool
Status: hold ok installed
Essential: yes
Protected: yes
Architecture: all
Version: 1.0~rc1
Source: toolsrc
Conffiles:
 /etc/tool/with space.conf 0123456789abcdef0123456789abcdef
 /etc/tool/old.conf fedcba9876543210fedcba9876543210 obsolete
 /etc/tool/gone.conf 00000000000000000000000000000000 remove-on-upgrade

Package: bare
Status: deinstall ok installed
Architecture: amd64
Version: 0

Package: oldpkg
Status: deinstall ok config-files
Version: 0.9
Architecture: amd64

Package: gonepkg
Status: deinstall ok config-files

Package: broken
Status: install reinstreq half-installed
Architecture: amd64
Version: 2

Package: pending
Status: install ok triggers-pending
Architecture: amd64
Version: 3
Triggers-Pending: ldconfig

Package: ghost
Status: purge ok not-installed
"""


def test_tricky_fields_parse_to_exact_records() -> None:
    db = parse_status(TRICKY)
    assert [p.key for p in db.installed] == ["bare:amd64", "libfoo1:amd64", "libfoo1:i386", "tool:all"]
    assert db.installed[1] == Package(
        name="libfoo1", version="1:2.0-1+b1", architecture="amd64", want="install", flag="ok",
        state="installed", multi_arch="same", source="foo", source_version="1:2.0-1", installed_size=120,
        section="libs", priority="optional", maintainer="J\u00f6rg Example <j@example.org>",
        summary="the foo library")
    assert db.installed[2].architecture == "i386" and db.installed[2].installed_size is None
    tool = db.installed[3]
    assert (tool.want, tool.version, tool.essential, tool.protected) == ("hold", "1.0~rc1", True, True)
    assert (tool.source, tool.source_version, tool.multi_arch) == ("toolsrc", "1.0~rc1", "no")
    assert tool.conffiles == (
        Conffile("/etc/tool/with space.conf", "0123456789abcdef0123456789abcdef"),
        Conffile("/etc/tool/old.conf", "fedcba9876543210fedcba9876543210", obsolete=True),
        Conffile("/etc/tool/gone.conf", "00000000000000000000000000000000", remove_on_upgrade=True),
    )
    bare = db.installed[0]
    assert (bare.want, bare.source, bare.source_version, bare.summary, bare.section) == \
        ("deinstall", "bare", "0", "", None)
    # the other states are kept apart, not-installed ones dropped
    assert [(p.key, p.status) for p in db.partial] == [
        ("broken:amd64", "install reinstreq half-installed"),
        ("gonepkg:", "deinstall ok config-files"),
        ("oldpkg:amd64", "deinstall ok config-files"),
        ("pending:amd64", "install ok triggers-pending"),
    ]
    assert db.get("libfoo1", "i386") == (db.installed[2],)
    assert db.get("ghost") == () and db.get("broken") == ()
    # records are immutable and their JSON round-trips the fields
    with pytest.raises(AttributeError):
        tool.version = "2"  # type: ignore[misc]
    assert db.to_json()["installed"][3]["conffiles"][1] == {
        "path": "/etc/tool/old.conf", "md5": "fedcba9876543210fedcba9876543210",
        "obsolete": True, "remove_on_upgrade": False}


def test_crlf_and_missing_final_newline_and_empty_file() -> None:
    db = parse_status(b"Package: a\r\nStatus: install ok installed\r\nArchitecture: all\r\nVersion: 1")
    assert [(p.name, p.version) for p in db.installed] == [("a", "1")]
    assert parse_status(b"") == dpkgdb.Database((), ())
    assert parse_status(b"\n\n\n") == dpkgdb.Database((), ())


OK = b"Package: p\nStatus: install ok installed\nArchitecture: amd64\nVersion: 1.0\n"


@pytest.mark.parametrize("status,message", [
    (b"Version: 1\nArchitecture: all\n", "stanza 1: no Package field"),
    (OK + b"\nPackage: ../../etc/x\nStatus: install ok installed\n", "stanza 2: invalid package name"),
    (OK.replace(b"install ok installed", b"install ok"), "invalid Status"),
    (OK.replace(b"installed\n", b"exploded\n"), "invalid Status"),
    (OK.replace(b"install ok", b"keep ok"), "invalid Status"),
    (OK.replace(b"Status: install ok installed\n", b""), "invalid Status"),
    (OK.replace(b"1.0", b"1 0"), "invalid Version '1 0'"),
    (OK.replace(b"1.0", b"1:"), "invalid Version"),
    (OK.replace(b"Version: 1.0\n", b""), "invalid Version ''"),
    (OK.replace(b"amd64", b"amd/64"), "invalid Architecture"),
    (OK.replace(b"Architecture: amd64\n", b""), "invalid Architecture ''"),
    (OK + b"\n" + OK, "stanza 2: p:amd64 appears twice"),
    (OK + b"Installed-Size: 12k\n", "invalid Installed-Size '12k'"),
    (OK + b"Installed-Size: \xd9\xa3\n", "invalid Installed-Size"),  # a non-ASCII digit
    (OK + b"Multi-Arch: sometimes\n", "invalid Multi-Arch"),
    (OK + b"Source: a (b) c\n", "invalid Source"),
    (OK + b"Conffiles:\n /etc/only-a-path\n", "invalid Conffiles line"),
    (OK + b"Conffiles:\n etc/relative 0123\n", "invalid Conffiles line"),
    (b"Package: \xff\xfe\nStatus: install ok installed\n", "invalid package name"),
    (b"root:x:0:0:root:/root:/bin/bash\n", "no Package field"),
    (b"\x00\x01\x02garbage\xff\n", "line 1: not a field"),
    (OK + b"a line without a colon\n", "line 5: not a field"),
    (b" continuation first\n" + OK, "line 1: a continuation line outside a field"),
    (OK + b"\n continuation after a blank line\n", "line 6: a continuation line outside a field"),
    (OK + b"Bad Name: x\n", "line 5: not a field"),
])
def test_malformed_status_raises_one_clear_line(status: bytes, message: str) -> None:
    with pytest.raises(MalformedDatabase) as caught:
        parse_status(status, where="img:/var/lib/dpkg/status")
    text = str(caught.value)
    assert message in text and text.startswith("img:/var/lib/dpkg/status: ") and "\n" not in text
    assert caught.value.exit_code == errors.InvalidInput.exit_code


def test_a_removed_package_may_lack_version_and_architecture_but_an_installed_one_may_not() -> None:
    assert parse_status(b"Package: r\nStatus: deinstall ok config-files\n").partial[0].version == ""
    with pytest.raises(MalformedDatabase):
        parse_status(b"Package: r\nStatus: install ok unpacked\n")


# --- this machine's own database -----------------------------------------------------------------


def snapshot(dest: Path) -> Path:
    """A copy of the host's status, file lists and layout under DEST/var/lib/dpkg: a root to read."""
    if not (HOST_DPKG / "status").is_file() or shutil.which("dpkg-query") is None:
        pytest.skip("no dpkg database or dpkg-query on this machine")
    admin = dest / "var" / "lib" / "dpkg"
    (admin / "info").mkdir(parents=True)
    shutil.copyfile(HOST_DPKG / "status", admin / "status")
    for entry in os.scandir(HOST_DPKG / "info"):
        if entry.name.endswith(".list") or entry.name == "format":
            shutil.copyfile(entry.path, admin / "info" / entry.name)
    return dest


def dpkg_query(root: Path, *args: str) -> str:
    return subprocess.run(["dpkg-query", f"--admindir={root}/var/lib/dpkg", *args], check=True,
                          capture_output=True, text=True, timeout=120).stdout


FIELDS = ("${binary:Package}\t${Package}\t${Architecture}\t${Version}\t${db:Status-Want} "
          "${db:Status-Eflag} ${db:Status-Status}\t${Installed-Size}\t${source:Package}\t"
          "${source:Version}\t${Multi-Arch}\t${binary:Summary}\t${Essential}\t${Protected}\t${Section}\n")


def test_host_database_matches_dpkg_query(tmp_path: Path) -> None:
    root = snapshot(tmp_path)
    expected = sorted(line.split("\t") for line in dpkg_query(root, "-W", "-f", FIELDS).splitlines())
    for row in expected:
        row[9] = row[9].strip()  # our summaries drop the blanks some descriptions end with
    db = dpkgdb.read_database(TreeRoot(root))
    assert len(db.installed) > 50
    ours = sorted([
        p.key if p.multi_arch == "same" else p.name, p.name, p.architecture, p.version, p.status,
        "" if p.installed_size is None else str(p.installed_size), p.source, p.source_version,
        p.multi_arch, p.summary, "yes" if p.essential else "no",
        "yes" if p.protected else "no", p.section or "",
    ] for p in db.installed + db.partial)
    assert ours == [row for row in expected if not row[4].endswith(" not-installed")]


def test_host_file_lists_match_dpkg_query(tmp_path: Path) -> None:
    root = snapshot(tmp_path)
    db = dpkgdb.read_database(TreeRoot(root))
    lists = dpkgdb.read_file_lists(TreeRoot(root), db.installed)
    names = [p.key if p.multi_arch == "same" else p.name for p in db.installed]
    # one dpkg-query for all: each package's list, a blank line between packages
    out = dpkg_query(root, "-L", *names).rstrip("\n").split("\n\n")
    assert len(out) == len(db.installed)
    for package, listed in zip(db.installed, out):
        expected = [] if "does not contain any files" in listed else listed.split("\n")
        assert list(lists[package.key]) == ["/" if p == "/." else p for p in expected], package.key
    assert sum(map(len, lists.values())) > 1000
    multiarch = [p for p in db.installed if p.multi_arch == "same"]
    assert multiarch and all(lists[p.key] for p in multiarch), "NAME:ARCH.list lists were read"


def test_host_root_reads_directly() -> None:
    if not (HOST_DPKG / "status").is_file():
        pytest.skip("no dpkg database on this machine")
    db = dpkgdb.read_database(TreeRoot("/"))
    arch = subprocess.run(["dpkg", "--print-architecture"], capture_output=True, text=True).stdout.strip()
    (dpkg,) = db.get("dpkg")
    assert dpkg.architecture == arch and dpkg.essential
    assert "/usr/bin/dpkg" in dpkgdb.read_file_lists(TreeRoot("/"), [dpkg])[dpkg.key]


def test_legacy_layout_reads_plain_list_names(tmp_path: Path) -> None:
    """Without info/format (a pre-multiarch database) dpkg names every list NAME.list."""
    admin = tmp_path / "var/lib/dpkg"
    (admin / "info").mkdir(parents=True)
    (admin / "status").write_bytes(OK.replace(b"Version", b"Multi-Arch: same\nVersion"))
    (admin / "info" / "p.list").write_bytes(b"/.\n/usr\n/usr/lib/p.so\n")
    (admin / "info" / "p:amd64.list").write_bytes(b"/wrong\n")
    db = dpkgdb.read_database(TreeRoot(tmp_path))
    assert dpkgdb.read_file_lists(TreeRoot(tmp_path), db.installed) == {"p:amd64": ("/", "/usr", "/usr/lib/p.so")}
    (admin / "info" / "format").write_bytes(b"1\n")
    assert dpkgdb.read_file_lists(TreeRoot(tmp_path), db.installed) == {"p:amd64": ("/wrong",)}
    (admin / "info" / "format").write_bytes(b"7\n")
    with pytest.raises(MalformedDatabase, match="unknown database layout"):
        dpkgdb.read_file_lists(TreeRoot(tmp_path), db.installed)
    (admin / "info" / "format").write_bytes(b"1\n")
    (admin / "info" / "p:amd64.list").write_bytes(b"relative/path\n")
    with pytest.raises(MalformedDatabase, match="p:amd64.list: not an absolute path"):
        dpkgdb.read_file_lists(TreeRoot(tmp_path), db.installed)


# --- images --------------------------------------------------------------------------------------


def make_image(tree: Path, out: Path) -> ImageRoot:
    """An image of ``tree`` by the project's writer, its objects under ``out/objects``."""
    out.mkdir(parents=True, exist_ok=True)
    built = build.make_image(str(tree), digest_store=str(out / "objects"))
    (out / "image.cfs").write_bytes(built.image)
    return ImageRoot(out / "image.cfs", out / "objects")


def test_image_of_the_host_database_reads_like_the_tree(tmp_path: Path) -> None:
    tree = snapshot(tmp_path / "tree")
    image = make_image(tree, tmp_path)
    status = read_path(image._data, b"/var/lib/dpkg/status")
    assert status.payload is not None and status.content is None, "the status file is a backing object"
    db = dpkgdb.read_database(image)
    assert db == dpkgdb.read_database(TreeRoot(tree))
    lists = dpkgdb.read_file_lists(image, db.installed)
    assert lists == dpkgdb.read_file_lists(TreeRoot(tree), db.installed)
    inline = [n for n in read_path(image._data, b"/var/lib/dpkg/info").children.values() if n.content]
    assert inline, "some lists are small enough to be inline"


def test_inline_status_reads_like_the_tree(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    (tree / "var/lib/dpkg").mkdir(parents=True)
    status = b"Package:a\nStatus:install ok installed\nVersion:1\nArchitecture:all"
    assert len(status) <= 64
    (tree / "var/lib/dpkg/status").write_bytes(status)
    image = make_image(tree, tmp_path)
    assert read_path(image._data, b"/var/lib/dpkg/status").content == status
    db = dpkgdb.read_database(image)
    assert [p.key for p in db.installed] == ["a:all"] and db == dpkgdb.read_database(TreeRoot(tree))
    assert dpkgdb.read_file_lists(image, db.installed) == {"a:all": ()}


def test_image_through_the_store(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    (tree / "var/lib/dpkg/info").mkdir(parents=True)
    (tree / "var/lib/dpkg/status").write_bytes(TRICKY)
    (tree / "var/lib/dpkg/info/format").write_bytes(b"1\n")
    (tree / "var/lib/dpkg/info/libfoo1:i386.list").write_bytes(b"/.\n/usr\n/usr/lib/i386-linux-gnu/libfoo.so.1\n")
    (tree / "var/lib/dpkg/info/tool.list").write_bytes(b"/.\n/usr/bin/tool\n")
    store = Store.open(tmp_path / "store")
    try:
        store.create(str(tree), "base", CreateOptions(backend="python"))
        image = ImageRoot(store.image_path("base"), store.objects_dir)
        db = dpkgdb.read_database(image)
        assert db == parse_status(TRICKY)
        assert dpkgdb.read_file_lists(image, db.get("libfoo1") + db.get("tool")) == {
            "libfoo1:amd64": (), "libfoo1:i386": ("/", "/usr", "/usr/lib/i386-linux-gnu/libfoo.so.1"),
            "tool:all": ("/", "/usr/bin/tool"),
        }
    finally:
        store.close()


# --- hostile roots -------------------------------------------------------------------------------


INSIDE = b"Package: inside-the-root\nStatus: install ok installed\nArchitecture: all\nVersion: 1\n"


def hostile_tree(tmp_path: Path, status_link: str) -> Path:
    """A root whose status is a link; the root has an /etc/passwd of its own that is a status file."""
    tree = tmp_path / "tree"
    (tree / "etc").mkdir(parents=True)
    (tree / "etc/passwd").write_bytes(INSIDE)
    (tree / "var/lib/dpkg/info").mkdir(parents=True)
    (tree / "var/lib/dpkg/status").symlink_to(status_link)
    return tree


@pytest.mark.parametrize("link", ["../../../../../../../../etc/passwd", "/etc/passwd", "/etc/../../etc/passwd"])
def test_status_links_resolve_inside_the_root_never_on_the_host(tmp_path: Path, link: str) -> None:
    tree = hostile_tree(tmp_path, link)
    for root in (TreeRoot(tree), make_image(tree, tmp_path)):
        assert [p.name for p in dpkgdb.read_database(root).installed] == ["inside-the-root"], root


@pytest.mark.parametrize("link", ["/proc/self/status", "/var/lib/dpkg/nowhere", "../../../../usr/bin/env"])
def test_status_links_to_what_the_root_lacks_find_no_database(tmp_path: Path, link: str) -> None:
    tree = hostile_tree(tmp_path, link)
    for root in (TreeRoot(tree), make_image(tree, tmp_path)):
        with pytest.raises(NoDpkgDatabase, match="no dpkg database") as caught:
            dpkgdb.read_database(root)
        assert caught.value.exit_code == errors.NotFound.exit_code


def test_status_link_loop_and_directory_are_not_files(tmp_path: Path) -> None:
    tree = hostile_tree(tmp_path, "status")
    for root in (TreeRoot(tree), make_image(tree, tmp_path / "loop")):
        with pytest.raises(NotAFile, match="symbolic links"):
            dpkgdb.read_database(root)
    (tree / "var/lib/dpkg/status").unlink()
    (tree / "var/lib/dpkg/status").mkdir()
    for root in (TreeRoot(tree), make_image(tree, tmp_path / "dir")):
        with pytest.raises(NotAFile, match="not a regular file") as caught:
            dpkgdb.read_database(root)
        assert caught.value.exit_code == errors.InvalidInput.exit_code


def test_a_linked_list_resolves_inside_the_root(tmp_path: Path) -> None:
    tree = hostile_tree(tmp_path, "/etc/passwd")
    (tree / "etc/files").write_bytes(b"/.\n/from/inside\n")
    (tree / "var/lib/dpkg/info/inside-the-root.list").symlink_to("/etc/files")
    for root in (TreeRoot(tree), make_image(tree, tmp_path)):
        db = dpkgdb.read_database(root)
        assert dpkgdb.read_file_lists(root, db.installed) == {"inside-the-root:all": ("/", "/from/inside")}
    (tree / "var/lib/dpkg/info/inside-the-root.list").unlink()
    (tree / "var/lib/dpkg/info/inside-the-root.list").mkdir()
    for root in (TreeRoot(tree), make_image(tree, tmp_path / "dir")):
        with pytest.raises(NotAFile):
            dpkgdb.read_file_lists(root, dpkgdb.read_database(root).installed)


def test_missing_database_and_missing_root(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    for root in (TreeRoot(tmp_path / "empty"), make_image(tmp_path / "empty", tmp_path), TreeRoot(tmp_path / "no")):
        with pytest.raises(NoDpkgDatabase):
            dpkgdb.read_database(root)
    with pytest.raises(rootfs.MissingFile):
        ImageRoot(tmp_path / "no.cfs", tmp_path / "objects")


def test_damaged_images_and_objects_are_integrity_errors(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    (tree / "var/lib/dpkg").mkdir(parents=True)
    (tree / "var/lib/dpkg/status").write_bytes(TRICKY)
    image = make_image(tree, tmp_path)
    assert dpkgdb.read_database(image) == parse_status(TRICKY)
    payload = read_path(image._data, b"/var/lib/dpkg/status").payload.decode()
    obj = tmp_path / "objects" / payload
    original = obj.read_bytes()
    # a flipped byte: same size, another fs-verity digest
    obj.write_bytes(original[:100] + bytes([original[100] ^ 1]) + original[101:])
    with pytest.raises(DamagedImage, match="differs from the image's fs-verity digest") as caught:
        dpkgdb.read_database(image)
    assert caught.value.exit_code == errors.IntegrityError.exit_code
    obj.write_bytes(original[:-1])
    with pytest.raises(DamagedImage, match="not a regular file of"):
        dpkgdb.read_database(image)
    obj.unlink()
    with pytest.raises(DamagedImage, match="is missing under"):
        dpkgdb.read_database(image)
    # a link in the objects directory is not followed, even to the right bytes
    (tmp_path / "elsewhere").write_bytes(original)
    obj.symlink_to(tmp_path / "elsewhere")
    with pytest.raises(DamagedImage, match="is missing under"):
        dpkgdb.read_database(image)
    # a truncated image
    (tmp_path / "cut.cfs").write_bytes(image._data[: len(image._data) // 2])
    with pytest.raises(DamagedImage):
        dpkgdb.read_database(ImageRoot(tmp_path / "cut.cfs", tmp_path / "objects"))


@pytest.mark.parametrize("payload", [b"../../escape", b"/etc/passwd", b"ab/./cd", b"ab//cd"])
def test_hostile_payloads_never_leave_the_objects_directory(tmp_path: Path, payload: bytes) -> None:
    from aptlayer.composefs.tree import Node
    from aptlayer.composefs.writer import build_image

    import stat

    status = Node(mode=stat.S_IFREG | 0o644, size=len(INSIDE), payload=payload)
    dpkg = Node(children={b"status": status})
    root = Node(children={b"var": Node(children={b"lib": Node(children={b"dpkg": dpkg})})})
    (tmp_path / "image.cfs").write_bytes(build_image(root))
    (tmp_path / "objects").mkdir()
    (tmp_path / "escape").write_bytes(INSIDE)
    with pytest.raises(DamagedImage, match="not a path below the objects directory"):
        dpkgdb.read_database(ImageRoot(tmp_path / "image.cfs", tmp_path / "objects"))


# --- fuzz: any bytes give a database or one MalformedDatabase ------------------------------------


@st.composite
def mutated_status(draw: st.DrawFn) -> bytes:
    data = bytearray(TRICKY)
    for _ in range(draw(st.integers(1, 8))):
        pos = draw(st.integers(0, len(data)))
        kind = draw(st.sampled_from(["insert", "delete", "replace"]))
        chunk = draw(st.one_of(st.binary(max_size=8), st.sampled_from(
            [b"\n", b"\n\n", b" ", b":", b"\t.\n", b"~", b"1:", b"Status: ", b"Package: x\n", b"\xff", b"\r"])))
        if kind == "insert":
            data[pos:pos] = chunk
        elif kind == "delete":
            del data[pos : pos + len(chunk) + 1]
        else:
            data[pos : pos + len(chunk)] = chunk
    return bytes(data)


@settings(max_examples=400, deadline=None)
@given(st.one_of(mutated_status(), st.binary(max_size=300)))
def test_any_bytes_parse_or_raise_one_clear_line(data: bytes) -> None:
    try:
        db = parse_status(data)
    except MalformedDatabase as e:
        assert "\n" not in str(e)
        return
    for package in db.installed + db.partial:
        assert "/" not in package.name and "/" not in package.architecture
    assert json.dumps(db.to_json())


@pytest.fixture(scope="module")
def small_image(tmp_path_factory: pytest.TempPathFactory) -> tuple[bytes, Path]:
    """An image holding TRICKY (a backing object), a format file and two lists, and its objects."""
    out = tmp_path_factory.mktemp("small")
    tree = out / "tree"
    write = {"status": TRICKY, "info/format": b"1\n", "info/tool.list": b"/.\n/usr/bin/tool\n" * 5,
             "info/libfoo1:amd64.list": b"/.\n/usr\n"}
    for rel, data in write.items():
        (tree / "var/lib/dpkg" / rel).parent.mkdir(parents=True, exist_ok=True)
        (tree / "var/lib/dpkg" / rel).write_bytes(data)
    return make_image(tree, out)._data, out / "objects"


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_mutated_images_read_or_raise_a_typed_error(small_image: tuple[bytes, Path], tmp_path_factory, data) -> None:
    image, objects = small_image
    mutated = bytearray(image)
    for _ in range(data.draw(st.integers(1, 6))):
        pos = data.draw(st.integers(0, len(mutated) - 1))
        mutated[pos] = data.draw(st.integers(0, 255))
    path = tmp_path_factory.mktemp("mutant") / "image.cfs"
    path.write_bytes(bytes(mutated))
    try:
        root = ImageRoot(path, objects)
        db = dpkgdb.read_database(root)
        dpkgdb.read_file_lists(root, db.installed)
    except errors.AptLayerError as e:
        assert "\n" not in str(e)
