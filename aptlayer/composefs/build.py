"""mkcomposefs as a function: a directory or a dump in, image bytes out.

Shared by ``apt-layer composefs mkcomposefs`` and the Store, so both build
images the same way. Failures of any stage (reading the source, parsing a
dump, writing the image) come out as one :class:`BuildError` whose message
names the file, the line or the path and the reason.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from dataclasses import dataclass

from . import fsverity
from .digestcache import DigestCache
from .dumpfile import DumpError, parse_dump
from .objectstore import ObjectStore, ObjectStoreError
from .lstatwalk import ScanStats, TreeWalk
from .scan import ScanError, scan, scan_entries
from .tree import Node
from .writer import ImageError, build_image


class BuildError(Exception):
    """The image could not be built; the message says where and why."""


@dataclass
class Built:
    image: bytes
    #: fs-verity digest of ``image``: the image's identity
    digest: bytes
    root: Node
    stats: ScanStats | None


def _read_dump(src: str) -> bytes:
    if src == "-":
        return sys.stdin.buffer.read()
    try:
        with open(src, "rb") as f:
            return f.read()
    except OSError as e:
        raise BuildError(f"open `{src}`: {e.strerror}") from None


def load_tree(
    src: str,
    *,
    from_file: bool = False,
    store: ObjectStore | None = None,
    use_epoch: bool = False,
    skip_devices: bool = False,
    skip_xattrs: bool = False,
    user_xattrs: bool = False,
    threads: int = 1,
    strict: bool = False,
    progress: Callable[[ScanStats], None] | None = None,
    cache: DigestCache | None = None,
    walked: TreeWalk | None = None,
) -> tuple[Node, ScanStats | None]:
    """The tree of a directory (importing external files into ``store``) or of a dump.

    Also returns the scan's stats (None for a dump).  ``cache`` (directories
    only) spares re-reading unchanged entries; see :mod:`.scan`.  The caller
    saves it.  ``walked`` is a :func:`.lstatwalk.walk` of ``src`` just made.
    """
    if from_file:
        try:
            return parse_dump(_read_dump(src), strict=strict), None
        except DumpError as e:
            raise BuildError(f"{'<stdin>' if src == '-' else src}: {e}") from None
    if skip_xattrs and user_xattrs:
        raise BuildError(f"error accessing {src}: --skip-xattrs and --user-xattrs conflict")
    if not os.path.lexists(src):
        raise BuildError(f"error accessing {src}: No such file or directory")
    if not os.path.isdir(src) or os.path.islink(src):
        raise BuildError(f"error accessing {src}: Not a directory")
    try:
        result = scan(src, store=store, use_epoch=use_epoch, skip_devices=skip_devices,
                      skip_xattrs=skip_xattrs, user_xattrs=user_xattrs, threads=threads,
                      progress=progress, cache=cache, walked=walked)
    except ScanError as e:
        raise BuildError(f"{os.path.join(src, os.fsdecode(e.path).lstrip('/'))}: {e.reason}") from None
    except ObjectStoreError as e:
        raise BuildError(f"digest store: {e}") from None
    return result


def read_entries(src: str, walked: TreeWalk, paths: list[bytes], **options) -> tuple[dict[bytes, Node], ScanStats]:
    """Some entries of a walked directory (see :func:`.scan.scan_entries`), failures as BuildError."""
    try:
        return scan_entries(src, walked, paths, **options)
    except ScanError as e:
        raise BuildError(f"{os.path.join(src, os.fsdecode(e.path).lstrip('/'))}: {e.reason}") from None
    except ObjectStoreError as e:
        raise BuildError(f"digest store: {e}") from None


def render(root: Node, *, min_version: int = 0, max_version: int = 1) -> tuple[bytes, bytes]:
    """Image bytes and their fs-verity digest."""
    try:
        image = build_image(root, min_version=min_version, max_version=max_version)
    except ImageError as e:
        raise BuildError(f"cannot write file: {e}") from None
    return image, fsverity.digest_bytes(image)


def make_image(
    src: str,
    *,
    from_file: bool = False,
    digest_store: str | None = None,
    min_version: int = 0,
    max_version: int = 1,
    **options,
) -> Built:
    """Everything ``mkcomposefs`` does short of writing the output file.

    As upstream, ``digest_store`` is ignored for a dump source.
    """
    store = ObjectStore(digest_store, batch=True) if digest_store and not from_file else None
    root, stats = load_tree(src, from_file=from_file, store=store, **options)
    if store is not None:
        store.sync()
    image, digest = render(root, min_version=min_version, max_version=max_version)
    return Built(image, digest, root, stats)
