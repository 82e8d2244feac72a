"""Locating and driving the upstream composefs C tools, when installed.

apt-layer never needs them; when they are present they can serve as the
``upstream`` backend and as the oracle in tests. ``APT_LAYER_COMPOSEFS_BIN``
names a directory to look in before ``PATH`` (for a build in a scratch
prefix, as ``tools/build-upstream-composefs.sh`` makes).
"""

from __future__ import annotations

import os
import shutil

TOOLS = ("mkcomposefs", "composefs-info", "mount.composefs")


def find_tool(name: str) -> str | None:
    """Absolute path of an upstream tool, or None if it is not installed."""
    extra = os.environ.get("APT_LAYER_COMPOSEFS_BIN")
    if extra:
        for d in extra.split(os.pathsep):
            for sub in ("", "../sbin"):
                cand = os.path.normpath(os.path.join(d, sub, name))
                if os.access(cand, os.X_OK):
                    return cand
    return shutil.which(name, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")
