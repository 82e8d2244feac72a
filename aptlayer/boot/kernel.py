"""What the running kernel can do for composefs (``apt-layer check``).

An image's own kernels are judged by :mod:`aptlayer.bootable` (``deploy``
refuses an image that could not mount itself). The version checks say
which kernel version brought a feature; the file system checks read what
the running kernel has or can load.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from ..bootable import DATA_ONLY_LAYERS, TOO_OLD, version


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
