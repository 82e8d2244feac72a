"""The ``apt-layer`` command line: parse, call the Store, print.

:func:`main` is the entry point.  The drop-in tools (``apt-layer composefs
mkcomposefs|info|mount``) take upstream's arguments, not click's, so it
runs them before click is even imported (click is about 17 ms of a 60 ms
``composefs info ls``); everything else goes to the click application in
:mod:`.app`, whose group is ``aptlayer.cli.cli``.

Run under an upstream tool's name (the Debian package's
``apt-layer-composefs-tools`` links ``/usr/bin/mkcomposefs``,
``/usr/bin/composefs-info`` and ``/usr/sbin/mount.composefs`` to apt-layer),
it is that tool.
"""

from __future__ import annotations

import os
import sys

#: program name -> the drop-in tool it runs (see :mod:`.dropins`)
PROGRAMS = {"mkcomposefs": "mkcomposefs", "composefs-info": "info", "mount.composefs": "mount"}


def main(argv: list[str] | None = None) -> int:
    """Entry point: the exit code of the command line ``argv`` (default: this process's)."""
    args = sys.argv[1:] if argv is None else argv
    program = os.path.basename(sys.argv[0]) if sys.argv else ""
    if program in PROGRAMS:
        from . import dropins

        return dropins.run(PROGRAMS[program], args)
    if len(args) >= 2 and args[0] == "composefs":
        from . import dropins

        if args[1] in dropins.TOOLS:
            return dropins.run(args[1], args[2:])
    from .app import main as run

    return run(args)


def __getattr__(name: str):
    """``cli``, the click group (for documentation and completion), loaded when asked for."""
    if name == "cli":
        from .app import cli

        return cli
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
