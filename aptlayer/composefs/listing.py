"""The ``ls``, ``objects`` and ``missing-objects`` listings of ``composefs-info``.

Each writer prints a tree (as :func:`~aptlayer.composefs.reader.read_image`
returns it) byte for byte like the C tool:

* ``ls``: one line per entry below the root, depth-first in byte order. The
  path is escaped like a dump path except that spaces stay raw; directories
  end in ``/`` and a TAB, symlinks add ``TAB-> TARGET`` and regular files
  with a backing object ``TAB@ PAYLOAD``. Later occurrences of a hard-linked
  node print only the path.
* ``objects``: the sorted, unique payloads of all regular files of one or
  more trees, one per line, unescaped.
* ``missing-objects``: the same list minus the objects found in any of the
  given base directories.

``filters`` keeps only the named root-level entries, like ``--filter``. The
first occurrence among the entries printed is the one shown in full, so a
tree read without filters lists the same as the C tool reading with them.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Collection, Iterable, Iterator, Sequence
from typing import BinaryIO

from .dumpfile import escape
from .tree import Node

_FLUSH_AT = 1 << 20


def _entries(root: Node, filters: Collection[bytes] | None) -> Iterator[tuple[bytes, Node]]:
    """(path, entry) below the root in listing order, restricted to ``filters``."""
    for name in sorted(root.children):
        if filters is None or name in filters:
            yield from root.children[name].walk(b"/" + name)


def write_ls(root: Node, out: BinaryIO, filters: Collection[bytes] | None = None) -> None:
    """Write the tree like ``composefs-info ls``."""
    seen: set[int] = set()
    lines: list[bytes] = []
    size = 0
    for path, entry in _entries(root, filters):
        node = entry.resolve()
        line = escape(path, raw_space=True)
        if id(node) not in seen:
            seen.add(id(node))
            if node.is_dir:
                line += b"/\t"
            elif node.is_lnk:
                line += b"\t-> " + escape(node.payload or b"")
            elif node.is_reg and node.payload is not None:
                line += b"\t@ " + escape(node.payload)
        lines.append(line)
        size += len(line)
        if size > _FLUSH_AT:
            out.write(b"\n".join(lines) + b"\n")
            lines, size = [], 0
    if lines:
        out.write(b"\n".join(lines) + b"\n")


def tree_objects(root: Node, filters: Collection[bytes] | None = None) -> set[bytes]:
    """The payloads (backing-object paths) of the regular files of one tree."""
    objects: set[bytes] = set()
    for _path, entry in _entries(root, filters):
        if entry.is_reg and entry.payload is not None:
            objects.add(entry.payload)
    return objects


def _union(roots: Iterable[Node], filters: Collection[bytes] | None) -> set[bytes]:
    objects: set[bytes] = set()
    for root in roots:
        objects |= tree_objects(root, filters)
    return objects


def _write_sorted(objects: Iterable[bytes], out: BinaryIO) -> None:
    out.write(b"".join(obj + b"\n" for obj in sorted(objects)))


def write_objects(
    roots: Iterable[Node], out: BinaryIO, filters: Collection[bytes] | None = None
) -> None:
    """Write the union of the trees' objects like ``composefs-info objects``."""
    _write_sorted(_union(roots, filters), out)


def _exists_in(dir_fd: int, payload: bytes) -> bool:
    """Whether ``payload`` names something under the directory ``dir_fd``.

    Leading slashes are dropped and symlinks followed, as the C tool does; an
    empty relative path names the directory itself.
    """
    rel = payload.lstrip(b"/")
    if not rel:
        return True
    try:
        os.stat(rel, dir_fd=dir_fd)
    except (OSError, ValueError):
        return False
    return True


def missing_objects(
    roots: Iterable[Node],
    basedirs: Sequence[str | bytes | os.PathLike[str] | os.PathLike[bytes]],
    filters: Collection[bytes] | None = None,
) -> list[bytes]:
    """The sorted objects of the trees that exist in none of ``basedirs``.

    With no basedirs every object is missing.

    Raises:
        OSError: a basedir cannot be opened as a directory.
    """
    objects = _union(roots, filters)
    fds: list[int] = []
    try:
        for basedir in basedirs:
            fds.append(os.open(basedir, os.O_RDONLY | os.O_DIRECTORY | os.O_PATH | os.O_CLOEXEC))
        return sorted(obj for obj in objects if not any(_exists_in(fd, obj) for fd in fds))
    finally:
        for fd in fds:
            os.close(fd)


def write_missing_objects(
    roots: Iterable[Node],
    basedirs: Sequence[str | bytes | os.PathLike[str] | os.PathLike[bytes]],
    out: BinaryIO,
    filters: Collection[bytes] | None = None,
) -> None:
    """Write the objects found in none of ``basedirs`` like ``composefs-info missing-objects``."""
    _write_sorted(missing_objects(roots, basedirs, filters), out)


_TYPES = {stat.S_IFDIR: "directory", stat.S_IFREG: "file", stat.S_IFLNK: "symlink", stat.S_IFCHR: "char-device",
          stat.S_IFBLK: "block-device", stat.S_IFIFO: "fifo", stat.S_IFSOCK: "socket"}


def entry_records(root: Node, filters: Collection[bytes] | None = None) -> Iterator[dict]:
    """The entries below the root, in ``ls`` order, as plain records (for JSON).

    Paths and names are decoded with ``os.fsdecode`` (bytes that are not
    UTF-8 become surrogate escapes). A later name of a hard-linked node has
    ``hardlink_of``, the first path it was listed under, instead of metadata.
    """
    first: dict[int, str] = {}
    for raw, entry in _entries(root, filters):
        path = os.fsdecode(raw)
        node = entry.resolve()
        if id(node) in first:
            yield {"path": path, "hardlink_of": first[id(node)]}
            continue
        first[id(node)] = path
        record = {"path": path, "type": _TYPES.get(node.ftype, "unknown"), "mode": stat.S_IMODE(node.mode),
                  "uid": node.uid, "gid": node.gid, "size": node.size, "mtime": node.mtime_sec,
                  "mtime_nsec": node.mtime_nsec, "nlink": node.nlink, "rdev": node.rdev,
                  "object": None, "target": None, "digest": node.digest.hex() if node.digest else None,
                  "xattrs": {os.fsdecode(k): os.fsdecode(v) for k, v in sorted(node.xattrs.items())}}
        if node.is_lnk:
            record["target"] = os.fsdecode(node.payload or b"")
        elif node.is_reg and node.payload is not None:
            record["object"] = os.fsdecode(node.payload)
        yield record


def objects_list(roots: Iterable[Node], filters: Collection[bytes] | None = None) -> list[str]:
    """The sorted objects of ``write_objects``, as strings."""
    return [os.fsdecode(obj) for obj in sorted(_union(roots, filters))]
