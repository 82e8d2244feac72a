"""Opening a directory entry as a listing saw it, and nothing else.

Between ``lstat`` and ``open`` an entry can be swapped (for a symlink to
``/etc/shadow``, say). Opening relative to the directory's fd with the
caller's flags (O_NOFOLLOW among them) and comparing the opened file's
identity with the ``lstat`` catches it.
"""

from __future__ import annotations

import os
import stat


class EntryChanged(Exception):
    """The entry opened is not the one the listing described."""


def open_as_listed(dir_fd: int, name: bytes, st: os.stat_result, flags: int) -> tuple[int, os.stat_result]:
    """The fd of entry ``name`` of ``dir_fd`` and its ``fstat``, if it is still the file ``st`` describes.

    Same device and inode, and for a non-directory the same type and size;
    otherwise EntryChanged (the fd closed). OSError if it cannot be opened.
    """
    fd = os.open(name, flags, dir_fd=dir_fd)
    now = os.fstat(fd)
    same = (now.st_dev, now.st_ino) == (st.st_dev, st.st_ino)
    if same and not stat.S_ISDIR(st.st_mode):
        same = (now.st_mode, now.st_size) == (st.st_mode, st.st_size)
    if not same:
        os.close(fd)
        raise EntryChanged(name)
    return fd, now
