"""Mark and sweep of the digest store, driven by the journal's projection.

Mark: an object is live while its refcount in the projection is above zero
(live images, open transactions' staged images, deployed and mounted
images). No image is parsed to mark.

Sweep, incremental (default): only the objects whose refcount reached zero,
so the cost follows the garbage, not the store. Full: also walk the store
for strays no manifest names (left by writers that crashed before their
commit) and stale temporary files of dead writers.

Grace: objects written within the grace period are spared; the incremental
ones keep their refcount-0 rows (the caller records them in ``gc.swept``),
so a later gc and ``status`` still see them as garbage.

Names: only ``xx/yyyy...`` object paths are ever renamed or unlinked. A
manifest recorded before the Store refused other backing paths may name
``/etc`` or ``../..``; such rows are reported as refused and left alone.

Safety: the caller holds the store lock exclusively, so no writer is
between its dedupe check and its commit. An object is renamed into the trash
first and only then unlinked, so a crash mid-sweep leaves whole objects
either in place or in the trash (emptied by the next gc). The renames are not
made durable one fan-out directory at a time (up to 256 fsyncs would cost
more than the rest of an incremental gc): an object whose removal a power
loss undoes is unreferenced and not in ``object_refs`` any more, a stray
that the next ``gc --full`` removes.
"""

from __future__ import annotations

import errno
import os
import stat
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from ..composefs.fsverity import is_object_path
from ..composefs.objectstore import ObjectStore
from ..fault import fault
from ..linux import fsops
from ..linux.beneath import open_dir_beneath

class State(Protocol):
    """What gc asks of the projection (the journal's state queries answer it)."""

    def referenced_count(self) -> int:
        """How many objects some root holds."""

    def referenced(self) -> Iterable[str]:
        """The objects some root holds."""

    def garbage(self) -> list[tuple[str, int]]:
        """(object, size) of the objects whose refcount reached 0, not yet swept."""


#: unlinks in flight while emptying the trash
UNLINK_THREADS = 16


@dataclass
class GcPlan:
    objects: list[tuple[str, int]] = field(default_factory=list)
    temp_files: list[str] = field(default_factory=list)
    #: garbage the grace period spares: objects removable but too recent
    spared: list[str] = field(default_factory=list)
    #: of those, the ones with a refcount-0 row, which ``gc.swept`` must keep
    kept: list[str] = field(default_factory=list)
    #: refcount-0 names that are not object paths: never touched
    refused: list[str] = field(default_factory=list)
    marked: int = 0

    @property
    def bytes(self) -> int:
        return sum(size for _, size in self.objects)


def plan(state: State, objects_dir: Path, *, full: bool, grace_seconds: int = 0) -> GcPlan:
    """What a sweep would remove, from the projection (and a walk with ``full``)."""
    result = GcPlan()
    result.marked = state.referenced_count()
    cutoff = time.time() - grace_seconds
    if full:
        live = set(state.referenced())
        garbage = {obj for obj, _ in state.garbage()}
        result.refused = sorted(obj for obj in garbage if not is_object_path(obj))
        store = ObjectStore(objects_dir)
        for obj in store.iter_objects():
            if obj.relpath in live:
                continue
            if grace_seconds and obj.mtime_ns / 1e9 > cutoff:
                result.spared.append(obj.relpath)
                continue
            result.objects.append((obj.relpath, obj.size))
        result.kept = [obj for obj in result.spared if obj in garbage]
        result.temp_files = [t.path for t in store.iter_temp_files() if t.stale]
        return result
    with _ObjectDirs(objects_dir) as dirs:
        for obj, _ in state.garbage():
            if not is_object_path(obj):
                result.refused.append(obj)
                continue
            st = dirs.lstat(obj)
            if st is None:
                result.objects.append((obj, 0))
                continue
            if grace_seconds and st.st_mtime > cutoff:
                result.spared.append(obj)
                continue
            result.objects.append((obj, st.st_size))
    result.kept = list(result.spared)
    return result


