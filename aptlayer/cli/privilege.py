"""Which commands only read the store: any user who can read the journal may run them.

Every other command that opens the store may change it, and runs as root
only: for anyone else it fails with exit 7 before the store is opened (so
before anything is created, locked or written).
"""

from __future__ import annotations

import os

import click

from ..errors import PermissionDenied

#: command paths (without the program name) that never change the store
READ_ONLY = frozenset({
    "status", "log", "audit", "fsck", "journal verify", "packages", "diff",
    "image list", "image info", "image ls", "image dump", "image objects", "image missing-objects",
    "image export", "tx list", "tx show", "etc diff",
})


def command_of(ctx: click.Context) -> str:
    """``image list`` for ``apt-layer --root X image list``."""
    return " ".join(c.info_name for c in reversed(list(_chain(ctx))) if c.parent is not None)


def _chain(ctx: click.Context):
    while ctx is not None:
        yield ctx
        ctx = ctx.parent


def writes(ctx: click.Context) -> bool:
    """Whether the command being run may change the store."""
    return command_of(ctx) not in READ_ONLY


def require_root(ctx: click.Context) -> None:
    """Exit 7 for a user other than root running a command that changes the store."""
    if os.geteuid() != 0:
        raise PermissionDenied(f"`apt-layer {command_of(ctx)}` changes the store: run it as root "
                               f"(uid {os.geteuid()} may run only the read-only commands)")
