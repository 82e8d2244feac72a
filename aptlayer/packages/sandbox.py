"""Run a command inside a new root, fenced off from the host (bubblewrap).

The root directory becomes ``/``, writable: it is the tree being built (an
extracted base, later an overlay mount whose upper directory is in staging).
Around it the sandbox gives:

* fresh ``/proc`` (own PID namespace), a minimal ``/dev`` (null, zero,
  random, tty, pts, shm: no disks) and the host's ``/sys`` read-only;
* ``/tmp`` and ``/run`` as empty tmpfs, so nothing written there reaches
  the image;
* no network (own network namespace with only a down loopback), own IPC
  and UTS namespaces, a new session (no ioctl on the caller's terminal);
* root, but without the capabilities that reach past the tree: no mounts,
  no device nodes (CAP_MKNOD: a block device would open the host's disk),
  no modules, raw I/O, ptrace, clock, reboot or network administration;
* a ``policy-rc.d`` that refuses every service start (exit 101), and
  ``SYSTEMD_OFFLINE=1`` with no ``/run/systemd/system``, so systemctl and
  deb-systemd-invoke act offline and start nothing;
* a fixed environment (C locale, noninteractive debconf), nothing of the
  caller's;
* only the host paths a caller lists, bound read-only unless asked.

Nothing else of the host is visible: not its root, not the store.
bubblewrap needs root here (dpkg must own files as any user), so every
entry point checks for it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from ..errors import InvalidInput, PermissionDenied, Unsupported

BWRAP = "bwrap"

#: capabilities a maintainer script never needs and that reach past the root
DROPPED_CAPS = (
    "CAP_SYS_ADMIN", "CAP_MKNOD", "CAP_SYS_MODULE", "CAP_SYS_RAWIO", "CAP_SYS_PTRACE",
    "CAP_SYS_TIME", "CAP_SYS_BOOT", "CAP_NET_ADMIN", "CAP_NET_RAW", "CAP_SYSLOG",
    "CAP_MAC_ADMIN", "CAP_MAC_OVERRIDE", "CAP_AUDIT_CONTROL", "CAP_AUDIT_WRITE",
    "CAP_WAKE_ALARM", "CAP_BLOCK_SUSPEND", "CAP_LINUX_IMMUTABLE", "CAP_SYS_PACCT",
    "CAP_SYS_TTY_CONFIG", "CAP_LEASE",
)

ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "LC_ALL": "C",
    "HOME": "/root",
    "TERM": "dumb",
    "DEBIAN_FRONTEND": "noninteractive",
    "DEBCONF_NONINTERACTIVE_SEEN": "true",
    "SYSTEMD_OFFLINE": "1",
}

POLICY_RC_D = "/usr/sbin/policy-rc.d"
POLICY_SCRIPT = b"#!/bin/sh\n# apt-layer: no service starts while an image is built\nexit 101\n"

#: Writes policy-rc.d where the root has none, runs the command, removes it
#: again: created and removed inside the root, it leaves nothing behind.
#: (Where the root has one, the sandbox binds the refusing script over it.)
_WRAPPER = f"""\
p={POLICY_RC_D}
mine=
if [ ! -e "$p" ] && [ ! -L "$p" ] && [ -d /usr/sbin ]; then
  printf '#!/bin/sh\\nexit 101\\n' >"$p" && chmod 755 "$p" && mine=1
