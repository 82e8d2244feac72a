"""``apt-layer boot ...``: the running deployment's side of booting (docs/boot.md)."""

from __future__ import annotations

import click

from .output import json_option, print_json


@click.group()
def boot() -> None:
    """Booting deployments: mark a boot complete (boot counting).

    \b
    Example:
      apt-layer boot complete
    """


@boot.command("complete")
@json_option
@click.pass_context
def complete(ctx, as_json) -> None:
    """Record that the booted deployment completed its boot.

    Names it in ROOT/boot/good and clears ROOT/boot/attempts, so the
    initramfs stops counting its tries. apt-layer-boot-complete.service
    runs it once multi-user.target is reached.

    \b
    Example:
      apt-layer boot complete --json
    """
    from ..boot.counting import complete as mark

    result = mark(ctx.obj.store())
    if as_json:
        print_json(result)
    elif result["good"] is None:
        click.echo(result["reason"], err=True)
    elif not ctx.obj.quiet:
        click.echo(f"{result['good']} completed its boot")
