"""The command tree, walked: what the help checks, the CLI rules and the man pages all go over."""

from __future__ import annotations

from collections.abc import Iterator

import click


Node = tuple[tuple[str, ...], click.Command, click.Context]


def walk(command: click.Command, name: str = "apt-layer") -> Iterator[Node]:
    """Every command under *command*, itself first: (words after the program name, command, its context).

    Commands are looked up through their group, as at the command line, so
    what the group adds on lookup (the global options) is there.
    """
    def below(cmd: click.Command, path: tuple[str, ...], ctx: click.Context):
        yield path, cmd, ctx
        if isinstance(cmd, click.Group):
            for sub_name in cmd.list_commands(ctx):
                sub = cmd.get_command(ctx, sub_name)
                yield from below(sub, (*path, sub_name), click.Context(sub, parent=ctx, info_name=sub_name))

    yield from below(command, (), click.Context(command, info_name=name))