class _ObjectDirs:
    """The digest store's fan-out directories, each reached once through an fd without following symlinks.

    ``objects/ab`` planted as a symlink to another directory is not a
    fan-out directory: its "objects" are neither sized nor removed (ELOOP or
    ENOTDIR at the open, which checks and opens in one step).
    """

    def __init__(self, objects_dir: Path):
        self.fd = fsops.open_dir(objects_dir)
        self._fans: dict[str, int | None] = {}

    def __enter__(self) -> _ObjectDirs:
        return self

    def __exit__(self, *exc) -> None:
        for fd in self._fans.values():
            if fd is not None:
                os.close(fd)
        os.close(self.fd)

    def fan(self, name: str) -> int | None:
        """The fd of fan-out directory ``name``, or None if it is missing or not a real directory."""
        if name not in self._fans:
            try:
                self._fans[name] = open_dir_beneath(self.fd, name)
            except OSError as e:
                if e.errno not in (errno.ENOENT, errno.ELOOP, errno.ENOTDIR, errno.EXDEV):
                    raise
                self._fans[name] = None
        return self._fans[name]

    def lstat(self, obj: str) -> os.stat_result | None:
        """The object's own stat (a symlink is not followed), None if absent or not a regular file."""
        fan, rest = obj.split("/")
        fd = self.fan(fan)
        if fd is None:
            return None
        try:
            st = os.stat(rest, dir_fd=fd, follow_symlinks=False)
        except FileNotFoundError:
            return None
        return st if stat.S_ISREG(st.st_mode) else None


def sweep(gc_plan: GcPlan, objects_dir: Path, trash_dir: Path,
          progress: Callable[[int, int], None] | None = None) -> tuple[int, int]:
    """Remove what the plan lists; returns (objects removed, bytes freed).

    Every rename and unlink is relative to directory fds opened without
    following symlinks (the trash and the digest store once, at the start),
    so a directory swapped for a symlink meanwhile sends nothing outside the
    store: the fds still name the directories that were checked.
    """
    trash_fd = fsops.open_dir(trash_dir)
    try:
        with _ObjectDirs(objects_dir) as dirs:
            return _sweep(gc_plan, objects_dir, dirs, trash_fd, progress)
    finally:
        os.close(trash_fd)


def _sweep(gc_plan: GcPlan, objects_dir: Path, dirs: _ObjectDirs, trash_fd: int, progress) -> tuple[int, int]:
    _empty_trash_at(trash_fd)
    removed = freed = 0
    total = len(gc_plan.objects)
    for i, (obj, size) in enumerate(gc_plan.objects):
        if not is_object_path(obj):  # never outside the store, whoever made the plan
            continue
        fan, rest = obj.split("/")
        fan_fd = dirs.fan(fan)
        if fan_fd is None:
            continue
        try:
            fsops.rename_at(fan_fd, rest, trash_fd, fan + rest)
        except FileNotFoundError:
            continue
        removed += 1
        freed += size
        if i == 0:
            fault("gc.after-first-trash")
        if progress is not None and i % 256 == 0:
            progress(i, total)
    for tmp in gc_plan.temp_files:
        name = os.path.relpath(os.path.join(objects_dir, tmp), objects_dir)
        if "/" in name or name in (".", ".."):  # temp files live in the top level of the digest store
            continue
        try:
            fsops.unlink_at(dirs.fd, name)
        except FileNotFoundError:
            pass
    fault("gc.before-empty-trash")
    _empty_trash_at(trash_fd)
    return removed, freed


def empty_trash(trash_dir: Path) -> int:
    """Delete what the trash holds (see :func:`_empty_trash_at`)."""
    fd = fsops.open_dir(trash_dir)
    try:
        return _empty_trash_at(fd)
    finally:
        os.close(fd)


def _empty_trash_at(trash_fd: int) -> int:
    """Delete what the trash open as ``trash_fd`` holds; the files by several threads at once.

    On ext4 mounted with ``discard`` an unlink that frees blocks waits for
    the journal (about 1 ms here); a thousand of them in a row took a
    second, overlapped they take a tenth of it.
    """
    with os.scandir(trash_fd) as it:
        entries = [(e.name, e.is_dir(follow_symlinks=False)) for e in it]
    files = []
    for name, is_dir in entries:
        if is_dir:
            fsops.remove_tree_at(trash_fd, name)
        else:
            files.append(name)
    if files:
        fsops.unlink_at(trash_fd, files[0])
        fault("gc.after-first-delete")
        with ThreadPoolExecutor(UNLINK_THREADS) as pool:
            for _ in pool.map(lambda name: fsops.unlink_at(trash_fd, name), files[1:]):
                pass
    if entries:
        fsops.fsync(trash_fd)
    return len(entries)
