"""Which layer each path of an image goes to: by Debian package, stable from one version to the next.

An update that changes a few packages should change only their layers, as
rpm-ostree's chunked images do. So a layer's content depends on package
*names* and the files themselves, never on where a package falls in a list:

* a package with at least ``OWN_LAYER_MIN`` bytes of files has a layer of
  its own (the ``MAX_OWN_LAYERS`` biggest, if more do: a registry or a
  runtime limits the layers of an image to about 127);
* the other packages share ``BUCKETS`` layers, each package in the bucket a
  hash of its name picks, so adding, removing or updating a small package
  touches one bucket;
* a package's own files in dpkg's database (``var/lib/dpkg/info/NAME.*``)
  go with it; the rest of the database (``status``, ``available``...),
  which every package change rewrites, has a layer of its own;
* files owned by no package have a layer; every directory (whose mtime
  changes when any package adds a file to it) is in the last layer, after
  all files, so a runtime that unpacks the layers in order ends with the
  directories' own metadata, not the defaults it gave them when a file below
  needed them.

dpkg's lists name the paths a package ships, ``/bin/bash`` on a merged-/usr
system whose ``/bin`` is a link to ``usr/bin``: a listed path's directories
are resolved through the tree's symbolic links (inside the tree) before it
is looked up.

Within a layer, entries are in path order, hard links after every file
(their first name is always in the same layer, before them). Layers come in
order: own-layer packages by name, buckets by number, the dpkg database,
the files of no package, the directories; empty ones are left out.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from dataclasses import dataclass, field

from ..composefs.tree import Node

OWN_LAYER_MIN = 1 << 20
MAX_OWN_LAYERS = 96
BUCKETS = 16
DPKG_DIR = b"/var/lib/dpkg/"
DPKG_INFO = DPKG_DIR + b"info/"


@dataclass
class Chunk:
    """One layer to be: what it is called, the packages in it and its (path, node) entries."""

    label: str
    packages: list[str] = field(default_factory=list)
    entries: list[tuple[bytes, Node]] = field(default_factory=list)

    def ordered(self) -> list[tuple[bytes, Node]]:
        files = sorted((e for e in self.entries if e[1].link is None), key=lambda e: e[0])
        links = sorted((e for e in self.entries if e[1].link is not None), key=lambda e: e[0])
        return files + links


def _size(node: Node) -> int:
    return node.size if node.is_reg else 0


def _info_owner(path: bytes, packages: set[str]) -> str | None:
    """The package a file of dpkg's info directory belongs to (``NAME.list``, ``NAME:ARCH.md5sums``...)."""
    name = path[len(DPKG_INFO):]
    if b"/" in name:
        return None
    stem = os.fsdecode(name).rsplit(".", 1)[0].split(":", 1)[0]
    return stem if stem in packages else None


def bucket_of(package: str) -> int:
    return int.from_bytes(hashlib.sha256(package.encode()).digest()[:4], "big") % BUCKETS


def plan(root: Node, owners: dict[bytes, str], chunked: bool = True) -> list[Chunk]:
    """The layers of the tree ``root``; ``owners`` maps a path to the package that ships it.

    Without ``chunked``, one layer holds everything (for comparison).
    """
    entries = list(root.walk())
    if not chunked:
        return [Chunk("all", sorted(set(owners.values())), entries)]
    packages = set(owners.values())
    owner_of: list[str | None] = []
    first_owner: dict[int, str | None] = {}
    sizes: dict[str, int] = dict.fromkeys(packages, 0)
    for path, node in entries:
        owner = None
        if node.link is not None or node.is_dir:
            pass
        elif path.startswith(DPKG_INFO):
            owner = _info_owner(path, packages) or "<dpkg>"
        elif path.startswith(DPKG_DIR):
            owner = "<dpkg>"
        else:
            owner = owners.get(path)
        owner_of.append(owner)
        if node.link is None and not node.is_dir:
            first_owner[id(node)] = owner
        if owner in sizes:
            sizes[owner] += _size(node)
    big = sorted((p for p in packages if sizes[p] >= OWN_LAYER_MIN), key=lambda p: (-sizes[p], p))
    own = sorted(big[:MAX_OWN_LAYERS])
    chunks = {p: Chunk(f"package {p}", [p]) for p in own}
    buckets = [Chunk(f"packages {i + 1}/{BUCKETS}") for i in range(BUCKETS)]
    for p in sorted(packages - set(own)):
        buckets[bucket_of(p)].packages.append(p)
    dpkg, rest, dirs = Chunk("dpkg database"), Chunk("files of no package"), Chunk("directories")
    for (path, node), owner in zip(entries, owner_of):
        if node.link is not None:
            owner = first_owner.get(id(node.resolve()))
        if node.is_dir:
            target = dirs
        elif owner is None:
            target = rest
        elif owner == "<dpkg>":
            target = dpkg
        else:
            target = chunks.get(owner) or buckets[bucket_of(owner)]
        target.entries.append((path, node))
    return [c for c in (*(chunks[p] for p in own), *buckets, dpkg, rest, dirs) if c.entries]


def owners_from_lists(root: Node, lists: dict[str, Iterable[str]]) -> dict[bytes, str]:
    """path -> package from dpkg's file lists (``{"NAME:ARCH": paths}``) of the tree ``root``.

    Paths are those of the tree (directories resolved through its links);
    a path two packages list goes to the first name.
    """
    real_dir = _DirResolver(root)
    owners: dict[bytes, str] = {}
    for key in sorted(lists):
        name = key.split(":", 1)[0]
        for path in lists[key]:
            parent, _, base = os.fsencode(path).rpartition(b"/")
            real = real_dir(parent or b"/")
            if real is not None and base:
                owners.setdefault((real.rstrip(b"/") + b"/" + base), name)
    return owners


class _DirResolver:
    """The path of a directory of a tree with every symbolic link on the way resolved, or None."""

    #: links followed in one lookup at most (the kernel's limit)
    MAX_HOPS = 40

    def __init__(self, root: Node):
        self.nodes: dict[bytes, Node] = {b"/": root}
        self.real: dict[bytes, bytes | None] = {b"/": b"/"}

    def __call__(self, path: bytes, hops: int = 0) -> bytes | None:
        path = os.path.normpath(path) if path.startswith(b"/") else os.path.normpath(b"/" + path)
        if path.startswith(b"//"):
            path = path[1:]
        if path in self.real:
            return self.real[path]
        parent, _, name = path.rpartition(b"/")
        real_parent = self(parent or b"/", hops)
        found = None
        if real_parent is not None:
            child = self.nodes[real_parent].children.get(name)
            if child is not None and child.is_dir:
                found = real_parent.rstrip(b"/") + b"/" + name
                self.nodes[found] = child
            elif child is not None and child.is_lnk and hops < self.MAX_HOPS:
                target = child.payload or b""
                found = self(target if target.startswith(b"/") else real_parent + b"/" + target, hops + 1)
        self.real[path] = found
        return found
