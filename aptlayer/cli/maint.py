"""Store upkeep: ``gc``, ``fsck``, ``journal``, ``log``, ``audit``."""

from __future__ import annotations

import json

import click

from .output import csv_text, human_bytes, json_option, make_progress, plural, print_json, table


def _maint(ctx):
    from ..maintenance import Maintenance

    return Maintenance(ctx.obj.store())


@click.command()
@click.option("--full", is_flag=True, help="Also walk the store for strays no image ever referenced.")
@click.option("--dry-run", is_flag=True, help="Only say what would be removed, and its size.")
@click.option("-v", "--verbose", is_flag=True, help="With --dry-run, also list each object and its size.")
@click.option("--grace", type=click.IntRange(0), default=None, metavar="SECONDS",
              help="Spare objects touched in the last SECONDS; a later gc takes them (default from config, else 0).")
@json_option
@click.pass_context
def gc(ctx, full, dry_run, verbose, grace, as_json) -> None:
    """Remove objects that no image needs any more.

    An object stays while a live image, an image staged in an open
    transaction, a deployed image or a mounted image references it. By
    default only objects whose reference count dropped to zero are visited
    (fast, whatever the store's size); --full also finds strays left by
    interrupted writers.

    \b
    Example:
      apt-layer gc --dry-run -v
      apt-layer gc --full
    """
    grace = grace if grace is not None else ctx.obj.config.gc_grace_seconds
    with make_progress(ctx, "gc", as_json) as progress:
        result = _maint(ctx).gc(full=full, dry_run=dry_run, grace_seconds=grace, progress=progress)
    for name in result["refused"]:
        click.echo(f"apt-layer: gc: left alone {name!r}: a manifest names it, but it is not an object path",
                   err=True)
    spared = f", {result['spared_by_grace']} spared by the grace period" if result["spared_by_grace"] else ""
    if as_json:
        print_json(result)
    elif dry_run:
        click.echo(f"would remove {plural(result['candidates'], 'object')} "
                   f"({human_bytes(result['candidate_bytes'])})" + spared)
        for obj in result["objects"] if verbose else ():
            click.echo(f"{obj['object']}  {obj['size']}")
    else:
        click.echo(f"removed {plural(result['removed'], 'object')} ({human_bytes(result['bytes_freed'])}), "
                   f"{result['marked']} in use" + spared)


@click.command()
@json_option
@click.pass_context
def fsck(ctx, as_json) -> None:
    """Recompute object and image digests; name the images affected (exit 10 on damage).

    Also reports store paths with unsafe owners or modes (docs/security.md).

    \b
    Example:
      apt-layer fsck --json
    """
    with make_progress(ctx, "fsck", as_json) as progress:
        result = _maint(ctx).fsck(progress=progress)
    if as_json:
        print_json(result)
    else:
        for obj in result["bad_objects"]:
            click.echo(f"object {obj['object']}: {obj['state']}")
        for img in result["images"]:
            what = img["problem"] or f"{plural(len(img['objects']), 'damaged object')}"
            click.echo(f"image {img['name']}: {what}")
        for unsafe in result["permissions"]:
            click.echo(f"unsafe permissions: {unsafe['path']} {unsafe['problem']}; fix: {unsafe['fix']}")
        click.echo(f"checked {plural(result['objects_checked'], 'object')}: " + ("ok" if result["ok"] else "DAMAGED"))
    if not result["ok"]:
        ctx.exit(10)


@click.group()
def journal() -> None:
    """Check and rebuild the event journal.

    \b
    Example:
      apt-layer journal verify
    """


_KEY = "/etc/apt-layer/journal.key"


@journal.command("verify")
@click.option("--key", metavar="FILE", is_flag=False, flag_value=_KEY, default=None,
              help=f"Also check the keyed checkpoints with this key (--key alone: {_KEY}).")
@json_option
@click.pass_context
def verify(ctx, key, as_json) -> None:
    """Recompute the hash chain; name the first bad event (exit 10).

    With --key, also check every keyed checkpoint (`journal checkpoint`):
    a history rewritten together with its hashes is found there.

    \b
    Example:
      apt-layer journal verify --json
      apt-layer journal verify --key
    """
    result = _maint(ctx).verify(key=key)
    if as_json:
        print_json({**result, "ok": True})
        return
    extra = f", {plural(result['checkpoints'], 'keyed checkpoint')}" if "checkpoints" in result else ""
    click.echo(f"journal ok: {plural(result['events'], 'event')}{extra}")


@journal.command("checkpoint")
@click.option("--key", metavar="FILE", default=_KEY, show_default=True,
              help="The key (32 random bytes, made root-only if missing).")
