"""Where everything of a store lives: every path and naming rule, in one place.

::

    journal.db                  the event journal (SQLite, WAL, synchronous=FULL)
    images/NAME.composefs       one file per live image
    images/objects/xx/yyyy...   the digest store shared by all images
    staging/BOOTID-TX/          work of transaction TX in flight
    deploy/current, previous    symlinks into images/, swapped by rename
    deploy/.SLOT.tmp-PID        a link on its way to replacing deploy/SLOT
    trash/                      objects on their way out (gc)
    cache/                      what makes rebuilds fast (safe to delete)
    verified                    recovery's checkpoint of the hash chain
    boot/good, boot/attempts    boot counting: the last image that completed a boot, and
                                "NAME COUNT" of the boots the current one started (initramfs)
    etc/upper, etc/work         the administrator's /etc changes on a booted deployment
    lock                        flock: writers shared, gc and recovery exclusive
    publish.lock                flock: one writer at a time commits and does its effects

The Store, recovery, watch and gc ask a :class:`Layout` for paths and names
instead of spelling them out, so a rule changes in one place.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from . import errors
from .linux import fsops
from .linux.beneath import open_dir_beneath

IMAGE_SUFFIX = ".composefs"
#: the deployment slots, in the order their links are written
SLOTS = ("current", "previous")
_LINK_TEMP = ".{slot}.tmp-"


def new_id() -> str:
    """16 random hex digits: transaction ids and staged file names (``uuid`` costs ms at boot)."""
    return os.urandom(8).hex()


def image_name(filename: str) -> str | None:
    """The image a file in ``images/`` stands for, or None (temporary files start with '.')."""
    if filename.endswith(IMAGE_SUFFIX) and not filename.startswith(".") and len(filename) > len(IMAGE_SUFFIX):
        return filename[: -len(IMAGE_SUFFIX)]
    return None


def link_text(image: str) -> str:
    """What ``deploy/SLOT`` points to when it deploys ``image`` (relative, so the store can move)."""
    return f"../images/{image}{IMAGE_SUFFIX}"


def is_link_temp(filename: str) -> bool:
    """Whether a file in ``deploy/`` is a link on its way to replacing a slot."""
    return any(filename.startswith(_LINK_TEMP.format(slot=slot)) for slot in SLOTS)


class Layout:
    """The paths of the store at ``root``."""

    def __init__(self, root: Path):
        self.root = root
        self.journal = root / "journal.db"
        self.images = root / "images"
        self.objects = self.images / "objects"
        self.staging = root / "staging"
        self.deploy = root / "deploy"
        self.trash = root / "trash"
        self.cache = root / "cache"
        self.verified = root / "verified"
        self.lock = root / "lock"
        self.publish_lock = root / "publish.lock"
        self.boot = root / "boot"
        self.etc_upper = root / "etc" / "upper"

    @property
    def directories(self) -> tuple[Path, ...]:
        """The directories apt-layer writes in, parents first (the cache is made when needed)."""
        return (self.images, self.objects, self.staging, self.deploy, self.trash, self.boot)

    @property
    def guarded(self) -> tuple[tuple[Path, ...], tuple[Path, ...]]:
        """(directories, files) whose owner and mode :mod:`aptlayer.permissions` checks."""
        return (*self.directories, self.cache), (self.journal,)

    def exists(self) -> bool:
        return self.journal.is_file()

    def prepare(self) -> None:
        """Make the store's directories (root included) where missing, refusing symlinked ones.

        apt-layer never follows a symlink inside its store: a directory that
        is one would send its writes, and gc's and recovery's removals, to
        wherever it points.
        """
        if not self.root.is_dir():
            self.root.mkdir(mode=0o755, parents=True, exist_ok=True)
            fsops.fsync_dir(str(self.root.parent))
        for d in self.directories:
            if d.is_symlink():
                raise errors.StoreCorrupt(
                    f"{d} is a symlink (to {os.readlink(d)}): apt-layer never follows a symlink "
                    "inside its store; replace it with a directory")
            if not d.is_dir():
                d.mkdir(mode=0o755, exist_ok=True)
                fsops.fsync_dir(str(d.parent))

    @contextmanager
    def opened(self, path: Path) -> Iterator[int]:
        """An fd of the store directory ``path``, reached from the root without following a symlink.

        The root itself may be reached through symlinks (its parents are
        checked by :mod:`aptlayer.permissions`); below it, a component that
        is a symlink, or ``..``, fails the open (ELOOP, EXDEV), checked and
        opened in one step (:func:`linux.beneath.open_beneath`).
        """
        fd = self.open_fd(path)
        try:
            yield fd
        finally:
            os.close(fd)

    def open_fd(self, path: Path) -> int:
        """:meth:`opened` for a caller that closes the fd itself."""
        root_fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            rel = path.relative_to(self.root)
            return os.dup(root_fd) if str(rel) == "." else open_dir_beneath(root_fd, str(rel))
        finally:
            os.close(root_fd)

    # --- images --------------------------------------------------------------

    def image(self, name: str) -> Path:
        return self.images / (name + IMAGE_SUFFIX)

    # --- staging ---------------------------------------------------------------

    def staging_dir(self, boot_id: str, tx: str) -> Path:
        return self.staging / f"{boot_id}-{tx}"

    @staticmethod
    def belongs_to(staging_name: str, tx: str) -> bool:
        """Whether a folder of ``staging/`` holds work of transaction ``tx`` (of any boot)."""
        return staging_name.endswith(f"-{tx}")

    @staticmethod
    def new_staged_image(staging_dir: Path) -> Path:
        """A fresh file name for an image being built (not NAME: a writer's temp file
        beside a 245-byte NAME.composefs would exceed NAME_MAX)."""
        return staging_dir / (new_id() + IMAGE_SUFFIX)

    def relative(self, path: Path) -> str:
        """``path`` relative to the root, as events record staged files."""
        return str(path.relative_to(self.root))

    # --- deployment links ---------------------------------------------------------

    def link(self, slot: str) -> Path:
        return self.deploy / slot

    def link_temp(self, slot: str) -> Path:
        return self.deploy / f"{_LINK_TEMP.format(slot=slot)}{os.getpid()}"

    # --- caches -----------------------------------------------------------------------

    def cache_file(self, name: str) -> Path:
        """``cache/NAME`` (``trees``, ``last``, ``digests``): losing it only costs time."""
        return self.cache / name
