"""``etc diff``: the administrator's /etc changes against the image's /etc.

On a booted deployment /etc is an overlay: the image's /etc below, the
store's ``etc/upper`` above (docs/boot.md). Every entry of the upper
directory is a local change, and hides the image's version of that path in
every deployment:

``added``     the image has no such path;
``modified``  content, link target, type, mode or owner differ from the image's;
``deleted``   a whiteout (a 0/0 character device) hides the image's entry;
``pinned``    a copy identical to the image's (made by a metadata-only edit
              or an editor that rewrote the same bytes): the running system
              sees no difference, but a new image's version of it stays hidden.

A directory that only holds changes is not itself listed; an opaque one
(``trusted.overlay.opaque``, a directory removed and made again) hides
every image entry below it, which are listed as deleted.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from .. import errors
from ..composefs import fsverity
from ..composefs.format import XATTR_OPAQUE
from ..composefs.reader import read_path
from ..composefs.tree import Node
from ..store import Store
from .booted import booted


def image_for_diff(store: Store, image: str | None) -> str:
    """The image to compare with: the one named, else the booted one, else the current deployment."""
    if image is not None:
        return image
    running = booted(store)
    if running is not None:
        return running["image"]
    current = store.journal.deployments().get("current")
    if current is None:
        raise errors.NotFound("nothing is deployed or booted: name the image to compare with (--image)")
    return current.image


def diff(store: Store, image: str | None = None) -> dict:
    """The local changes in ``etc/upper`` against ``image``'s /etc, sorted by path."""
    name = image_for_diff(store, image)
    etc = read_path(store.image_file(name), b"/etc", follow_symlinks=False)
    below = etc.children if etc is not None and stat.S_ISDIR(etc.mode) else {}
    changes: list[dict] = []
    upper = store.layout.etc_upper
    if upper.is_dir() and not upper.is_symlink():
        _walk(upper, "/etc", below, changes)
    return {"image": name, "upper": str(upper), "changes": sorted(changes, key=lambda c: c["path"])}


def _walk(directory: Path, shown: str, below: dict[bytes, Node], changes: list[dict]) -> None:
    with os.scandir(directory) as it:
        entries = sorted(it, key=lambda e: e.name)
    for entry in entries:
        path = f"{shown}/{entry.name}"
        st = entry.stat(follow_symlinks=False)
        lower = below.get(os.fsencode(entry.name))
        while lower is not None and lower.link is not None:  # a hard link: its original
            lower = lower.link
        if stat.S_ISCHR(st.st_mode) and st.st_rdev == 0:
            if lower is not None:
                changes.append({"path": path, "change": "deleted"})
            continue
        if lower is None:
            changes.append({"path": path, "change": "added"})
            if entry.is_dir(follow_symlinks=False):
                _walk(Path(entry.path), path, {}, changes)
            continue
        if stat.S_ISDIR(st.st_mode) and stat.S_ISDIR(lower.mode):
            opaque = _xattr(entry.path, XATTR_OPAQUE) == b"y"
            if (st.st_mode & 0o7777, st.st_uid, st.st_gid) != (lower.mode & 0o7777, lower.uid, lower.gid):
                changes.append({"path": path, "change": "modified"})
            if opaque:
                kept = {os.fsencode(e) for e in os.listdir(entry.path)}
                changes += [{"path": f"{path}/{os.fsdecode(n)}", "change": "deleted"}
                            for n in lower.children if n not in kept]
            _walk(Path(entry.path), path, {} if opaque else lower.children, changes)
            continue
        changes.append({"path": path, "change": "pinned" if _same(entry.path, st, lower) else "modified"})


def _same(path: str, st: os.stat_result, lower: Node) -> bool:
    if (st.st_mode, st.st_uid, st.st_gid) != (lower.mode, lower.uid, lower.gid):
        return False
    if stat.S_ISLNK(st.st_mode):
        return os.fsencode(os.readlink(path)) == lower.payload
    if not stat.S_ISREG(st.st_mode) or st.st_size != lower.size:
        return False
    if lower.content is not None or lower.size == 0:
        with open(path, "rb") as f:
            return f.read() == (lower.content or b"")
    return fsverity.digest_file(path) == lower.digest


def _xattr(path: str, name: bytes) -> bytes | None:
    try:
        return os.getxattr(path, name, follow_symlinks=False)
    except OSError:
        return None
