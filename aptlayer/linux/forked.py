"""Half of a pure-Python loop on the second core: one forked helper process.

Threads do not help the loops of a build (an ``lstat`` walk, hashing 4 KiB
blocks): each step holds the GIL longer than the system call or hash it
releases it for.  A forked helper does help: it starts with the parent's
memory, runs its half, and hands back a result that ``marshal`` can carry,
through a memfd (one write, one read), followed by a mark that says it is
complete.

A helper is forked only from a single-threaded process (a thread of the
parent could hold a lock the child would then wait on forever) that may run
on two CPUs.  The helper ends with ``os._exit`` whatever happens, so it
never runs the parent's cleanups, and the parent reaps it even when its own
half fails.
"""

from __future__ import annotations

import marshal
import os
import signal
import threading
from collections.abc import Callable, Collection
from typing import Any, TypeVar

T = TypeVar("T")
#: written after the helper's result: without it the result is incomplete
_DONE = b"\napt-layer helper done\n"


def helper_allowed() -> bool:
    """Whether a helper may be forked: two CPUs to run on, and no other thread in this process."""
    return threading.active_count() == 1 and len(os.sched_getaffinity(0)) > 1


def split(theirs: Callable[[], Any], mine: Callable[[], T], keep: Collection[int] = ()) -> tuple[T, Any]:
    """Run ``theirs`` in a forked helper while ``mine`` runs here; both results.

    The helper's result is None if it failed in any way (an exception, a
    result ``marshal`` cannot carry, a signal).  An exception of ``mine``
    is raised once the helper is killed and reaped.  Where no helper can be
    started (the process or memory limits: fork or memfd_create fails),
    both run here, one after the other.

    The helper keeps open only the fds in ``keep`` (those ``theirs`` uses);
    its standard streams go to /dev/null.  So it holds none of the parent's
    locks (``flock`` locks live as long as any fd of their open file) and
    none of its pipes, even if the parent dies while the helper runs on.
    """
    try:
        out = os.memfd_create("apt-layer-helper", os.MFD_CLOEXEC)
    except OSError:
        return mine(), theirs()
    try:
        try:
            pid = os.fork()
        except OSError:
            return mine(), theirs()
        if pid == 0:  # the helper
            try:
                _close_all_but({out, *keep})
                data = memoryview(marshal.dumps(theirs()) + _DONE)
                while data:
                    data = data[os.write(out, data):]
            finally:
                os._exit(0)
        try:
            result = mine()
            _reap(pid)
            pid = 0
        finally:
            if pid:  # ours failed: the helper's work is of no use
                os.kill(pid, signal.SIGKILL)
                _reap(pid)
        data = os.pread(out, os.fstat(out).st_size, 0)
    finally:
        os.close(out)
    # complete only with the mark written after it (the exit status may be unknowable)
    return result, marshal.loads(data) if data.endswith(_DONE) else None


def _close_all_but(keep: set[int]) -> None:
    null = os.open(os.devnull, os.O_RDWR)
    for std in (0, 1, 2):
        os.dup2(null, std)
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd > 2 and fd not in keep:
            try:
                os.close(fd)
            except OSError:  # the listing's own fd, closed by now
                pass


def _reap(pid: int) -> None:
    """Wait for the helper to end.  Where SIGCHLD is ignored the kernel reaps it itself, and
    ``waitpid`` returns ECHILD once it has ended."""
    try:
        os.waitpid(pid, 0)
    except ChildProcessError:
        pass
