"""Package layering: ``install``, ``uninstall``, ``override``, ``upgrade``, ``rebase``, ``packages``, ``diff``."""

from __future__ import annotations

import click

from .images import complete_image_names
from .output import json_option, make_progress, print_json, table

from_option = click.option("--from", "from_image", metavar="IMAGE",
                           help="Start from IMAGE instead of the current deployment.")
no_deploy_option = click.option("--no-deploy", is_flag=True, help="Only build the image; do not deploy it.")
name_option = click.option("--name", metavar="NAME", help="Name of the new image (default BASE+N).")


def layering_options(command):
    """``--from``, ``--no-deploy``, ``--name`` and ``--json``: what every command that builds an image takes."""
    command = click.pass_context(command)
    for option in (json_option, name_option, no_deploy_option, from_option):
        command = option(command)
    return command


def _report(result: dict, as_json: bool) -> None:
    if as_json:
        print_json(result)
        return
    for change in result.get("changes", []):
        what = change["change"].capitalize()
        since = f" (from {change['from']})" if "from" in change else ""
        click.echo(f"{what}: {change['package']} {change['version']} {change['arch']}{since}")
    for spec in result.get("inactive", []):
        click.echo(f"Inactive request: {spec} (the base image has it)")
    if result.get("image") is None:
        return
    where = "deployed: the next boot uses it" if result.get("deployed") else "not deployed"
    click.echo(f"Image {result['image']!r} ({result['digest'][:16]}) on base {result['base']!r}: {where}")


def _run(ctx, operation, *args, from_image, no_deploy, name, as_json, **kwargs) -> dict:
    """Run a layering ``operation`` on the store, with progress on a terminal."""
    with make_progress(ctx, "building", as_json) as progress:
        return operation(ctx.obj.store(), *args, from_image=from_image, deploy=not no_deploy, name=name,
                         progress=progress, **kwargs)


@click.command()
@click.argument("packages", nargs=-1, required=True)
@layering_options
def install(ctx, packages, **options) -> None:
    """Layer PACKAGES onto the deployed image: a new image, deployed for the next boot.

    PACKAGES are package names, NAME=VERSION, or local .deb files. apt
    resolves and downloads them with the host's apt sources; dpkg installs
    them in a sandbox on a writable mount of the base image, never on the
    running system. The new image is the base plus the request (every
    package layered so far), recorded in the journal; the deployment
    switches atomically at the next boot, and `rollback` returns to the
    previous one. A package the base already has is kept as an inactive
    request.

    \b
    Example:
      apt-layer install htop
      apt-layer install ./mytool_1.0_amd64.deb --no-deploy
      apt-layer install --from base htop strace --json
    """
    from .. import layering

    _report(_run(ctx, layering.install, list(packages), **options), options["as_json"])


@click.command()
@click.argument("packages", nargs=-1, required=True)
@layering_options
def uninstall(ctx, packages, **options) -> None:
    """Remove layered PACKAGES: rebuild from the base with the rest of the request.

    Uninstalling every layered package deploys the base image itself (the
    same digest). A package of the base image is refused: see `override
    remove`.

    \b
    Example:
      apt-layer uninstall htop
    """
    from .. import layering

    _report(_run(ctx, layering.uninstall, list(packages), **options), options["as_json"])


@click.group()
def override() -> None:
    """Remove packages of the base image in the layered image, or undo that.

    \b
    Example:
      apt-layer override remove nano
      apt-layer override reset nano
    """


@override.command("remove")
@click.argument("packages", nargs=-1, required=True)
@layering_options
def override_remove(ctx, packages, **options) -> None:
    """Remove base PACKAGES from the layered image (dpkg's dependency checks apply).

    \b
    Example:
      apt-layer override remove nano
    """
    from .. import layering

    _report(_run(ctx, layering.override_remove, list(packages), **options), options["as_json"])


@override.command("reset")
@click.argument("packages", nargs=-1)
@layering_options
def override_reset(ctx, packages, **options) -> None:
    """Bring back removed base PACKAGES (all of them without arguments).

    \b
    Example:
      apt-layer override reset
    """
    from .. import layering

    _report(_run(ctx, layering.override_reset, list(packages) or None, **options), options["as_json"])


@click.command()
@click.option("--check", is_flag=True, help="Only say what would change: exit 0 if something would, 77 if not.")
@layering_options
def upgrade(ctx, check, **options) -> None:
    """Upgrade the layered packages: re-resolve the request on the same base.

    A new image is built and deployed only if some package's version
    changed, even when the base is unchanged.

    \b
    Example:
      apt-layer upgrade --check && apt-layer upgrade
    """
    from .. import layering

    result = _run(ctx, layering.upgrade, check=check, **options)
    if options["as_json"]:
        print_json(result)
    elif not result.get("changed"):
        click.echo("No upgrades: every layered package is at its newest version")
    else:
        _report({**result, "image": None if check else result.get("image")}, False)
    if check and not result.get("changed"):
        ctx.exit(77)


@click.command()
@click.argument("new_base", shell_complete=complete_image_names)
@layering_options
def rebase(ctx, new_base, **options) -> None:
    """Apply the deployed image's request to another base image NEW_BASE.

    \b
    Example:
      apt-layer rebase trixie-base
    """
    from .. import layering

    _report(_run(ctx, layering.rebase, new_base, **options), options["as_json"])


@click.command()
@click.argument("image", required=False)
@json_option
@click.pass_context
def packages(ctx, image, as_json) -> None:
    """List IMAGE's packages (default: the current deployment), marked base, layered, replaced or removed.

    Read from the image's own dpkg database: no mount, no root needed for
    an image file readable by the caller.

    \b
    Example:
      apt-layer packages
      apt-layer packages base --json
    """
    from .. import layering

    result = layering.packages(ctx.obj.store(), image)
    if as_json:
        print_json(result)
        return
    rows = [(p["mark"], p["name"], p["version"], p["architecture"]) for p in result["packages"]]
    rows += [("inactive", spec, None, None) for spec in result["inactive"]]
    click.echo(table(rows, ("mark", "package", "version", "arch")))


@click.command()
@click.argument("image_a")
@click.argument("image_b")
@click.option("--files", is_flag=True, help="Also list the paths each changed package gained or lost.")
@json_option
@click.pass_context
def diff(ctx, image_a, image_b, files, as_json) -> None:
    """Packages added, removed, upgraded and downgraded from IMAGE_A to IMAGE_B.

    \b
    Example:
      apt-layer diff base base+1
      apt-layer diff base+1 base+2 --files
    """
    from .. import layering

    result = layering.diff(ctx.obj.store(), image_a, image_b, files=files)
    if as_json:
        print_json(result)
        return
    for kind in ("added", "removed", "upgraded", "downgraded", "crossgraded"):
        for change in result.get(kind, []):
            click.echo(f"{kind.capitalize()}: {_describe(change)}")
    for entry in result.get("files", []):
        for path in entry.get("added", []):
            click.echo(f"  + {path}")
        for path in entry.get("removed", []):
            click.echo(f"  - {path}")


def _describe(change: dict) -> str:
    if "new_version" in change:
        arch = change["new_architecture"]
        if change["old_architecture"] != arch:
            arch = f"{change['old_architecture']} -> {arch}"
        return f"{change['name']} {change['old_version']} -> {change['new_version']} {arch}"
    return " ".join(str(change.get(k, "")) for k in ("name", "version", "architecture")).strip()
