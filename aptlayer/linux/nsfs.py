"""Mount namespaces that no process is in, kept alive by an nsfs bind mount.

``unshare --mount=/run/ns/x true`` leaves a mount namespace with no process
in it, pinned by a bind mount of its ``/proc/PID/ns/mnt`` file (file system
type ``nsfs``, root ``mnt:[INODE]``). Its mounts stay mounted and keep using
their files, yet a scan of ``/proc/*/mountinfo`` never sees them. This
module finds such pins in the mount tables it is given and reads the pinned
namespace's table from a forked child that enters it (``setns``), through a
``/proc/PID`` fd opened before entering (the namespace may have no ``/proc``
of its own). A pin inside a pinned namespace is followed too, entering each
in turn.
"""

from __future__ import annotations

import ctypes
import os
import re

CLONE_NEWNS = 0x00020000
_PIN = re.compile(r"mnt:\[(\d+)\]")
#: how deep pins inside pinned namespaces are followed
MAX_DEPTH = 8


class NamespaceUnreadable(OSError):
    """A pinned mount namespace exists whose mount table cannot be read (not root, or setns refused)."""


def pins(lines: list[tuple[str, str, str]]) -> list[tuple[int, str]]:
    """(namespace inode, mount point) of the mount-namespace pins among (fstype, root, mount point) rows."""
    found = []
    for fstype, root, mount_point in lines:
        if fstype == "nsfs":
            m = _PIN.fullmatch(root.strip("/"))
            if m:
                found.append((int(m.group(1)), mount_point))
    return found


def read_pinned(chain: list[str]) -> bytes:
    """The ``mountinfo`` of the namespace reached by entering each pin path of ``chain`` in turn.

    Each path is opened in the namespace entered before it (the first in
    this process's). Raises NamespaceUnreadable if the child could not.
    """
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: enter, read, write, exit; never returns
        code = 1
        try:
            os.close(read_fd)
            proc = os.open(f"/proc/{os.getpid()}", os.O_RDONLY | os.O_DIRECTORY)
            libc = ctypes.CDLL(None, use_errno=True)
            for path in chain:
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
                if libc.setns(fd, CLONE_NEWNS) != 0:
                    os._exit(2)
                os.close(fd)
            mi = os.open("mountinfo", os.O_RDONLY, dir_fd=proc)
            while chunk := os.read(mi, 1 << 16):
                view = memoryview(chunk)
                while view:
                    view = view[os.write(write_fd, view):]
            code = 0
        finally:
            os._exit(code)
    os.close(write_fd)
    data = bytearray()
    with os.fdopen(read_fd, "rb") as f:
        while chunk := f.read(1 << 16):
            data += chunk
    _, status = os.waitpid(pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise NamespaceUnreadable(f"cannot enter the mount namespace pinned at {' then '.join(chain)} "
                                  "(needs root)")
    return bytes(data)
