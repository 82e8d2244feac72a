"""``apt-layer tx ...``: explicit transactions over several operations."""

from __future__ import annotations

import click

from .output import json_option, print_json, table


@click.group()
def tx() -> None:
    """Group creates, deletes and a deploy into one atomic change.

    Operations given `--tx ID` are staged: nothing live changes until
    `tx commit ID` makes all of them effective at once. `tx rollback ID`
    discards them and leaves nothing behind.

    \b
    Example:
      TX=$(apt-layer tx begin)
      apt-layer image create --tx $TX /srv/rootfs-2 v2
      apt-layer deploy --tx $TX v2
      apt-layer tx commit $TX
    """


@tx.command("begin")
@json_option
@click.pass_context
def begin(ctx, as_json) -> None:
    """Open a transaction and print its id.

    \b
    Example:
      TX=$(apt-layer tx begin)
    """
    txid = ctx.obj.store(create=True).tx_begin()
    print_json({"tx": txid}) if as_json else click.echo(txid)


@tx.command("commit")
@click.argument("txid", metavar="ID")
@json_option
@click.pass_context
def commit(ctx, txid, as_json) -> None:
    """Make every operation staged in ID effective at once.

    \b
    Example:
      apt-layer tx commit $TX
    """
    result = ctx.obj.store().tx_commit(txid)
    if as_json:
        _print_transaction(ctx, txid)
    else:
        click.echo(f"committed {txid}: " + (", ".join(f"{o['kind']} {o['subject']}" for o in result["ops"])
                                            or "nothing staged"))


@tx.command("rollback")
@click.argument("txid", metavar="ID")
@json_option
@click.pass_context
def rollback(ctx, txid, as_json) -> None:
    """Discard transaction ID and everything staged in it.

    \b
    Example:
      apt-layer tx rollback $TX
    """
    ctx.obj.store().tx_rollback(txid)
    _print_transaction(ctx, txid) if as_json else click.echo(f"rolled back {txid}")


def _print_transaction(ctx, txid: str) -> None:
    """A transaction as `tx show --json` prints it (commit and rollback print it as they leave it)."""
    from .. import inventory

    print_json(inventory.transaction(ctx.obj.store(), txid))


@tx.command("list")
@click.option("--state", type=click.Choice(["open", "committed", "aborted"]), help="Only this state.")
@json_option
@click.pass_context
def list_(ctx, state, as_json) -> None:
    """List transactions (oldest first).

    \b
    Example:
      apt-layer tx list --state open
    """
    from .. import inventory

    rows = inventory.transactions(ctx.obj.store(), state)
    if as_json:
        print_json(rows)
    else:
        click.echo(table(((r["tx"], r["state"], "explicit" if r["explicit"] else "implicit",
                           r["begun_at"][:19], (r["ended_at"] or "")[:19]) for r in rows),
                         ("tx", "state", "kind", "begun", "ended")))


@tx.command("show")
@click.argument("txid", metavar="ID")
@json_option
@click.pass_context
def show(ctx, txid, as_json) -> None:
    """Show a transaction: state, staged operations, events.

    \b
    Example:
      apt-layer tx show $TX --json
    """
    from .. import inventory

    info = inventory.transaction(ctx.obj.store(), txid)
    if as_json:
        print_json(info)
        return
    click.echo(f"tx {info['tx']}: {info['state']} ({'explicit' if info['explicit'] else 'implicit'})")
    for op in info["ops"]:
        done = "effective" if op["effective_seq"] else "staged"
        click.echo(f"  {op['op']:7} {op['name']}  {op['digest'][:16]}  {done}")
    for ev in info["events"]:
        click.echo(f"  #{ev['seq']} {ev['at'][:19]} {ev['kind']} {ev['subject']}")
