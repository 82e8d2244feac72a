"""Validation of the names users give images, and the boot id."""

from __future__ import annotations

from .errors import InvalidInput
from .linux import boot

MAX_NAME = 255 - len(".composefs")


def check_image_name(name: str) -> str:
    """An image name becomes a file name ``images/NAME.composefs``.

    Allowed: 1..245 bytes of UTF-8, no ``/`` or NUL, not ``.``/``..``, not
    starting with ``.`` (reserved for temporary files) or ``-`` (looks like an
    option).
    """
    if not name:
        raise InvalidInput("invalid image name: empty")
    raw = name.encode("utf-8", "surrogateescape")
    if len(raw) > MAX_NAME:
        raise InvalidInput(f"invalid image name: longer than {MAX_NAME} bytes")
    if "/" in name or "\0" in name:
        raise InvalidInput(f"invalid image name {name!r}: contains '/' or NUL")
    if name.startswith((".", "-")):
        raise InvalidInput(f"invalid image name {name!r}: must not start with '.' or '-'")
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in name):
        raise InvalidInput(f"invalid image name {name!r}: contains control characters")
    return name


def boot_id() -> str:
    """This boot's id (changes at each boot), without dashes, as journal actors and staging names carry it."""
    return boot.boot_id() or "noboot"
