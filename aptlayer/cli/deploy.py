"""``apt-layer deploy``, ``rollback`` and ``status``."""

from __future__ import annotations

import click

from .images import image_name
from .output import human_bytes, json_option, plural, print_json


@click.command()
@image_name
@click.option("--tx", metavar="ID", help="Stage the deployment in open transaction ID.")
@json_option
@click.pass_context
def deploy(ctx, name, tx, as_json) -> None:
    """Make image NAME the current deployment (what the next boot mounts).

    The current deployment becomes the previous one, which `rollback`
    returns to. The switch is one atomic rename of `deploy/current`.

    \b
    Example:
      apt-layer deploy base-2025-11
    """
    result = ctx.obj.store().deploy(name, tx=tx)
    if as_json:
        print_json(result)
    elif result["staged"]:
        click.echo(f"deployment of {name} staged in transaction {tx}")
    else:
        click.echo(f"deployed {name} (previous: {result['previous'] or '-'})")


@click.command()
@json_option
@click.pass_context
def rollback(ctx, as_json) -> None:
    """Go back to the previous deployment (the two swap places).

    \b
    Example:
      apt-layer rollback && apt-layer status
    """
    result = ctx.obj.store().rollback()
    if as_json:
        print_json(result)
    else:
        click.echo(f"rolled back to {result['current']} (previous: {result['previous']})")


@click.command()
@json_option
@click.pass_context
def status(ctx, as_json) -> None:
    """Show deployments, open transactions, mounts and store usage.

    ● marks the deployment that is running (booted), or the current one
    when the machine did not boot a deployment of this store.

    \b
    Example:
      apt-layer status
      apt-layer status --json | jq .deployments.current.image
    """
    from ..maintenance import Maintenance

    info = Maintenance(ctx.obj.store()).status()
    if as_json:
        print_json(info)
        return
    click.echo(f"Store: {info['root']}")
    booted = info["booted"]
    for slot in ("current", "previous"):
        dep = info["deployments"][slot]
        runs = booted is not None and dep is not None and (dep["image"], dep["digest"]) == \
            (booted["image"], booted["digest"])
        marker = "●" if runs or (booted is None and slot == "current") else " "
        if dep is None:
            click.echo(f"{marker} {slot}: none")
            continue
        click.echo(f"{marker} {slot}: {dep['image']}" + (" (booted)" if runs else ""))
        click.echo(f"      Digest: {dep['digest']}")
        if dep.get("created_at"):
            click.echo(f"     Created: {dep['created_at'][:19].replace('T', ' ')} UTC by {dep['created_by']['user']}")
        if dep.get("base"):
            click.echo(f"   BaseImage: {dep['base']} ({dep['base_digest'][:16]})")
            for label, key in (("LayeredPackages", "layered"), ("RemovedBasePackages", "removed"),
                               ("InactiveRequests", "inactive")):
                if dep[key]:
                    click.echo(f"      {label}: {' '.join(dep[key])}")
    if booted is not None:
        click.echo(f"Booted: {booted['image']} (apt-layer.deploy={booted['deploy']}"
                   + (f"; {booted['fallback_from']} did not complete a boot" if "fallback_from" in booted else "")
                   + ")")
    boot = info["next_boot"] or "nothing"
    click.echo(f"Next boot mounts: {boot}" + (f" on {info['boot_mount']}" if info["boot_mount"] else ""))
    txs = info["transactions"]
    click.echo(f"Open transactions: {', '.join(t['tx'] for t in txs) if txs else 'none'}")
    mounts = info["mounts"]
    if mounts:
        click.echo("Mounts:")
        for m in mounts:
            click.echo(f"  {m['mountpoint']}: {m['image']} ({m['state']})")
    else:
        click.echo("Mounts: none")
    st = info["store"]
    click.echo(f"Images: {st['images']} ({human_bytes(st['image_bytes'])}), objects: {st['objects']} "
               f"({human_bytes(st['object_bytes'])}), reclaimable by gc: {plural(st['reclaimable_objects'], 'object')} "
               f"({human_bytes(st['reclaimable_bytes'])})")
    click.echo(f"Journal: {plural(info['journal']['events'], 'event')}")
    for problem in info["problems"]:
        click.echo(f"Problem: {problem['problem']}" + (f" ({problem['image']})" if "image" in problem else ""))


@click.command()
@click.option("-r", "--rollback", "drop_rollback", is_flag=True,
              help="Drop the rollback deployment (the previous one); the current one stays.")
@click.option("-p", "--pending", "drop_pending", is_flag=True,
              help="Withdraw the deploys staged in open transactions (the rest of their work stays staged).")
@json_option
@click.pass_context
def cleanup(ctx, drop_rollback, drop_pending, as_json) -> None:
    """Drop deployments, like `rpm-ostree cleanup`: -r the rollback one, -p the staged ones.

    The images stay; once no deployment holds an image, `image delete`
    takes it and `gc` its objects.

    \b
    Example:
      apt-layer cleanup -r && apt-layer image delete old && apt-layer gc
      apt-layer cleanup -p
    """
    if not (drop_rollback or drop_pending):
        raise click.UsageError("say what to clean up: -r (the rollback deployment), -p (staged deploys), or both")
    result = ctx.obj.store().cleanup(rollback=drop_rollback, staged=drop_pending)
    if as_json:
        print_json(result)
        return
    if drop_rollback:
        dropped = result["undeployed"]
        click.echo(f"dropped the rollback deployment {dropped['image']}" if dropped else "no rollback deployment")
    if drop_pending:
        for op in result["unstaged"]:
            click.echo(f"withdrew the deploy of {op['image']} staged in transaction {op['tx']}")
        if not result["unstaged"]:
            click.echo("no deploy staged")
