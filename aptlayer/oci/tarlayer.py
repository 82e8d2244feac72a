"""Layers as the OCI image spec defines them: tar streams of changes, applied in order.

Writing: entries of a composefs tree (path, :class:`Node`) become POSIX
(PAX) tar members, byte for byte the same for the same entries (no user or
group names, numeric owners, a PAX ``mtime`` only where the ustar field
cannot hold it: nanoseconds, negative or far times), xattrs as
``SCHILY.xattr.NAME`` records, hard links as tar hard links to the first
name of the inode.

Reading: a layer's members become *entries*, JSON-able dicts that name
each file's content by its fs-verity digest (its object, imported into the
digest store) or hold it inline (64 bytes or less, as composefs does).
What a layer read gives is kept per layer digest (``cache/oci/layers``), so
a layer read once is never read again. Applying entries to a tree follows
the spec's changeset rules: whiteouts (``.wh.NAME`` hides NAME,
``.wh..wh..opq`` hides every child of its directory) apply to the layers
below only, so they go first; a directory over a directory keeps its
children and takes the new metadata; anything else replaces what was there;
missing parents are made as directories 0755 owned by root.

Layers are hostile input: a path with ``..``, a sparse or unknown member,
an entry under something that is not a directory, a hard link to nothing
are refused (:class:`LayerError`).
"""

from __future__ import annotations

import base64
import os
import stat
import tarfile
from collections.abc import Callable, Iterable
from typing import BinaryIO

from ..composefs import fsverity
from ..composefs.lstatwalk import INLINE_MAX
from ..composefs.objectstore import ObjectStore
from ..composefs.tree import Node

WHITEOUT = ".wh."
OPAQUE = ".wh..wh..opq"
_USTAR_TIME_LIMIT = 8 ** 11
_CHUNK = 1 << 20
_TYPES = {tarfile.REGTYPE: "f", tarfile.AREGTYPE: "f", tarfile.CONTTYPE: "f", tarfile.DIRTYPE: "d",
          tarfile.SYMTYPE: "l", tarfile.LNKTYPE: "h", tarfile.CHRTYPE: "c", tarfile.BLKTYPE: "b",
          tarfile.FIFOTYPE: "p"}
_IFMT = {"f": stat.S_IFREG, "d": stat.S_IFDIR, "l": stat.S_IFLNK, "c": stat.S_IFCHR, "b": stat.S_IFBLK,
         "p": stat.S_IFIFO}
_TAR_TYPE = {stat.S_IFREG: tarfile.REGTYPE, stat.S_IFDIR: tarfile.DIRTYPE, stat.S_IFLNK: tarfile.SYMTYPE,
             stat.S_IFCHR: tarfile.CHRTYPE, stat.S_IFBLK: tarfile.BLKTYPE, stat.S_IFIFO: tarfile.FIFOTYPE}


class LayerError(ValueError):
    """A layer that cannot be read or applied; the message names the entry."""


# --- writing --------------------------------------------------------------------------


def tar_name(path: bytes) -> str:
    """The member name of a tree path (``/usr/bin`` -> ``usr/bin``, the root ``./``)."""
    rel = path.strip(b"/")
    return os.fsdecode(rel) if rel else "./"


def _mtime_text(sec: int, nsec: int) -> str:
    total = sec * 1_000_000_000 + nsec
    sign = "-" if total < 0 else ""
    whole, frac = divmod(abs(total), 1_000_000_000)
    return f"{sign}{whole}.{frac:09d}".rstrip("0").rstrip(".")


def _info(path: bytes, node: Node, link_to: bytes | None) -> tarfile.TarInfo:
    target = node.resolve()
    info = tarfile.TarInfo(tar_name(path))
    info.mode = stat.S_IMODE(target.mode)
    info.uid, info.gid = target.uid, target.gid
    info.uname = info.gname = ""
    pax: dict[str, str] = {}
    if target.mtime_nsec == 0 and 0 <= target.mtime_sec < _USTAR_TIME_LIMIT:
        info.mtime = target.mtime_sec
    else:
        info.mtime = target.mtime_sec if 0 <= target.mtime_sec < _USTAR_TIME_LIMIT else 0
        pax["mtime"] = _mtime_text(target.mtime_sec, target.mtime_nsec)
    for name in sorted(target.xattrs):
        pax["SCHILY.xattr." + os.fsdecode(name)] = target.xattrs[name].decode("utf-8", "surrogateescape")
    info.pax_headers = pax
    if link_to is not None:
        info.type, info.linkname = tarfile.LNKTYPE, tar_name(link_to)
        return info
    info.type = _TAR_TYPE[target.ftype]
    if target.is_reg:
        info.size = target.size
    elif target.is_lnk:
        info.linkname = os.fsdecode(target.payload or b"")
    elif target.ftype in (stat.S_IFCHR, stat.S_IFBLK):
        info.devmajor, info.devminor = os.major(target.rdev), os.minor(target.rdev)
    return info