fi
"$@"
rc=$?
if [ -n "$mine" ]; then rm -f "$p"; fi
exit $rc
"""


class SandboxError(Unsupported):
    """bubblewrap is missing, or the sandbox itself could not be set up."""


@dataclass(frozen=True)
class Bind:
    """A host path made visible inside the sandbox at *inside*."""

    host: Path
    inside: str
    writable: bool = False


def check_available() -> str:
    """The bwrap binary; raises when it or the privileges are missing."""
    if os.geteuid() != 0:
        raise PermissionDenied("running apt and dpkg in a new root needs root")
    path = shutil.which(BWRAP)
    if path is None:
        raise SandboxError("bubblewrap (bwrap) is not installed: apt-get install bubblewrap")
    return path


def exists_in_root(root: Path, path: str) -> bool:
    """Whether *path* exists in *root*, following symlinks as if root were /.

    Symlinks in an image point inside the image (``/sbin -> usr/sbin``);
    resolving them on the host would leave the tree. Every component is
    looked at with lstat, so no host symlink is followed.
    """
    pending = list(PurePosixPath(path).parts[1:])
    current = PurePosixPath("/")
    hops = 0
    while pending:
        name = pending.pop(0)
        if name in ("", "."):
            continue
        if name == "..":
            current = current.parent
            continue
        candidate = current / name
        host = root / candidate.relative_to("/")
        if not os.path.lexists(host):
            return False
        if os.path.islink(host):
            hops += 1
            if hops > 40:
                return False
            target = PurePosixPath(os.readlink(host))
            if target.is_absolute():
                current = PurePosixPath("/")
                pending = list(target.parts[1:]) + pending
            else:
                pending = list(target.parts) + pending
            continue
        current = candidate
    return True


def bwrap_argv(root: Path, binds: tuple[Bind, ...] = (), tmpfs: tuple[str, ...] = (),
               policy_fd: int | None = None) -> list[str]:
    """The bubblewrap command line for *root* (without the command)."""
    argv = [
        check_available(),
        "--bind", str(root), "/",
        "--proc", "/proc",
        "--dev", "/dev",
        "--ro-bind", "/sys", "/sys",
        "--tmpfs", "/tmp",
        "--tmpfs", "/run",
        "--unshare-net", "--unshare-pid", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try",
        "--hostname", "apt-layer",
        "--die-with-parent", "--new-session",
        "--chdir", "/",
    ]
    for cap in DROPPED_CAPS:
        argv += ["--cap-drop", cap]
    for bind in binds:
        argv += ["--bind" if bind.writable else "--ro-bind", str(bind.host), bind.inside]
    for inside in tmpfs:
        argv += ["--tmpfs", inside]
    if policy_fd is not None:
        argv += ["--perms", "0755", "--ro-bind-data", str(policy_fd), POLICY_RC_D]
    return argv


def run(root: Path, command: list[str], *, binds: tuple[Bind, ...] = (), tmpfs: tuple[str, ...] = (),
        env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run *command* in a sandbox on *root*, stdout and stderr merged (:func:`output_text`).

    *binds* are host paths to show inside; *tmpfs* lists paths (mount points
    that exist in a bind) that get an empty writable tmpfs; *env* adds to
    the fixed environment. The command runs under the root's own
    ``/bin/sh``, which puts the refusing policy-rc.d in place; the exit
    status is the command's.
    """
    root = Path(root)
    if not exists_in_root(root, "/bin/sh"):
        raise InvalidInput(f"{root} is not a root file system (no /bin/sh)")
    policy_fd = None
    if exists_in_root(root, POLICY_RC_D):
        read_end, write_end = os.pipe()
        os.write(write_end, POLICY_SCRIPT)
        os.close(write_end)
        policy_fd = read_end
    try:
        argv = bwrap_argv(root, binds, tmpfs, policy_fd)
        argv += ["--", "/bin/sh", "-c", _WRAPPER, "apt-layer-sandbox", *command]
        return subprocess.run(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            env={**ENV, **(env or {})}, pass_fds=(policy_fd,) if policy_fd is not None else (),
            check=False,
        )
    finally:
        if policy_fd is not None:
            os.close(policy_fd)


def output_text(result: subprocess.CompletedProcess) -> str:
    """The merged output of a sandboxed run, decoded leniently."""
    return result.stdout.decode("utf-8", "replace") if result.stdout else ""
