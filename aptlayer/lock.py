"""The store lock: writers share it, gc and recovery take it exclusively.

``flock(2)`` locks belong to the open file description, so the kernel drops
them when the process dies, SIGKILL included: there is never a stale lock to
clean up. A lock is taken in its final mode from the start; upgrading a shared
lock to exclusive could deadlock two upgraders.
"""

from __future__ import annotations

import fcntl
import os
import time
from contextlib import contextmanager
from collections.abc import Iterator


class LockTimeout(Exception):
    pass


@contextmanager
def locked(path: str | os.PathLike, exclusive: bool, timeout: float | None = None) -> Iterator[int]:
    """Hold ``path`` locked (created if needed) for the ``with`` body.

    ``timeout`` None waits as long as it takes; otherwise LockTimeout is
    raised after that many seconds.
    """
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        mode = fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH
        if timeout is None:
            fcntl.flock(fd, mode)
        else:
            deadline = time.monotonic() + timeout
            while True:
                try:
                    fcntl.flock(fd, mode | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        raise LockTimeout(str(path)) from None
                    time.sleep(0.02)
        yield fd
    finally:
        os.close(fd)


def is_held(path: str | os.PathLike) -> bool:
    """True if some live process holds a lock on ``path`` (any mode)."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False
