"""Who may write where the store is: the ownership and mode rules a root tool must keep.

apt-layer runs as root and trusts what its store holds: a directory that
another user can write in lets that user plant a symlink, swap an image or
edit the journal, and root then acts on it. So, as sshd's StrictModes does for
``~/.ssh``, every write command first checks that the store root, each
directory apt-layer writes in, ``journal.db``, and every parent directory up
to ``/`` are owned by root (or by the user running apt-layer) and writable by
nobody else.

Sticky parents: a world-writable directory with the sticky bit (``/tmp``,
mode 1777) is accepted as a parent when it is owned by root and the next
directory on the path below it is owned by root too (or by the user). In a
sticky directory only an entry's owner, the directory's owner and root may
rename or remove the entry, so other users can add names beside apt-layer's
path but cannot replace any of it. sshd refuses such parents; apt-layer
accepts them so that a store under ``/tmp/...`` (tests, experiments) works,
while a group- or world-writable parent without the sticky bit is refused.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass

#: the mode bits that let someone other than the owner change a directory's entries or a file
_OTHERS_WRITE = stat.S_IWGRP | stat.S_IWOTH


@dataclass(frozen=True)
class Unsafe:
    """One path whose owner or mode lets another user change what apt-layer trusts."""

    path: str
    problem: str
    fix: str

    def __str__(self) -> str:
        return f"{self.path} {self.problem}; fix: {self.fix}"

    def to_dict(self) -> dict:
        return {"path": self.path, "problem": self.problem, "fix": self.fix}


def _trusted_owner(uid: int) -> bool:
    return uid in (0, os.geteuid())


def _own_problem(path: str, st: os.stat_result) -> Unsafe | None:
    """What is wrong with a path apt-layer itself writes in (or the journal): owner, then mode."""
    if not _trusted_owner(st.st_uid):
        return Unsafe(path, f"is owned by uid {st.st_uid}, not root", f"chown root:root {path}")
    if st.st_mode & _OTHERS_WRITE:
        return Unsafe(path, f"is writable by {_who(st.st_mode)} (mode {stat.S_IMODE(st.st_mode):04o})",
                      f"chmod go-w {path}")
    return None


def _who(mode: int) -> str:
    return " and ".join(w for w, bit in (("group", stat.S_IWGRP), ("others", stat.S_IWOTH)) if mode & bit)


def check_parents(path: str | os.PathLike) -> list[Unsafe]:
    """The parents of ``path`` (resolved; the part that exists) that another user could change.

    Each must be owned by root (or the user) and not group- or
    other-writable, except a root-owned sticky directory whose child on the
    path is owned by root (or the user): see the module's docstring.
    """
    real = os.path.realpath(path)
    chain = []
    current = real
    while True:
        chain.append(current)
        parent = os.path.dirname(current)
        if parent == current:
            break
        current = parent
    chain.reverse()  # "/", "/a", "/a/b", ..., real
    found = []
    for i, directory in enumerate(chain[:-1]):
        try:
            st = os.lstat(directory)
        except FileNotFoundError:
            break
        if not _trusted_owner(st.st_uid):
            found.append(Unsafe(directory, f"is owned by uid {st.st_uid}, not root", f"chown root:root {directory}"))
            continue
        if not st.st_mode & _OTHERS_WRITE:
            continue
        if st.st_mode & stat.S_ISVTX and st.st_uid == 0:
            try:
                child = os.lstat(chain[i + 1])
            except FileNotFoundError:
                continue  # apt-layer makes it, as root: checked on the next open
            if _trusted_owner(child.st_uid):
                continue
            found.append(Unsafe(chain[i + 1], f"is owned by uid {child.st_uid} inside the sticky, world-writable "
                                              f"{directory}", f"chown root:root {chain[i + 1]}"))
            continue
        found.append(Unsafe(directory, f"is writable by {_who(st.st_mode)} (mode {stat.S_IMODE(st.st_mode):04o})",
                            f"chmod go-w {directory}"))
    return found


def check_store(root: str | os.PathLike, directories, files) -> list[Unsafe]:
    """Every unsafe path of a store: its parents, its root, ``directories`` and ``files`` (those that exist)."""
    found = check_parents(root)
    for path in (os.path.realpath(root), *directories, *files):
        path = os.fspath(path)
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            continue
        problem = _own_problem(path, st)
        if problem is not None:
            found.append(problem)
    return found
