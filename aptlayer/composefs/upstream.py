"""Locating and driving the upstream composefs C tools, when installed.

apt-layer never needs them; when they are present they can serve as the
``upstream`` backend and as the oracle in tests. ``APT_LAYER_COMPOSEFS_BIN``
names a directory to look in before ``PATH`` (for a build in a scratch
prefix, as ``tools/build-upstream-composefs.sh`` makes).
"""

from __future__ import annotations

import os

TOOLS = ("mkcomposefs", "composefs-info", "mount.composefs")

#: what the head of apt-layer's own launcher says (see :func:`_is_apt_layer`)
LAUNCHER_MARK = b"apt-layer launcher"


def _is_apt_layer(path: str) -> bool:
    """True for apt-layer's own drop-in under an upstream name (a Python launcher).

    Debian's ``apt-layer-composefs-tools`` installs ``/usr/bin/mkcomposefs``
    and friends as apt-layer itself: taking them for upstream would only run
    apt-layer again in a subprocess, and compare it with itself in tests.
    """
    try:
        with open(path, "rb") as f:
            head = f.read(256)
    except OSError:
        return False
    return head.startswith(b"#!") and LAUNCHER_MARK in head


def find_tool(name: str) -> str | None:
    """Absolute path of an upstream tool, or None if it is not installed."""
    dirs = []
    for d in filter(None, os.environ.get("APT_LAYER_COMPOSEFS_BIN", "").split(os.pathsep)):
        dirs += [d, os.path.join(d, "../sbin")]
    dirs += [d for d in os.environ.get("PATH", "").split(os.pathsep) if d] + ["/usr/sbin", "/sbin"]
    for d in dirs:
        cand = os.path.normpath(os.path.join(d, name))
        if os.path.isfile(cand) and os.access(cand, os.X_OK) and not _is_apt_layer(cand):
            return cand
    return None


def mount_with_tool(image: str, target: str, basedirs: list[str], *, upperdir: str | None = None,
                    workdir: str | None = None, readonly: bool = False, verity: str = "off",
                    idmap: str | None = None, digest: str | None = None, nosuid: bool = False,
                    nodev: bool = False, check_redirects: bool = True) -> None:
    """Mount through the upstream ``mount.composefs``, with ``mount.mount``'s arguments.

    The tool takes no nosuid or nodev: they are set on its mount right after
    (``mount_setattr``); the image's redirects are checked before.

    Raises ``MountError`` (errno EIO with upstream's message) when it fails,
    or ENOENT when the tool is not installed.
    """
    import errno
    import subprocess

    from .mount import MountError

    tool = find_tool("mount.composefs")
    if tool is None:
        raise MountError(errno.ENOENT, "mount.composefs is not installed")
    opts = ["basedir=" + ":".join(basedirs)]
    if upperdir is not None:
        opts += [f"upperdir={upperdir}", f"workdir={workdir}"]
    if readonly:
        opts.append("ro")
    if verity == "require":
        opts.append("verity")
    elif verity == "try":
        opts.append("tryverity")
    if idmap is not None:
        opts.append(f"idmap={idmap}")
    if digest is not None:
        opts.append(f"digest={digest}")
    from .mount import check_image_redirects

    if check_redirects:
        check_image_redirects(image)
    proc = subprocess.run([tool, "-o", ",".join(opts), image, target], capture_output=True, text=True)
    if proc.returncode != 0:
        message = " ".join(proc.stderr.split()) or f"mount.composefs exited {proc.returncode}"
        raise MountError(errno.EIO, message)
    if nosuid or nodev:
        from ..linux import mountapi

        attrs = (mountapi.MOUNT_ATTR_NOSUID if nosuid else 0) | (mountapi.MOUNT_ATTR_NODEV if nodev else 0)
        try:
            mountapi.set_attrs(target, attrs)
        except OSError as e:
            mountapi.umount(target, mountapi.MNT_DETACH)
            raise MountError(e.errno, f"cannot make {target} nosuid,nodev: {e.strerror}") from None
