"""Comparing package sets (``apt-layer diff``, ``apt-layer packages``) and image trees.

Two package sets are matched by name. A name installed in one architecture on
each side is one package whose version or architecture may have changed (an
``all`` package that became ``amd64`` is a crossgrade, not a removal and an
addition); a name installed in several architectures (``Multi-Arch: same``)
is matched by name and architecture. Versions are ordered by dpkg's rules
through python-debian (epochs first, ``~`` before anything, even the end:
``1.0~rc1 < 1.0 < 1:0.9``).

The files of two images compare by path: a path is changed when its type,
permissions, owner, content (fs-verity digest, or the inline bytes of a small
file), link target, device number or xattrs differ. Modification times are
ignored: every rebuild changes them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from debian.debian_support import version_compare

from aptlayer.composefs.tree import Node

from .dpkgdb import Package

#: marks of :func:`mark_packages`
BASE, LAYERED, REMOVED, REPLACED = "base", "layered", "removed", "replaced"


@dataclass(frozen=True, slots=True)
class Change:
    """One package in both sets with another version or architecture."""

    old: Package
    new: Package

    @property
    def name(self) -> str:
        return self.new.name

    @property
    def architecture_changed(self) -> bool:
        return self.old.architecture != self.new.architecture

    def to_json(self) -> dict:
        return {"name": self.name,
                "old_version": self.old.version, "new_version": self.new.version,
                "old_architecture": self.old.architecture, "new_architecture": self.new.architecture}


@dataclass(frozen=True, slots=True)
class PackageDiff:
    """What changed from one package set to another; each tuple sorted by name."""

    added: tuple[Package, ...]
    removed: tuple[Package, ...]
    #: to a higher version (the architecture may have changed too)
    upgraded: tuple[Change, ...]
    #: to a lower version (the architecture may have changed too)
    downgraded: tuple[Change, ...]
    #: the same version in another architecture
    crossgraded: tuple[Change, ...]
    #: how many packages are the same on both sides
    unchanged: int

    def __bool__(self) -> bool:
        return bool(self.added or self.removed or self.upgraded or self.downgraded or self.crossgraded)

    def to_json(self) -> dict:
        return {
            "added": [_brief(p) for p in self.added],
            "removed": [_brief(p) for p in self.removed],
            "upgraded": [c.to_json() for c in self.upgraded],
            "downgraded": [c.to_json() for c in self.downgraded],
            "crossgraded": [c.to_json() for c in self.crossgraded],
            "unchanged": self.unchanged,
        }


def _brief(package: Package) -> dict:
    return {"name": package.name, "version": package.version, "architecture": package.architecture}


Pairs = list[tuple[Package, Package]]


def _pair(old: Iterable[Package], new: Iterable[Package]) -> tuple[Pairs, list[Package], list[Package]]:
    """Match two sets: (pairs, only in new, only in old), each in name order."""
    by_name_old: dict[str, dict[str, Package]] = {}
    by_name_new: dict[str, dict[str, Package]] = {}
    for packages, by_name in ((old, by_name_old), (new, by_name_new)):
        for package in packages:
            by_name.setdefault(package.name, {})[package.architecture] = package
    pairs, added, removed = [], [], []
    for name in sorted(by_name_old.keys() | by_name_new.keys()):
        left = dict(by_name_old.get(name, {}))
        right = dict(by_name_new.get(name, {}))
        if len(left) == 1 and len(right) == 1:
            pairs.append((left.popitem()[1], right.popitem()[1]))
        for arch in sorted(left.keys() & right.keys()):
            pairs.append((left.pop(arch), right.pop(arch)))
        removed.extend(left[arch] for arch in sorted(left))
        added.extend(right[arch] for arch in sorted(right))
    return pairs, added, removed


def diff_packages(old: Iterable[Package], new: Iterable[Package]) -> PackageDiff:
    """Compare two package sets (such as ``Database.installed`` of two images)."""
    pairs, added, removed = _pair(old, new)
    upgraded, downgraded, crossgraded = [], [], []
    unchanged = 0
    for a, b in pairs:
        order = version_compare(a.version, b.version)
        if order < 0:
            upgraded.append(Change(a, b))
        elif order > 0:
            downgraded.append(Change(a, b))
        elif a.architecture != b.architecture:
            crossgraded.append(Change(a, b))
        else:
            unchanged += 1
    return PackageDiff(tuple(added), tuple(removed), tuple(upgraded), tuple(downgraded),
                       tuple(crossgraded), unchanged)


@dataclass(frozen=True, slots=True)
class MarkedPackage:
    """A package of an image as ``apt-layer packages`` shows it."""

    #: base (as in the base image), layered (added), replaced (another version
    #: or architecture than the base's) or removed (in the base only)
    mark: str
    #: the image's package (the base's for a removed one)
    package: Package
    #: the base image's package, for replaced ones
    base: Package | None = None

    def to_json(self) -> dict:
        found = {"mark": self.mark, **self.package.to_json()}
        if self.base is not None:
            found["base_version"] = self.base.version
            found["base_architecture"] = self.base.architecture
        return found


def mark_packages(
    image: Iterable[Package], base: Iterable[Package] | None = None
) -> tuple[MarkedPackage, ...]:
    """The packages of an image, each marked against its base image's (all ``base`` without one)."""
    if base is None:
        return tuple(MarkedPackage(BASE, p) for p in image)
    pairs, added, removed = _pair(base, image)
    marked = [MarkedPackage(LAYERED, p) for p in added]
    marked += [MarkedPackage(REMOVED, p) for p in removed]
    for b, p in pairs:
        same = b.architecture == p.architecture and version_compare(b.version, p.version) == 0
        marked.append(MarkedPackage(BASE, p) if same else MarkedPackage(REPLACED, p, b))
    return tuple(sorted(marked, key=lambda m: (m.package.name, m.package.architecture)))


