#!/usr/bin/env python3
"""Write apt-layer's man pages from its click help: apt-layer(8) and one page
per subcommand (apt-layer-image-create(8), ...), plus the drop-in tools'
mkcomposefs(1), composefs-info(1) and mount.composefs(8) from their usage.

Usage: tools/manpages.py OUTDIR

Run at package build time (debian/rules), so the pages always say what
``--help`` says. The date is SOURCE_DATE_EPOCH's when set (reproducible).
"""

from __future__ import annotations

import os
import re
import sys
import time
from pathlib import Path

import click

from aptlayer import __version__
from aptlayer.cli import cli, dropins
from aptlayer.cli.tree import walk

SOURCE = f"apt-layer {__version__}"
MANUAL = "apt-layer manual"


def roff(text: str) -> str:
    """Text as roff: backslashes and minus signs escaped, no line starting a request."""
    text = text.replace("\\", "\\e").replace("-", "\\-")
    return "\n".join("\\&" + line if line.startswith((".", "'")) else line for line in text.split("\n"))


def header(name: str, section: str, summary: str) -> list[str]:
    when = time.gmtime(int(os.environ.get("SOURCE_DATE_EPOCH", time.time())))
    return [f'.TH "{name.upper()}" "{section}" "{time.strftime("%Y-%m-%d", when)}" "{SOURCE}" "{MANUAL}"',
            ".SH NAME", f"{roff(name)} \\- {roff(summary)}"]


def paragraphs(text: str) -> list[str]:
    """click help text: blank-line paragraphs; one starting with ``\\b`` keeps its lines."""
    out = []
    for para in re.split(r"\n\s*\n", click.unstyle(text).strip()):
        lines = [ln.strip() for ln in para.split("\n")]
        if lines[0] == "\b":
            out += [".PP", ".nf", *(roff(ln) for ln in lines[1:]), ".fi"]
        else:
            out += [".PP", roff(" ".join(lines))]
    return out


def command_page(path: tuple[str, ...], command: click.Command, ctx: click.Context) -> str:
    name = "-".join(("apt-layer", *path))
    lines = header(name, "8", command.get_short_help_str(limit=300).rstrip("."))
    usage = " ".join(command.collect_usage_pieces(ctx))
    lines += [".SH SYNOPSIS", f".B {roff(' '.join(('apt-layer', *path)))}", roff(usage)]
    lines += [".SH DESCRIPTION", *paragraphs(command.help or "")]
    options = [p.get_help_record(ctx) for p in command.get_params(ctx) if isinstance(p, click.Option)]
    if any(options):
        lines.append(".SH OPTIONS")
        for names, help_text in filter(None, options):
            lines += [".TP", f".B {roff(names)}", roff(help_text)]
    see_also = [] if not path else [f"apt-layer{'-' + '-'.join(path[:-1]) if path[:-1] else ''}(8)"]
    if isinstance(command, click.Group):
        lines.append(".SH COMMANDS")
        for sub_name in command.list_commands(ctx):
            sub = command.get_command(ctx, sub_name)
            lines += [".TP", f".B {roff(sub_name)}", roff(sub.get_short_help_str(limit=300))]
            see_also.append(f"{name}-{sub_name}(8)")
    if not path:
        lines += [".SH FILES", ".TP", ".B /etc/apt\\-layer/config.toml",
                  "Configuration (every key is listed there, commented out).", ".TP",
                  ".B /var/lib/apt\\-layer", "The store: journal, images and their objects."]
        see_also += ["mkcomposefs(1)", "composefs-info(1)", "mount.composefs(8)"]
    if see_also:
        lines += [".SH SEE ALSO", roff(", ".join(see_also))]
    return "\n".join(lines) + "\n"


def usage_options(usage: str) -> list[str]:
    """The ``  --opt  help`` lines of a drop-in's usage text as ``.TP`` items."""
    lines = []
    for m in re.finditer(r"^  (\S+(?: \S+)?)\s{2,}(.+)$", usage, re.M):
        lines += [".TP", f".B {roff(m.group(1))}", roff(m.group(2).replace("{ncpu}", "the number of CPUs"))]
    return lines


DROP_INS = {
    "mkcomposefs": ("1", "build a composefs image from a directory tree or a dump file",
                    "mkcomposefs [OPTIONS] SOURCE IMAGE", dropins.MKCOMPOSEFS_USAGE,
                    "Writes the composefs image of SOURCE (a directory, or with --from-file a "
                    "composefs dump file, - for standard input) to IMAGE (- for standard output). "
                    "With --digest-store, each regular file's content is copied into that directory "
                    "under its fs-verity digest, for mounting with basedir=."),
    "composefs-info": ("1", "list the contents and backing objects of composefs images",
                       "composefs-info [--basedir=DIR]... [--filter=NAME]... COMMAND IMAGE...",
                       "  --basedir=DIR   object store for missing-objects (may repeat)\n"
                       "  --filter=NAME   only the top-level entry NAME (may repeat)\n",
                       "COMMAND is ls (the files of each image), objects (the backing objects the "
                       "images need, once each), missing-objects (those not found under any "
                       "--basedir), dump (the image as a composefs dump file) or measure-file "
                       "(the fs-verity digest of each named file)."),
    "mount.composefs": ("8", "mount a composefs image",
                        "mount.composefs [-t composefs] [-sfnv] [-N NS] -o basedir=DIR[:DIR...][,OPTIONS] "
                        "IMAGE MOUNTPOINT", dropins.MOUNT_USAGE,
                        "Mounts IMAGE on MOUNTPOINT: the image as erofs, under an overlayfs whose "
                        "data-only lower layers are the object stores. mount(8) runs it for "
                        "mount -t composefs, passing -s (ignore unknown options), -f (check, do not "
                        "mount), -n, -v (say what was mounted) and -N (another mount namespace) "
                        "when asked; fstab options meant for mount(8) itself, such as nofail and "
                        "_netdev, are ignored."),
}


def drop_in_page(tool: str) -> str:
    section, summary, synopsis, usage, description = DROP_INS[tool]
    lines = header(tool, section, summary)
    lines += [".SH SYNOPSIS", roff(synopsis), ".SH DESCRIPTION", ".PP", roff(description), ".PP",
              roff(f"This is apt-layer's own implementation: it takes the arguments of composefs "
                   f"1.0.8's {tool} and exits like it, and writes and reads the same bytes. "
                   f"It is installed by the apt-layer-composefs-tools package, which stands in "
                   f"for Debian's composefs package where that is not available."),
              ".SH OPTIONS", *usage_options(usage),
              ".SH EXIT STATUS", "0 on success, 1 on any error (the message says which).",
              ".SH SEE ALSO", "apt\\-layer(8), apt\\-layer\\-composefs(8)"]
    return "\n".join(lines) + "\n"


def main(outdir: str) -> int:
    out = Path(outdir)
    out.mkdir(parents=True, exist_ok=True)
    for path, command, ctx in walk(cli):
        (out / ("-".join(("apt-layer", *path)) + ".8")).write_text(command_page(path, command, ctx))
    for tool, (section, *_rest) in DROP_INS.items():
        (out / f"{tool}.{section}").write_text(drop_in_page(tool))
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
