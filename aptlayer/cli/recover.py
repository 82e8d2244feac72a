"""``apt-layer recover``: finish or undo interrupted work (run at boot)."""

from __future__ import annotations

import click

from .output import json_option, print_json


@click.command()
@click.option("--boot", is_flag=True,
              help="At boot: journal which deployment the initramfs booted, and mount the current "
                   "deployment where the configuration says ([deploy] mount).")
@json_option
@click.pass_context
def recover(ctx, boot, as_json) -> None:
    """Bring the store back to what the journal says.

    Redoes the effects of committed operations, aborts transactions that
    never committed and removes their staging, marks mounts that are gone
    as lost, and reports images whose file is missing. Every action is
    journaled; a second run does nothing. Exit 10 if problems remain.
    The unit apt-layer-recover.service runs `recover --boot` at boot.

    \b
    Example:
      apt-layer recover
      apt-layer recover --boot --json
    """
    from ..recovery import mount_deployment, recover as run

    store = ctx.obj.store(create=True)
    report = run(store)
    if boot:
        from ..boot.booted import record_boot

        booted = record_boot(store)
        if booted is not None:
            report["booted"] = booted
            if "problem" in booted:
                report["problems"].append({"problem": booted["problem"], "image": booted["image"]})
    target = ctx.obj.config.deploy_mount
    if boot and target is not None:
        report["boot"] = mount_deployment(store, str(target))
    if as_json:
        print_json(report)
    else:
        for action in report["actions"]:
            click.echo(f"{action['kind']}: {action['subject']}")
        for problem in report["problems"]:
            click.echo(f"problem: {problem['problem']}" + (f" ({problem['image']})" if "image" in problem else ""),
                       err=True)
        if report.get("booted", {}).get("recorded"):
            click.echo(f"booted {report['booted']['image']}" + (
                f" (rolled back from {report['booted']['rolled_back_from']}, which did not complete a boot)"
                if "rolled_back_from" in report["booted"] else ""))
        if "boot" in report and report["boot"].get("mounted"):
            click.echo(f"mounted {report['boot']['mounted']} on {report['boot']['mountpoint']}")
        if not report["actions"] and not report["problems"] and not ctx.obj.quiet:
            click.echo("nothing to recover")
    if report["problems"]:
        ctx.exit(10)