@json_option
@click.pass_context
def checkpoint(ctx, key, as_json) -> None:
    """Record a keyed checkpoint (HMAC) of the journal's last event.

    `journal verify --key` then finds a history rewritten before it, even
    with every hash recomputed. See docs/security.md for what it does not
    protect.

    \b
    Example:
      apt-layer journal checkpoint
    """
    result = _maint(ctx).checkpoint(key)
    if as_json:
        print_json({"added": result is not None, **(result or {})})
    else:
        click.echo(f"checkpoint at seq {result['seq']}" if result else "the last event has a checkpoint already")


@journal.command("rebuild")
@click.option("--force", is_flag=True,
              help="Rebuild even from a journal whose hash chain is broken (edited or missing events).")
@json_option
@click.pass_context
def rebuild(ctx, force, as_json) -> None:
    """Drop the projection and rebuild it from the events and manifests.

    The hash chain is verified first: a broken chain is refused (exit 10)
    unless --force.

    \b
    Example:
      apt-layer journal rebuild
    """
    result = _maint(ctx).rebuild(force=force)
    broken = result["chain_broken"]
    if broken is not None:
        click.echo(f"apt-layer: WARNING: the journal's hash chain is broken at seq {broken['seq']} "
                   f"({broken['reason']}); the projection was rebuilt from it anyway (--force) and may show "
                   "edited or forged state as real", err=True)
    if as_json:
        print_json(result)
    else:
        click.echo(f"rebuilt from {plural(result['events'], 'event')}" +
                   ("" if not result["problems"] else "; problems: " + "; ".join(result["problems"])))


@click.command()
@click.option("--image", "subject", metavar="NAME", help="Only events about this image (or subject).")
@click.option("--kind", metavar="KIND", help="Only this event kind (e.g. image.created; 'tx.*' for a family).")
@click.option("--tx", metavar="ID", help="Only this transaction.")
@click.option("--since", metavar="TIME",
              help="Only events at or after this UTC time (ISO 8601 or a prefix: 2026-11-25, 2026-11-25T10:00).")
@click.option("--until", metavar="TIME",
              help="Only events at or before this UTC time (a prefix such as 2026-11-25 takes the whole day).")
@click.option("-n", "--limit", type=click.IntRange(1), default=50, show_default=True)
@json_option
@click.pass_context
def log(ctx, subject, kind, tx, since, until, limit, as_json) -> None:
    """Show the history of the store, newest first.

    \b
    Example:
      apt-layer log --image base
      apt-layer log --kind gc.swept --since 2026-11-01
    """
    events = _maint(ctx).history(subject=subject, kind=kind, tx=tx, since=since, until=until, limit=limit)
    if as_json:
        from ..inventory import event

        print_json([event(e) for e in events])
        return
    click.echo(table(((e.seq, e.at[:19].replace("T", " "), e.kind, e.subject, e.actor.get("user"), e.tx,
                       _detail(e.data)) for e in events),
                     ("seq", "at (utc)", "kind", "subject", "user", "tx", "detail")))


def _detail(data: dict) -> str | None:
    """What a log line adds to its kind and subject: where a mount was, why something failed."""
    where = data.get("mountpoint")
    reason = data.get("reason")
    parts = [str(where)] if where else []
    if reason:
        parts.append(f"({reason})" if parts else str(reason))
    return " ".join(parts) or None


@click.command()
@click.argument("sql")
@click.option("--format", "fmt", type=click.Choice(["table", "json", "csv"]), default="table",
              show_default=True)
@click.option("--timeout", type=click.FloatRange(0, min_open=True), default=10.0, show_default=True,
              metavar="SECONDS", help="Stop the query after this long.")
@json_option
@click.pass_context
def audit(ctx, sql, fmt, timeout, as_json) -> None:
    """Run a read-only SQL query on the journal (writes, ATTACH and pragmas are refused).

    The views are documented in docs/journal.md, e.g. v_events, v_images.
    --json is short for --format json. A query is stopped after --timeout
    seconds, or when it needs more than 256 MiB (exit 2).

    \b
    Example:
      apt-layer audit "SELECT kind, count(*) FROM events GROUP BY kind"
      apt-layer audit --format csv "SELECT * FROM v_events WHERE kind = 'image.deleted'"
      apt-layer audit --json "SELECT name, digest FROM v_images"
    """
    if as_json and fmt not in ("table", "json"):
        raise click.UsageError(f"--json and --format {fmt} disagree")
    result = _maint(ctx).audit(sql, timeout=timeout)
    columns, rows = result.columns, result.rows
    if as_json or fmt == "json":
        click.echo(json.dumps([dict(zip(columns, r)) for r in rows], indent=2, default=str))
    elif fmt == "csv":
        click.echo(csv_text(rows, columns))
    else:
        click.echo(table(rows, columns))
