"""What a kernel can do for composefs: the running one (``apt-layer check``) and an image's (``deploy``).

Mounting an image needs erofs, overlayfs and overlayfs's data-only lower
layers (Linux 6.5). Debian 13's kernel, and Debian 12's backports kernel,
are 6.12; Debian 12's own 6.1 is too old. An image that carries kernels
(``/usr/lib/modules/RELEASE``) boots one of them, so ``deploy`` refuses an
image all of whose kernels are older than that: it could not mount itself.
The version checks say which kernel version brought a feature; the file
system checks read what the running kernel has or can load.
"""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path

from .. import errors
from ..composefs.reader import read_path

DATA_ONLY_LAYERS = (6, 5)
TOO_OLD = ("overlayfs data-only lower layers need Linux 6.5 or newer (Debian 13's kernel, and Debian 12's "
           "backports kernel, are 6.12; Debian 12's own 6.1 is too old)")


def version(release: str) -> tuple[int, int] | None:
    """``(major, minor)`` of a kernel release such as ``6.12.57+deb13-amd64``."""
    m = re.match(r"(\d+)\.(\d+)", release)
    return (int(m.group(1)), int(m.group(2))) if m else None


def image_kernels(image: str | os.PathLike) -> list[str]:
    """The kernel releases an image carries (its ``/usr/lib/modules`` directories)."""
    modules = read_path(image, b"/usr/lib/modules")
    if modules is None or not stat.S_ISDIR(modules.mode):
        return []
    return sorted(os.fsdecode(n) for n, node in modules.children.items()
                  if stat.S_ISDIR(node.mode) and version(os.fsdecode(n)))


def refuse_unbootable(image: str | os.PathLike, name: str) -> None:
    """Unsupported if every kernel ``image`` carries is too old to mount it."""
    kernels = image_kernels(image)
    if kernels and all(version(k) < DATA_ONLY_LAYERS for k in kernels):
        raise errors.Unsupported(f"image {name} boots Linux {', '.join(kernels)}, which cannot mount it: {TOO_OLD}")


# --- the running kernel ----------------------------------------------------------------


def _has_filesystem(fs: str, release: str, modules: Path) -> bool:
    """Registered now, or built in or available as a module (loaded on the first mount)."""
    with open("/proc/filesystems") as f:
        if fs in {line.split()[-1] for line in f if line.strip()}:
            return True
    module = {"overlay": "overlay", "erofs": "erofs"}[fs]
    for index in ("modules.builtin", "modules.dep"):
        try:
            text = (modules / release / index).read_text()
        except OSError:
            continue
        if re.search(rf"/{module}\.ko", text):
            return True
    return False


def _fsverity() -> bool:
    from ..linux.verity import kernel_lacks_fsverity

    return not kernel_lacks_fsverity()


def check(release: str | None = None, modules: Path = Path("/lib/modules")) -> dict:
    """What the running kernel supports; ``mountable``: whether it can mount composefs images."""
    release = release or os.uname().release
    v = version(release) or (0, 0)

    def since(major: int, minor: int) -> tuple[bool, str]:
        return v >= (major, minor), f"Linux {major}.{minor}+"

    features = []
    for name, (ok, detail) in (
        ("erofs", (_has_filesystem("erofs", release, modules), "file system (built in or a module)")),
        ("overlay", (_has_filesystem("overlay", release, modules), "file system (built in or a module)")),
        ("overlay data-only lower layers", since(6, 5)),
        ("overlay verity (fs-verity checked metacopy)", since(6, 6)),
        ("overlay layers as file descriptors (lowerdir+)", since(6, 8)),
        ("erofs mounted from a file, without a loop device", (since(6, 12)[0], "Linux 6.12+ built with "
                                                              "CONFIG_EROFS_FS_BACKED_BY_FILE")),
        ("fs-verity", (_fsverity(), "CONFIG_FS_VERITY")),
        ("new mount API (fsopen, fsmount, move_mount)", since(5, 2)),
        ("idmapped mounts of overlay layers", since(5, 19)),
    ):
        features.append({"feature": name, "supported": ok, "detail": detail})
    required = {"erofs", "overlay", "overlay data-only lower layers"}
    mountable = all(f["supported"] for f in features if f["feature"] in required)
    return {"kernel": release, "mountable": mountable, "features": features,
            **({} if mountable else {"problem": TOO_OLD if v < DATA_ONLY_LAYERS else "the kernel lacks erofs or overlay"})}
