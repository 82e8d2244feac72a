"""``apt-layer base bootstrap``: a base image from Debian's archive."""

from __future__ import annotations

import click

from .output import json_option, make_progress, plural, print_json


def _words(value: str | None) -> tuple[str, ...]:
    return tuple(w for w in (value or "").replace(",", " ").split() if w)


@click.group()
def base() -> None:
    """Make base images for package layering.

    A base image can also be imported (`image import`) or built from any
    directory (`image create`).

    \b
    Example:
      apt-layer base bootstrap bookworm bookworm-base
    """


@base.command("bootstrap")
@click.argument("suite")
@click.argument("name")
@click.option("--variant", type=click.Choice(["minbase", "apt", "important", "standard"]), default="minbase",
              show_default=True, help="mmdebstrap's package selection.")
@click.option("--include", metavar="PKG,...", help="More packages to install.")
@click.option("--components", metavar="COMP,...", help="Archive components (default: main).")
@click.option("--mirror", metavar="URI",
              help="Debian archive to use (default: the one this host's apt sources name).")
@click.option("--arch", metavar="ARCH", help="Architecture (default: the host's).")
@json_option
@click.pass_context
def bootstrap(ctx, suite, name, variant, include, components, mirror, arch, as_json) -> None:
    """Bootstrap Debian SUITE with mmdebstrap into the base image NAME.

    The archive is the one the host's own apt configuration names, unless
    --mirror is given; apt checks its signatures with the host's keyrings.
    The image records how it was made (suite, variant, mirror).

    \b
    Example:
      apt-layer base bootstrap bookworm bookworm-base
      apt-layer base bootstrap trixie trixie-base --variant apt --include systemd,linux-image-amd64
    """
    from .. import bases

    with make_progress(ctx, f"bootstrapping {name}", as_json) as progress:
        result = bases.bootstrap(ctx.obj.store(create=True), suite, name, variant=variant, include=_words(include),
                                 components=_words(components), mirror=mirror, arch=arch,
                                 progress=progress)
    if as_json:
        print_json(result)
    else:
        click.echo(f"{result['name']}  {result['digest']}  {plural(result['objects'], 'object')} "
                   f"(bootstrapped {suite})")
