"""Package set diffs, marks against a base, file-list and tree diffs.

Version order is checked against dpkg itself (``dpkg --compare-versions``);
image diffs run on images the project's writer built from real trees.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from aptlayer.composefs import build
from aptlayer.composefs.reader import read_image
from aptlayer.packages import dpkgdb
from aptlayer.packages.diff import (BASE, LAYERED, REMOVED, REPLACED, Change, PackagePaths, TreeDiff,
                                    diff_package_paths, diff_packages, diff_trees, mark_packages)
from aptlayer.packages.dpkgdb import Package
from aptlayer.packages.rootfs import ImageRoot, TreeRoot


def pkg(name: str, version: str, arch: str = "amd64", multi_arch: str = "no") -> Package:
    return Package(name=name, version=version, architecture=arch, want="install", flag="ok",
                   state="installed", multi_arch=multi_arch, source=name, source_version=version)


# --- version order, against dpkg ----------------------------------------------------------------

PAIRS = [
    ("1.0~rc1", "1.0"), ("1.0~~", "1.0~"), ("1.0", "1.0+b1"), ("1.0", "1.0-1"), ("1.0-1", "1.0-1.1"),
    ("1:0.9", "2.0"), ("0:1.0", "1.0"), ("2:1", "10:0"), ("1.0a", "1.0"), ("1.0.1", "1.0a"),
    ("1.2.3-1~bpo12+1", "1.2.3-1"), ("7.88.1-10+deb12u5", "7.88.1-10+deb12u14"), ("1.0-1ubuntu1", "1.0-1"),
    ("0.9.9", "0.10"), ("1.0+dfsg", "1.0"), ("1.0.0", "1.0"), ("3.0~beta1-1", "3.0~alpha2-1"),
]


@pytest.mark.parametrize("a,b", PAIRS)
def test_versions_order_as_dpkg_orders_them(a: str, b: str) -> None:
    if shutil.which("dpkg") is None:
        pytest.skip("dpkg not installed")
    old, new = pkg("p", a), pkg("p", b)
    diff = diff_packages([old], [new])
    if subprocess.run(["dpkg", "--compare-versions", a, "lt", b]).returncode == 0:
        assert diff.upgraded == (Change(old, new),) and not diff.downgraded
    elif subprocess.run(["dpkg", "--compare-versions", a, "gt", b]).returncode == 0:
        assert diff.downgraded == (Change(old, new),) and not diff.upgraded
    else:
        assert not diff and diff.unchanged == 1


def test_the_documented_orders() -> None:
    assert diff_packages([pkg("p", "1.0~rc1")], [pkg("p", "1.0")]).upgraded
    assert diff_packages([pkg("p", "1:0.9")], [pkg("p", "9.9")]).downgraded


# --- package set diffs --------------------------------------------------------------------------


def test_every_kind_of_change() -> None:
    old = [pkg("same", "1"), pkg("gone", "1"), pkg("up", "1.0~rc1"), pkg("down", "1:1"),
           pkg("cross", "2", "all"), pkg("upcross", "1", "all"),
           pkg("libm", "1", "amd64", "same"), pkg("libm", "1", "i386", "same")]
    new = [pkg("same", "1"), pkg("new", "0.1"), pkg("up", "1.0"), pkg("down", "2"),
           pkg("cross", "2", "amd64"), pkg("upcross", "1.1", "amd64"),
           pkg("libm", "1", "amd64", "same"), pkg("libm", "1", "arm64", "same")]
    diff = diff_packages(old, new)
    assert [p.key for p in diff.added] == ["libm:arm64", "new:amd64"]
    assert [p.key for p in diff.removed] == ["gone:amd64", "libm:i386"]
    assert [(c.name, c.old.version, c.new.version) for c in diff.upgraded] == \
        [("up", "1.0~rc1", "1.0"), ("upcross", "1", "1.1")]
    assert diff.upgraded[1].architecture_changed and not diff.upgraded[0].architecture_changed
    assert [(c.name, c.old.version, c.new.version) for c in diff.downgraded] == [("down", "1:1", "2")]
    assert [(c.old.key, c.new.key) for c in diff.crossgraded] == [("cross:all", "cross:amd64")]
    assert diff.unchanged == 2  # same, libm:amd64
    assert diff and not diff_packages(old, old) and diff_packages(old, old).unchanged == len(old)
    assert json.loads(json.dumps(diff.to_json())) == {
        "added": [{"name": "libm", "version": "1", "architecture": "arm64"},
                  {"name": "new", "version": "0.1", "architecture": "amd64"}],
        "removed": [{"name": "gone", "version": "1", "architecture": "amd64"},
                    {"name": "libm", "version": "1", "architecture": "i386"}],
        "upgraded": [
            {"name": "up", "old_version": "1.0~rc1", "new_version": "1.0",
             "old_architecture": "amd64", "new_architecture": "amd64"},
            {"name": "upcross", "old_version": "1", "new_version": "1.1",
             "old_architecture": "all", "new_architecture": "amd64"}],
        "downgraded": [{"name": "down", "old_version": "1:1", "new_version": "2",
                        "old_architecture": "amd64", "new_architecture": "amd64"}],
        "crossgraded": [{"name": "cross", "old_version": "2", "new_version": "2",
                         "old_architecture": "all", "new_architecture": "amd64"}],
        "unchanged": 2,
    }


def test_diffs_are_symmetric() -> None:
    a = [pkg("x", "1"), pkg("y", "2"), pkg("z", "1", "all")]
    b = [pkg("x", "2"), pkg("w", "1"), pkg("z", "1", "amd64")]
    forward, backward = diff_packages(a, b), diff_packages(b, a)
    assert forward.added == backward.removed and forward.removed == backward.added
    assert [(c.new, c.old) for c in forward.upgraded] == [(c.old, c.new) for c in backward.downgraded]
    assert [(c.new, c.old) for c in forward.crossgraded] == [(c.old, c.new) for c in backward.crossgraded]


def test_marks_against_the_base() -> None:
    base = [pkg("kept", "1"), pkg("dropped", "1"), pkg("bumped", "1"), pkg("libm", "1", "amd64", "same")]
    image = [pkg("kept", "1"), pkg("htop", "3.2"), pkg("bumped", "1.1"), pkg("libm", "1", "amd64", "same"),
             pkg("libm", "1", "i386", "same")]
    marked = mark_packages(image, base)
    assert [(m.mark, m.package.key, m.base and m.base.version) for m in marked] == [
        (REPLACED, "bumped:amd64", "1"), (REMOVED, "dropped:amd64", None), (LAYERED, "htop:amd64", None),
        (BASE, "kept:amd64", None), (BASE, "libm:amd64", None), (LAYERED, "libm:i386", None),
    ]
    assert marked[0].to_json()["base_version"] == "1" and marked[0].to_json()["version"] == "1.1"
    assert {m.mark for m in mark_packages(image)} == {BASE} and len(mark_packages(image)) == len(image)


def test_package_paths_from_file_lists() -> None:
    old = [pkg("a", "1"), pkg("b", "1"), pkg("gone", "1"), pkg("same", "1")]
    new = [pkg("a", "2"), pkg("b", "2"), pkg("fresh", "1"), pkg("same", "1")]
    old_lists = {"a:amd64": ("/", "/usr", "/usr/bin/a", "/usr/share/a/old"), "b:amd64": ("/", "/usr/bin/b"),
                 "gone:amd64": ("/", "/etc/gone"), "same:amd64": ("/", "/x")}
    new_lists = {"a:amd64": ("/", "/usr", "/usr/bin/a", "/usr/share/a/new"), "b:amd64": ("/", "/usr/bin/b"),
                 "fresh:amd64": ("/usr/bin/fresh", "/"), "same:amd64": ("/", "/y")}
    paths = diff_package_paths(diff_packages(old, new), old_lists, new_lists)
    assert paths == (
        PackagePaths("a", "amd64", ("/usr/share/a/new",), ("/usr/share/a/old",)),
        PackagePaths("fresh", "amd64", ("/", "/usr/bin/fresh"), ()),
        PackagePaths("gone", "amd64", (), ("/", "/etc/gone")),
    )  # b's list did not change; same's version did not, so its list is not compared


# --- images -----------------------------------------------------------------------------------


def write(root: Path, files: dict[str, bytes | str]) -> None:
    """Regular files (bytes) and symlinks (str) under ``root``."""
    for rel, data in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(data, str):
            path.symlink_to(data)
        else:
            path.write_bytes(data)


def image_of(tree: Path, out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    built = build.make_image(str(tree), digest_store=str(out.parent / "objects"))
    (out / "image.cfs").write_bytes(built.image)
    return out / "image.cfs"


def test_tree_diff_of_two_images(tmp_path: Path) -> None:
    common = {"usr/bin/big": b"B" * 5000, "usr/bin/small": b"tiny", "etc/kept": b"k" * 100,
              "etc/link": "kept", "var/old/a": b"a", "var/old/b": b"b" * 300, "opt/becomes-dir": b"f",
              "usr/share/touched": b"t" * 200, "etc/mode": b"m", "etc/hard": b"h" * 80}
    old, new = tmp_path / "old", tmp_path / "new"
    write(old, common)
    os.link(old / "etc/hard", old / "etc/hard2")
    write(new, {k: v for k, v in common.items() if not k.startswith(("var/old", "opt/"))} | {
        "usr/bin/big": b"C" * 5000,  # backing object: another digest
        "usr/bin/small": b"tinY",  # inline content
        "etc/link": "mode",  # link target
        "srv/new/deep/file": b"n",
        "opt/becomes-dir/inside": b"i",
    })
    (new / "var").mkdir()
    os.link(new / "etc/hard", new / "etc/hard2")
    os.utime(new / "usr/share/touched", (1, 1))  # an mtime alone is no change
    os.chmod(new / "etc/mode", 0o600)
    owner_changed = os.geteuid() == 0
    if owner_changed:
        os.chown(new / "etc/kept", 1234, 0)
    diff = diff_trees(read_image(image_of(old, tmp_path / "a")), read_image(image_of(new, tmp_path / "b")))
    assert diff == TreeDiff(
        added=("/opt/becomes-dir/inside", "/srv", "/srv/new", "/srv/new/deep", "/srv/new/deep/file"),
        removed=("/var/old", "/var/old/a", "/var/old/b"),
        changed=tuple(sorted(["/etc/link", "/etc/mode", "/opt/becomes-dir", "/usr/bin/big", "/usr/bin/small"]
                             + (["/etc/kept"] if owner_changed else []))),
    )
    same = read_image(image_of(old, tmp_path / "c"))
    assert not diff_trees(same, read_image(image_of(old, tmp_path / "d")))
    assert json.loads(json.dumps(diff.to_json()))["removed"] == ["/var/old", "/var/old/a", "/var/old/b"]


HOST_DPKG = Path("/var/lib/dpkg")


def test_diff_of_two_images_of_real_databases(tmp_path: Path) -> None:
    """The host's database, and a copy where one package went, one came, one was upgraded."""
    if not (HOST_DPKG / "status").is_file():
        pytest.skip("no dpkg database on this machine")
    status = (HOST_DPKG / "status").read_bytes()
    db = dpkgdb.parse_status(status)
    victim, bumped = db.get("adduser")[0], db.get("dpkg")[0]
    stanzas = status.decode().split("\n\n")
    edited = []
    for stanza in stanzas:
        first = stanza.lstrip("\n").split("\n", 1)[0]
        if first == f"Package: {victim.name}":
            continue
        if first == f"Package: {bumped.name}":
            stanza = stanza.replace(f"\nVersion: {bumped.version}\n", f"\nVersion: 9:{bumped.version}\n")
        edited.append(stanza)
    edited.append(f"Package: htop\nStatus: install ok installed\nArchitecture: {bumped.architecture}\n"
                  "Version: 3.2.2-2\nDescription: interactive processes viewer\n")
    old, new = tmp_path / "old", tmp_path / "new"
    write(old, {"var/lib/dpkg/status": status, "var/lib/dpkg/info/format": b"1\n",
                f"var/lib/dpkg/info/{victim.name}.list": (HOST_DPKG / "info" / f"{victim.name}.list").read_bytes()})
    write(new, {"var/lib/dpkg/status": "\n\n".join(edited).encode(), "var/lib/dpkg/info/format": b"1\n",
                "var/lib/dpkg/info/htop.list": b"/.\n/usr\n/usr/bin\n/usr/bin/htop\n"})
    a = ImageRoot(image_of(old, tmp_path / "a"), tmp_path / "objects")
    b = ImageRoot(image_of(new, tmp_path / "b"), tmp_path / "objects")
    before, after = dpkgdb.read_database(a), dpkgdb.read_database(b)
    assert before == dpkgdb.read_database(TreeRoot(old))
    diff = diff_packages(before.installed, after.installed)
    assert [p.name for p in diff.added] == ["htop"] and [p.name for p in diff.removed] == [victim.name]
    assert [(c.name, c.new.version) for c in diff.upgraded] == [(bumped.name, f"9:{bumped.version}")]
    assert not diff.downgraded and not diff.crossgraded and diff.unchanged == len(before.installed) - 2
    lists = (dpkgdb.read_file_lists(a, before.installed), dpkgdb.read_file_lists(b, after.installed))
    paths = {p.name: p for p in diff_package_paths(diff, *lists)}
    assert paths["htop"].added == ("/", "/usr", "/usr/bin", "/usr/bin/htop")
    assert "/usr/sbin/adduser" in paths[victim.name].removed
    assert sorted(paths) == ["adduser", "htop"]  # dpkg's list is missing on both sides: no files either way
