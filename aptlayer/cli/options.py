"""The options every command takes, wherever they stand on the line.

``--root``, ``--config`` and ``--quiet`` belong to the ``apt-layer`` group,
but users type them after the command too (``apt-layer image list --root
S``, ``apt-layer log -q``). :func:`adopt` gives them to every command as
the group resolves it (so a command added later has them without doing
anything), where they show in its ``--help`` and update the same settings
as the group's own. The drop-in tools (``composefs mkcomposefs`` ...) take
upstream's arguments only and are left alone.

``--json`` is each command's own option (``output.json_option``); the
error object printed under it is :func:`error_json`'s.
"""

from __future__ import annotations

import json
from pathlib import Path

import click

ROOT_HELP = "Store root (default /var/lib/apt-layer; env APT_LAYER_ROOT)."
CONFIG_HELP = "Configuration file (default /etc/apt-layer/config.toml)."
QUIET_HELP = "No progress output."

#: set on a command once it has the global options
_ADOPTED = "_apt_layer_global_options"


def check_root(value: str | None) -> str | None:
    if value is not None and not str(value):
        raise click.BadParameter("must not be empty", param_hint="'--root'")
    return value


def _setter(attribute: str, convert=lambda v: v):
    """A callback storing an option given after a command into the group's Settings."""

    def store(ctx: click.Context, param: click.Parameter, value):
        if param.name == "global_root":
            check_root(value)
        if value in (None, False):
            return value
        ctx.meta[f"apt_layer.{attribute}"] = convert(value)  # for shell completion, which runs no group callback
        settings = ctx.find_root().obj
        if settings is not None:
            setattr(settings, attribute, convert(value))
        return value

    return store


def global_options() -> list[click.Option]:
    """Fresh ``--root``, ``--config`` and ``--quiet`` options for one command."""
    return [
        click.Option(["--root", "global_root"], metavar="DIR", expose_value=False, help=ROOT_HELP,
                     callback=_setter("root_option", Path)),
        click.Option(["--config", "global_config"], metavar="FILE", expose_value=False, help=CONFIG_HELP,
                     callback=_setter("config_path", Path)),
        click.Option(["-q", "--quiet", "global_quiet"], is_flag=True, expose_value=False, help=QUIET_HELP,
                     callback=_setter("quiet")),
    ]


def takes_raw_arguments(command: click.Command) -> bool:
    """A drop-in tool: it parses upstream's arguments itself."""
    return bool(command.context_settings.get("ignore_unknown_options"))


def adopt(command: click.Command) -> click.Command:
    """Give ``command`` (and a group's subcommands) the global options, once."""
    if getattr(command, _ADOPTED, False) or takes_raw_arguments(command):
        return command
    command.params.extend(global_options())
    setattr(command, _ADOPTED, True)
    if isinstance(command, click.Group):
        for sub in command.commands.values():
            adopt(sub)
    return command


def json_requested(args: list[str]) -> bool:
    """Whether the command line asks for JSON (``--json``, or audit's ``--format json``), before any ``--``."""
    words = args[:args.index("--")] if "--" in args else args
    if "--json" in words or "--format=json" in words:
        return True
    return any(a == "--format" and b == "json" for a, b in zip(words, words[1:]))


def error_json(message: str, code: int) -> str:
    """The JSON object an error prints on stdout under ``--json``."""
    return json.dumps({"error": message, "exit": code}, sort_keys=True)
