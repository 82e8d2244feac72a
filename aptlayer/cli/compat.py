"""The ``apt-layer composefs`` group: the drop-in tools of :mod:`.dropins` under click.

``apt-layer composefs TOOL ...`` never gets here (:func:`aptlayer.cli.main`
runs the tool at once); this group serves ``apt-layer composefs --help``
and a drop-in called after global options (``apt-layer -q composefs ...``).
"""

from __future__ import annotations

import sys

import click

from .dropins import run

_RAW = {"ignore_unknown_options": True, "allow_extra_args": True, "help_option_names": []}


@click.group()
def composefs() -> None:
    """Drop-in replacements for the upstream composefs tools.

    Each subcommand takes exactly the arguments of the upstream tool of the
    same name and exits like it, so scripts can swap one for the other.
    The images are byte-identical to composefs 1.0.8's.

    \b
    Example:
      apt-layer composefs mkcomposefs --digest-store=objs rootfs/ rootfs.cfs
      apt-layer composefs info ls rootfs.cfs
      apt-layer composefs mount -o basedir=objs rootfs.cfs /mnt
    """


@composefs.command("mkcomposefs", context_settings=_RAW, add_help_option=False)
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def mkcomposefs_cmd(args: tuple[str, ...]) -> None:
    """Build an image: mkcomposefs [OPTIONS] SOURCE IMAGE (see mkcomposefs(1)).

    \b
    Example:
      apt-layer composefs mkcomposefs --digest-store=objs rootfs/ rootfs.cfs
    """
    sys.exit(run("mkcomposefs", list(args)))


@composefs.command("info", context_settings=_RAW, add_help_option=False)
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def info_cmd(args: tuple[str, ...]) -> None:
    """Inspect images: info [--basedir=D] [--filter=N] ls|objects|dump|missing-objects|measure-file IMAGE...

    \b
    Example:
      apt-layer composefs info objects rootfs.cfs
    """
    sys.exit(run("info", list(args)))


@composefs.command("mount", context_settings=_RAW, add_help_option=False)
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def mount_cmd(args: tuple[str, ...]) -> None:
    """Mount an image: mount [-o basedir=D,...] IMAGE MOUNTPOINT (see mount.composefs(1)).

    \b
    Example:
      apt-layer composefs mount -o basedir=objs rootfs.cfs /mnt
    """
    sys.exit(run("mount", list(args)))
