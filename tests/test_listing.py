"""ls / objects / missing-objects listings against the vectors and composefs-info."""

from __future__ import annotations

import io
import os
import subprocess
from pathlib import Path

import pytest

from aptlayer.composefs.listing import (
    missing_objects,
    tree_objects,
    write_ls,
    write_missing_objects,
    write_objects,
)
from aptlayer.composefs.reader import read_image
from aptlayer.composefs.tree import Node

from conftest import vector_names

VECTORS = vector_names()


def objects_of(vectors: Path, name: str) -> list[bytes]:
    return (vectors / name / "objects.txt").read_bytes().splitlines()


def missing(roots: list[Node], basedirs: list[Path]) -> bytes:
    out = io.BytesIO()
    write_missing_objects(roots, basedirs, out)
    return out.getvalue()


def populate(basedir: Path, objects: list[bytes]) -> None:
    """Create empty stand-ins for objects (only their existence matters)."""
    for obj in objects:
        path = basedir / os.fsdecode(obj)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch()


@pytest.mark.parametrize("name", VECTORS)
def test_missing_objects_against_the_pool(vectors: Path, name: str) -> None:
    """Empty for tree vectors; ``ff-*`` vectors stored nothing (store.txt is empty)."""
    root = read_image(vectors / name / "image.cfs")
    stored = {line.split(b" ")[0] for line in (vectors / name / "store.txt").read_bytes().splitlines()}
    expected = [obj for obj in objects_of(vectors, name) if obj not in stored]
    if not name.startswith("ff-"):
        assert expected == []
    assert missing([root], [vectors / "objects"]) == b"".join(obj + b"\n" for obj in expected)


@pytest.mark.parametrize("name", VECTORS)
def test_missing_objects_against_an_empty_dir_is_everything(
    vectors: Path, tmp_path: Path, name: str
) -> None:
    root = read_image(vectors / name / "image.cfs")
    assert missing([root], [tmp_path]) == (vectors / name / "objects.txt").read_bytes()


def test_missing_objects_over_two_basedirs(vectors: Path, tmp_path: Path) -> None:
    names = [n for n in VECTORS if len(objects_of(vectors, n)) >= 2][:4]
    assert names, "some vector has objects"
    roots = [read_image(vectors / n / "image.cfs") for n in names]
    everything = sorted({obj for n in names for obj in objects_of(vectors, n)})
    first, second, absent = everything[0::3], everything[1::3], everything[2::3]
    populate(tmp_path / "a", first)
    populate(tmp_path / "b", second)
    expected = b"".join(obj + b"\n" for obj in absent)
    assert missing(roots, [tmp_path / "a", tmp_path / "b"]) == expected
    assert missing_objects(roots, [tmp_path / "b", tmp_path / "a"]) == absent
    assert missing_objects(roots, [tmp_path / "a"]) == sorted(second + absent)
    assert missing_objects(roots, []) == everything


def test_missing_basedir_is_an_error(vectors: Path, tmp_path: Path) -> None:
    root = read_image(vectors / "ff-basic" / "image.cfs")
    with pytest.raises(FileNotFoundError):
        missing([root], [tmp_path / "nope"])
    (tmp_path / "file").touch()
    with pytest.raises(NotADirectoryError):
        missing([root], [tmp_path / "file"])


def test_objects_are_a_sorted_union(vectors: Path) -> None:
    roots = [read_image(vectors / n / "image.cfs") for n in VECTORS]
    out = io.BytesIO()
    write_objects(roots, out)
    union = sorted({obj for n in VECTORS for obj in objects_of(vectors, n)})
    assert out.getvalue() == b"".join(obj + b"\n" for obj in union)


def test_ls_hard_links_print_only_the_path(vectors: Path) -> None:
    root = read_image(vectors / "ff-hardlinks" / "image.cfs")
    out = io.BytesIO()
    write_ls(root, out)
    lines = out.getvalue().splitlines()
    links = [path for path, entry in root.walk() if entry.link is not None]
    assert links
    for path in links:
        assert path in lines


def test_ls_spaces_stay_raw() -> None:
    root = Node()
    root.children[b"a b"] = Node(mode=0o40755)
    root.children[b"a b"].children[b"l n"] = Node(mode=0o120777, payload=b"t a\tb")
    root.children[b"f\n"] = Node(mode=0o100644, size=9, payload=b"x y")
    out = io.BytesIO()
    write_ls(root, out)
    assert out.getvalue() == b"/a b/\t\n/a b/l n\t-> t\\x20a\\tb\n/f\\n\t@ x\\x20y\n"


def test_filters_limit_every_listing(vectors: Path) -> None:
    root = read_image(vectors / "ff-basic" / "image.cfs")
    keep = [name for name in root.children if root.children[name].is_dir][:1]
    assert keep
    out = io.BytesIO()
    write_ls(root, out, keep)
    prefix = b"/" + keep[0]
    assert all(line.startswith(prefix) for line in out.getvalue().splitlines())
    assert tree_objects(root, keep) <= tree_objects(root)
    assert tree_objects(root, [b"no-such-name"]) == set()


# --- upstream differential ----------------------------------------------------------------------


def info(composefs_info: str, *args: str | Path) -> bytes:
    return subprocess.run(
        [composefs_info, *map(str, args)], capture_output=True, check=True, timeout=60
    ).stdout


@pytest.mark.upstream
def test_objects_of_several_images_match(vectors: Path, composefs_info: str) -> None:
    images = [vectors / n / "image.cfs" for n in VECTORS]
    out = io.BytesIO()
    write_objects([read_image(p) for p in images], out)
    assert out.getvalue() == info(composefs_info, "objects", *images)


@pytest.mark.upstream
def test_missing_objects_match(vectors: Path, composefs_info: str, tmp_path: Path) -> None:
    images = [vectors / n / "image.cfs" for n in VECTORS]
    roots = [read_image(p) for p in images]
    everything = sorted(set().union(*(tree_objects(r) for r in roots)))
    populate(tmp_path, everything[::2])
    expected = info(composefs_info, f"--basedir={tmp_path}", "missing-objects", *images)
    assert missing(roots, [tmp_path]) == expected
    assert expected.count(b"\n") == len(everything) - len(everything[::2])