@dataclass(frozen=True, slots=True)
class PackagePaths:
    """The paths a package gained or lost from one image to the other (from dpkg's file lists)."""

    name: str
    architecture: str
    added: tuple[str, ...]
    removed: tuple[str, ...]

    def to_json(self) -> dict:
        return {"name": self.name, "architecture": self.architecture,
                "added": list(self.added), "removed": list(self.removed)}


def diff_package_paths(diff: PackageDiff, old_lists: Mapping[str, tuple[str, ...]],
                       new_lists: Mapping[str, tuple[str, ...]]) -> tuple[PackagePaths, ...]:
    """Per changed package of ``diff``, the paths its file list gained and lost, sorted.

    The lists are :func:`~aptlayer.packages.dpkgdb.read_file_lists` of each
    side (keyed by ``Package.key``); unchanged packages are not compared.
    Packages whose lists are equal are left out.
    """
    found = []
    for package in diff.added:
        paths = tuple(sorted(new_lists.get(package.key, ())))
        found.append(PackagePaths(package.name, package.architecture, paths, ()))
    for package in diff.removed:
        paths = tuple(sorted(old_lists.get(package.key, ())))
        found.append(PackagePaths(package.name, package.architecture, (), paths))
    for change in diff.upgraded + diff.downgraded + diff.crossgraded:
        before = set(old_lists.get(change.old.key, ()))
        after = set(new_lists.get(change.new.key, ()))
        found.append(PackagePaths(change.name, change.new.architecture,
                                  tuple(sorted(after - before)), tuple(sorted(before - after))))
    found = [p for p in found if p.added or p.removed]
    return tuple(sorted(found, key=lambda p: (p.name, p.architecture)))


@dataclass(frozen=True, slots=True)
class TreeDiff:
    """Paths of two image trees, sorted: only in the new one, only in the old one, changed."""

    added: tuple[str, ...]
    removed: tuple[str, ...]
    changed: tuple[str, ...]

    def __bool__(self) -> bool:
        return bool(self.added or self.removed or self.changed)

    def to_json(self) -> dict:
        return {"added": list(self.added), "removed": list(self.removed), "changed": list(self.changed)}


def _signature(node: Node) -> tuple:
    """What makes two entries the same file (mtimes aside); a hard link is its target."""
    node = node.resolve()
    if node.is_reg:
        data = (node.size, node.digest, node.content if node.digest is None else None)
    elif node.is_lnk:
        data = node.payload
    else:
        data = node.rdev if not node.is_dir else None
    return node.mode, node.uid, node.gid, data, sorted(node.xattrs.items())


def diff_trees(old: Node, new: Node) -> TreeDiff:
    """Compare two trees (:func:`~aptlayer.composefs.reader.read_image` of two images) path by path.

    An entry whose type changed is changed, and what was below an old
    directory is removed (below a new one, added).
    """
    added: list[bytes] = []
    removed: list[bytes] = []
    changed: list[bytes] = []
    stack: list[tuple[bytes, Node | None, Node | None]] = [(b"/", old, new)]
    while stack:
        path, a, b = stack.pop()
        a_node = a.resolve() if a is not None else None
        b_node = b.resolve() if b is not None else None
        if a_node is not None and b_node is not None and _signature(a_node) != _signature(b_node):
            changed.append(path)
        a_children = a_node.children if a_node is not None and a_node.is_dir else {}
        b_children = b_node.children if b_node is not None and b_node.is_dir else {}
        base = path if path.endswith(b"/") else path + b"/"
        for name in a_children.keys() | b_children.keys():
            child_path = base + name
            a_child, b_child = a_children.get(name), b_children.get(name)
            if a_child is None:
                added.append(child_path)
            elif b_child is None:
                removed.append(child_path)
            stack.append((child_path, a_child, b_child))
    return TreeDiff(_decoded(added), _decoded(removed), _decoded(changed))


def _decoded(paths: list[bytes]) -> tuple[str, ...]:
    """Sorted as bytes, decoded as :func:`os.fsdecode` would (no byte is lost)."""
    return tuple(p.decode("utf-8", "surrogateescape") for p in sorted(paths))
