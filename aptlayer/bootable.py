"""Whether an image's own kernels can mount it (``deploy`` refuses one that cannot).

Mounting an image needs erofs, overlayfs and overlayfs's data-only lower
layers (Linux 6.5). Debian 13's kernel, and Debian 12's backports kernel,
are 6.12; Debian 12's own 6.1 is too old. An image that carries kernels
(``/usr/lib/modules/RELEASE``) boots one of them, so an image all of whose
kernels are older than that could not mount itself. This sits below the
Store (which calls it on deploy); :mod:`aptlayer.boot.kernel` checks the
running kernel.
"""

from __future__ import annotations

import os
import re
import stat

from . import errors
from .composefs.reader import read_path

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
