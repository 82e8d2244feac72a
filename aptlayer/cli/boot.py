"""``apt-layer boot ...``: the running deployment's side of booting (docs/boot.md)."""

from __future__ import annotations

from pathlib import Path

import click

from .output import json_option, print_json


@click.group()
def boot() -> None:
    """Booting deployments: boot loader entries, and marking a boot complete.

    \b
    Example:
      apt-layer boot entries --update-grub
      apt-layer boot complete
    """


@boot.command("entries")
@click.option("--boot-dir", type=click.Path(file_okay=False, path_type=Path),
              help="Where the entries go [default: a mounted ESP at /efi or /boot/efi with systemd-boot's "
                   "loader/ folder, else /boot].")
@click.option("--update-grub", "grub", is_flag=True, help="Then run update-grub (/etc/grub.d/15_apt-layer).")
@json_option
@click.pass_context
def entries(ctx, boot_dir, grub, as_json) -> None:
    """Write a boot loader entry for each kept deployment.

    Copies each deployed image's newest kernel and initramfs to
    BOOT/apt-layer/DIGEST/, writes BOOT/loader/entries/apt-layer-SLOT.conf
    (Boot Loader Specification, read by systemd-boot and by GRUB through
    /etc/grub.d/15_apt-layer) and removes what no deployment needs. BOOT is
    systemd-boot's EFI system partition when one is mounted at /efi or
    /boot/efi with a loader/ folder, else /boot. On a booted deployment
    update-grub runs in the physical root (/sysroot).
    apt-layer-boot-entries.path runs it when a deployment changes.

    \b
    Example:
      apt-layer boot entries --update-grub
    """
    from ..boot import entries as run

    result = run.sync(ctx.obj.store(), boot_dir or run.boot_dir())
    if grub:
        result["update_grub_error"] = run.update_grub()
    if as_json:
        print_json(result)
    elif not ctx.obj.quiet:
        click.echo(f"entries written: {', '.join(result['written']) or 'none'}; kernels removed: "
                   f"{len(result['removed'])}")
    for image in result["without_kernel"]:
        click.echo(f"apt-layer: image {image} has no kernel in /boot: no entry for it", err=True)
    if result.get("update_grub_error"):
        click.echo(f"apt-layer: update-grub: {result['update_grub_error']}", err=True)
        ctx.exit(1)


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


@click.group("etc")
def etc() -> None:
    """The booted system's /etc: the image's, with the administrator's changes on top.

    \b
    Example:
      apt-layer etc diff
    """


@etc.command("diff")
@click.option("--image", metavar="NAME", help="Compare with image NAME (default: the booted one, else current).")
@json_option
@click.pass_context
def etc_diff(ctx, image, as_json) -> None:
    """List the local changes to /etc against the image's /etc.

    Each is kept in the store's etc/upper for every deployment and hides
    the image's version of the path: A added, M modified, D deleted,
    P pinned (the same as the image's, but a new image's version stays
    hidden). See docs/boot.md for the rule.

    \b
    Example:
      apt-layer etc diff
      apt-layer etc diff --image base --json
    """
    from ..boot.etc import diff

    result = diff(ctx.obj.store(), image)
    if as_json:
        print_json(result)
        return
    for change in result["changes"]:
        click.echo(f"{change['change'][0].upper()} {change['path']}")


@click.command()
@json_option
@click.pass_context
def check(ctx, as_json) -> None:
    """Report what the running kernel supports for composefs images.

    erofs, overlayfs and its data-only lower layers (Linux 6.5) are needed
    to mount an image; the rest is used when present. Exit 9 if this
    kernel cannot mount images.

    \b
    Example:
      apt-layer check
      apt-layer check --json
    """
    from ..boot.kernel import check as run

    report = run()
    if as_json:
        print_json(report)
    else:
        click.echo(f"Kernel: {report['kernel']}")
        for f in report["features"]:
            click.echo(f"  {'yes' if f['supported'] else 'no ':3}  {f['feature']} ({f['detail']})")
        click.echo("Images can be mounted." if report["mountable"] else f"Images cannot be mounted: {report['problem']}")
    if not report["mountable"]:
        ctx.exit(9)
