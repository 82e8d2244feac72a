"""What ``image create`` is asked: mkcomposefs's options, split by what they change.

Scan options change which tree is read (:class:`ScanOptions`, the lstat
walk's own); image options change how a tree is laid out
(:class:`ImageOptions`). Each gives the bytes that key the caches, so a
cached result is only ever reused under the options it was made with.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from ..composefs.lstatwalk import ScanOptions


@dataclass(frozen=True)
class ImageOptions:
    """The composefs format versions an image may use."""

    min_version: int = 0
    max_version: int = 1

    def key(self) -> bytes:
        return f"v{self.min_version}-{self.max_version}".encode()


def scan_key(scan: ScanOptions) -> bytes:
    """The bytes a scan's options add to a cache key (the walk's fingerprint uses the same)."""
    return repr(scan).encode()


@dataclass(frozen=True)
class CreateOptions:
    """How ``image create`` reads its source and builds its image (mkcomposefs's options)."""

    from_file: bool = False
    use_epoch: bool = False
    skip_devices: bool = False
    skip_xattrs: bool = False
    user_xattrs: bool = False
    min_version: int = 0
    max_version: int = 1
    threads: int = os.cpu_count() or 1
    backend: str = "auto"

    @property
    def scan(self) -> ScanOptions:
        return ScanOptions(self.use_epoch, self.skip_xattrs, self.user_xattrs, self.skip_devices)

    @property
    def image(self) -> ImageOptions:
        return ImageOptions(self.min_version, self.max_version)
