"""What is mounted where: ``/proc/PID/mountinfo``, parsed.

The kernel's mount table is the truth a record of mounts is reconciled
against (CRASH-SAFETY.md).  A mount namespace other than this process's
(``unshare -m``, a unit with ``PrivateMounts=``, a container) has its own
table, seen through any process inside it.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass

_OCTAL = re.compile(rb"\\([0-7]{3})")


def _unescape(field: bytes) -> str:
    """Undo the kernel's ``\\NNN`` octal escapes (space, tab, newline, backslash...)."""
    return os.fsdecode(_OCTAL.sub(lambda m: bytes([int(m.group(1), 8)]), field))


@dataclass(frozen=True)
class MountInfo:
    """One line of ``/proc/PID/mountinfo`` (see proc(5)), unescaped."""

    mount_id: int
    parent_id: int
    major: int
    minor: int
    root: str
    mount_point: str
    options: tuple[str, ...]
    optional: tuple[str, ...]
    fstype: str
    source: str
    super_options: tuple[str, ...]

    @classmethod
    def parse(cls, line: bytes) -> MountInfo:
        fields = line.rstrip(b"\n").split(b" ")
        sep = fields.index(b"-", 6)
        major, minor = fields[2].split(b":")
        return cls(
            mount_id=int(fields[0]),
            parent_id=int(fields[1]),
            major=int(major),
            minor=int(minor),
            root=_unescape(fields[3]),
            mount_point=_unescape(fields[4]),
            options=tuple(_unescape(o) for o in fields[5].split(b",")),
            optional=tuple(_unescape(o) for o in fields[6:sep]),
            fstype=_unescape(fields[sep + 1]),
            source=_unescape(fields[sep + 2]),
            super_options=tuple(_unescape(o) for o in fields[sep + 3].split(b",") if o),
        )


def mount_info(pid: int | str = "self") -> list[MountInfo]:
    """The mounts in a process's mount namespace, in the kernel's order."""
    with open(f"/proc/{pid}/mountinfo", "rb") as f:
        return [MountInfo.parse(line) for line in f if line.strip()]


def mount_points_elsewhere(matches: Callable[[MountInfo], bool]) -> set[str]:
    """Mount points of the mounts ``matches`` accepts in every other mount namespace this process can see.

    A mount made inside another namespace is absent from this process's
    mountinfo yet may still use files it sees. Each namespace is read once,
    through the first process found in it; processes that vanish or cannot
    be read are skipped. Namespaces no process is in but an nsfs bind mount
    pins (``unshare --mount=FILE``) are read by entering them
    (:mod:`.nsfs`); one that cannot be entered raises
    ``nsfs.NamespaceUnreadable``, since its mounts are unknown. The paths
    are as the processes of that namespace see them.
    """
    from . import nsfs

    here = os.stat("/proc/self/ns/mnt").st_ino
    seen = {here}
    points: set[str] = set()
    #: (namespace, how to enter it from here: pin paths in turn), for pins not yet read
    pending: list[tuple[int, list[str]]] = []

    def note_pins(found: list[MountInfo], chain: list[str], pid: str | None) -> None:
        for ns, mount_point in nsfs.pins([(m.fstype, m.root, m.mount_point) for m in found]):
            if ns not in seen and len(chain) < nsfs.MAX_DEPTH:
                path = f"/proc/{pid}/root{mount_point}" if pid is not None else mount_point
                pending.append((ns, [*chain, path]))

    note_pins(mount_info(), [], None)
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            ns = os.stat(f"/proc/{pid}/ns/mnt").st_ino
            if ns in seen:
                continue
            found = mount_info(pid)
        except (OSError, ValueError):
            continue
        seen.add(ns)
        points.update(m.mount_point for m in found if matches(m))
        note_pins(found, [], pid)
    while pending:
        ns, chain = pending.pop()
        if ns in seen:
            continue
        found = [MountInfo.parse(line) for line in nsfs.read_pinned(chain).splitlines(keepends=True)
                 if line.strip()]
        seen.add(ns)
        points.update(m.mount_point for m in found if matches(m))
        note_pins(found, chain, None)
    return points


def mounts_at(path: str | os.PathLike[str]) -> list[MountInfo]:
    """The mounts stacked on ``path`` (symlinks resolved) in this namespace, in the kernel's order."""
    real = os.path.realpath(path)
    return [m for m in mount_info() if m.mount_point == real]


def is_mounted(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` (symlinks resolved) is a mount point."""
    return bool(mounts_at(path))


def topmost(mounts: list[MountInfo]) -> MountInfo:
    """The mount on top of a stack of mounts at one path: the one no other sits on."""
    parents = {m.parent_id for m in mounts}
    return next((m for m in mounts if m.mount_id not in parents), mounts[-1])
