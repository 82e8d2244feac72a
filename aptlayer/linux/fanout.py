"""Which files of a fan-out directory (``DIR/FILE``, the way the digest
store lays out its objects) are missing, reading each directory once.

Looking each file up costs a path walk and a ``stat`` per file. At boot
(cold caches, a slow disk, an emulated machine) checking a deployed image's
ten thousand objects that way was most of ``recover --boot``'s time. A
directory from which many files are wanted is listed instead (one pass,
the file type from the listing); for a few files, each is looked up.
"""

from __future__ import annotations

import os
import stat
from collections import Counter
from collections.abc import Iterable

#: from this many files wanted in one directory on, it is listed rather than each file looked up
LIST_FROM = 16


def missing_files(root: str, names: Iterable[str]) -> list[str]:
    """The ``names`` (paths under ``root``) that are not regular files there, in their order.

    Symlinks do not count as files (nothing here follows one).
    """
    names = list(names)
    wanted = Counter(_split(name)[0] for name in names if _split(name))
    listed = {d: _regular_files(os.path.join(root, d)) for d, count in wanted.items() if count >= LIST_FROM}
    missing = []
    for name in names:
        parts = _split(name)
        if parts and parts[0] in listed:
            present = parts[1] in listed[parts[0]]
        else:
            present = _is_regular(os.path.join(root, name))
        if not present:
            missing.append(name)
    return missing


def _split(name: str) -> tuple[str, str] | None:
    """``DIR/FILE`` as (DIR, FILE); None for any other shape (looked up as it is)."""
    d, sep, f = name.partition("/")
    if not sep or not d or not f or "/" in f or d in (".", ".."):
        return None
    return d, f


def _regular_files(directory: str) -> set[str]:
    try:
        with os.scandir(directory) as entries:
            return {e.name for e in entries if e.is_file(follow_symlinks=False)}
    except (FileNotFoundError, NotADirectoryError):
        return set()


def _is_regular(path: str) -> bool:
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except (FileNotFoundError, NotADirectoryError):
        return False
