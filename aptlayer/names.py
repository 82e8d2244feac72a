"""Validation of the names users give images, and the boot id."""

from __future__ import annotations

import re

from .errors import InvalidInput
from .linux import boot

MAX_NAME = 255 - len(".composefs")

#: what a new image may be called: a file name (``images/NAME.composefs``), a word for a shell and a
#: token systemd units and kernel command lines carry without escaping
NEW_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]*")
RULE = "letters, digits and . _ + -, starting with a letter or digit, not ending in .composefs"


def check_new_image_name(name: str) -> str:
    """A name for a new image: ``[A-Za-z0-9][A-Za-z0-9._+-]*``, 1..245 bytes, without the
    ``.composefs`` suffix the file adds (``x.composefs`` would be ``x.composefs.composefs``).
    """
    check_image_name(name)
    if not NEW_NAME.fullmatch(name) or name.endswith(".composefs"):
        raise InvalidInput(f"invalid image name {name!r}: image names are {RULE}")
    return name


def check_image_name(name: str) -> str:
    """A name that may belong to an existing image (made before the rule of
    :func:`check_new_image_name`): 1..245 bytes of UTF-8, no ``/`` or NUL, not
    starting with ``.`` (reserved for temporary files) or ``-`` (looks like an
    option), no control characters. Such images still list, deploy and delete.
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