def write_layer(entries: Iterable[tuple[bytes, Node]], out: BinaryIO, open_object: Callable[[str], BinaryIO],
                first_names: dict[int, bytes]) -> None:
    """Write ``entries`` (in the order given) as one tar stream into ``out``.

    ``open_object(path)`` opens a backing object (``xx/yyyy...``);
    ``first_names`` maps ``id(node)`` of an inode with hard links to the
    path of its first name, which must come earlier in the same layer.
    """
    with tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT, encoding="utf-8",
                      errors="surrogateescape") as tar:
        for path, node in entries:
            link_to = first_names.get(id(node.resolve())) if node.link is not None else None
            info = _info(path, node, link_to)
            target = node.resolve()
            if info.type != tarfile.REGTYPE or not target.size:
                tar.addfile(info)
            elif target.content is not None:
                tar.addfile(info, _Bytes(target.content))
            else:
                with open_object(os.fsdecode(target.payload or b"")) as f:
                    tar.addfile(info, f)


class _Bytes:
    """A read-only file over bytes (what ``tarfile.addfile`` copies from)."""

    def __init__(self, data: bytes):
        self.data, self.pos = data, 0

    def read(self, n: int = -1) -> bytes:
        end = len(self.data) if n < 0 else self.pos + n
        chunk, self.pos = self.data[self.pos:end], min(end, len(self.data))
        return chunk


# --- reading ----------------------------------------------------------------------------


def _parts(name: str) -> list[str]:
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise LayerError(f"{name}: a path with '..'")
    return parts


def _mtime(member: tarfile.TarInfo) -> tuple[int, int]:
    text = member.pax_headers.get("mtime")
    if text is None:
        return int(member.mtime), 0
    sign = -1 if text.startswith("-") else 1
    whole, _, frac = text.lstrip("-").partition(".")
    if not whole.isdigit() or (frac and not frac.isdigit()):
        raise LayerError(f"{member.name}: bad PAX mtime {text!r}")
    sec, nsec = divmod(sign * (int(whole) * 1_000_000_000 + int((frac + "000000000")[:9])), 1_000_000_000)
    return sec, nsec


def _xattrs(member: tarfile.TarInfo) -> dict[str, str]:
    """xattrs as base64 of their bytes, keyed by name (JSON keeps the str of any bytes via surrogates)."""
    out = {}
    for key, value in member.pax_headers.items():
        if key.startswith("SCHILY.xattr."):
            out[key[len("SCHILY.xattr."):]] = base64.b64encode(value.encode("utf-8", "surrogateescape")).decode()
    return out


def read_layer(stream: BinaryIO, store: ObjectStore, scratch: str,
               progress: Callable[[int], None] | None = None) -> list[dict]:
    """The entries of a layer's tar stream; external files go into ``store`` (temp files in ``scratch``)."""
    entries = []
    try:
        with tarfile.open(fileobj=stream, mode="r|", encoding="utf-8", errors="surrogateescape") as tar:
            for member in tar:
                entries.append(_entry(tar, member, store, scratch))
                if progress is not None:
                    progress(member.size if member.isreg() else 0)
    except (tarfile.TarError, EOFError) as e:
        raise LayerError(f"not a tar stream: {e}") from None
    return entries


def _entry(tar: tarfile.TarFile, member: tarfile.TarInfo, store: ObjectStore, scratch: str) -> dict:
    kind = _TYPES.get(member.type)
    if kind is None or member.issparse():
        raise LayerError(f"{member.name}: unsupported tar member type {member.type!r}")
    sec, nsec = _mtime(member)
    entry: dict = {"path": "/".join(_parts(member.name)), "type": kind, "mode": stat.S_IMODE(member.mode),
                   "uid": member.uid, "gid": member.gid, "mtime": [sec, nsec]}
    xattrs = _xattrs(member)
    if xattrs:
        entry["xattrs"] = xattrs
    if kind in ("l", "h"):
        entry["target"] = member.linkname if kind == "l" else "/".join(_parts(member.linkname))
    elif kind in ("c", "b"):
        entry["rdev"] = [member.devmajor, member.devminor]
    elif kind == "f":
        entry["size"] = member.size
        f = tar.extractfile(member)
        assert f is not None
        if member.size <= INLINE_MAX:
            data = f.read()
            if data:
                entry["content"] = base64.b64encode(data).decode()
        else:
            entry["object"] = _import(f, member.size, store, scratch).hex()
    return entry


def _import(f: BinaryIO, size: int, store: ObjectStore, scratch: str) -> bytes:
    """Copy a member's content to a temp file while hashing it; into the store unless there already."""
    hasher = fsverity.VerityHasher()
    tmp = os.path.join(scratch, "member")
    fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    try:
        left = size
        while left:
            chunk = f.read(min(_CHUNK, left))
            if not chunk:
                raise LayerError("layer ends inside a file")
            hasher.update(chunk)
            view = memoryview(chunk)
            while view:
                view = view[os.write(fd, view):]
            left -= len(chunk)
        digest = hasher.digest()
        if not store.claim(digest, size):
            store.import_file(fd, digest)
    finally:
        os.close(fd)
        os.unlink(tmp)
    return digest


# --- applying ---------------------------------------------------------------------------


def _walk_to(root: Node, parts: list[str], make: bool, where: str) -> Node | None:
    """The directory at ``parts`` (made as 0755 root:root where missing when ``make``), or None."""
    node = root
    for part in parts:
        name = os.fsencode(part)
        child = node.children.get(name)
        if child is None:
            if not make:
                return None
            child = node.children[name] = Node()
        elif not child.is_dir:
            if not make:
                return None
            raise LayerError(f"{where}: {'/'.join(parts)} is not a directory")
        node = child
    return node


def apply_layer(root: Node, entries: list[dict], keep_links: bool) -> None:
    """Apply one layer's entries to the tree ``root`` (changed in place).

    A hard link becomes a hard-link node with ``keep_links``, else a copy
    of its target with its own inode, as ``image create`` of the unpacked
    tree would see it (the scan gives every path its own inode).
    """
    for e in entries:
        parts = e["path"].split("/") if e["path"] else []
        if not parts or not parts[-1].startswith(WHITEOUT):
            continue
        parent = _walk_to(root, parts[:-1], False, e["path"])
        if parent is None:
            continue
        if parts[-1] == OPAQUE:
            parent.children.clear()
        else:
            parent.children.pop(os.fsencode(parts[-1][len(WHITEOUT):]), None)
    for e in entries:
        parts = e["path"].split("/") if e["path"] else []
        if parts and parts[-1].startswith(WHITEOUT):
            continue
        if not parts:
            if e["type"] != "d":
                raise LayerError("the root entry is not a directory")
            _set_meta(root, e)
            continue
        parent = _walk_to(root, parts[:-1], True, e["path"])
        assert parent is not None
        name = os.fsencode(parts[-1])
        old = parent.children.get(name)
        if e["type"] == "d" and old is not None and old.is_dir:
            _set_meta(old, e)
            continue
        parent.children[name] = _node(root, e, keep_links)


def _set_meta(node: Node, e: dict) -> None:
    node.mode = _IFMT[e["type"]] | e["mode"]
    node.uid, node.gid = e["uid"], e["gid"]
    node.mtime_sec, node.mtime_nsec = e["mtime"]
    node.xattrs = {os.fsencode(k): base64.b64decode(v) for k, v in sorted(e.get("xattrs", {}).items())}


def _node(root: Node, e: dict, keep_links: bool) -> Node:
    if e["type"] == "h":
        parts = e["target"].split("/")
        parent = _walk_to(root, parts[:-1], False, e["path"])
        target = parent.children.get(os.fsencode(parts[-1])) if parent is not None and parts[-1] else None
        if target is None or target.resolve().is_dir:
            raise LayerError(f"{e['path']}: hard link to {e['target']}, which is not a file of the layers so far")
        target = target.resolve()
        if keep_links:
            return Node.hardlink(target)
        return Node(target.mode, target.uid, target.gid, 1, target.rdev, target.size, target.mtime_sec,
                    target.mtime_nsec, target.payload, target.content, target.digest, dict(target.xattrs))
    node = Node()
    _set_meta(node, e)
    if e["type"] == "f":
        node.size = e["size"]
        if "object" in e:
            digest = bytes.fromhex(e["object"])
            node.digest, node.payload = digest, fsverity.object_path(digest).encode()
        elif "content" in e:
            node.content = base64.b64decode(e["content"])
    elif e["type"] == "l":
        node.payload = os.fsencode(e["target"])
        node.size = len(node.payload)
    elif e["type"] in ("c", "b"):
        node.rdev = os.makedev(*e["rdev"])
    return node


def objects_of(entries: list[dict]) -> set[str]:
    """The objects (``xx/yyyy...``) a layer's entries name."""
    return {fsverity.object_path(bytes.fromhex(e["object"])) for e in entries if "object" in e}
