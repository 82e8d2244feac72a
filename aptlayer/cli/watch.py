"""``apt-layer watch``: journal changes made to the store behind apt-layer's back."""

from __future__ import annotations

import json
import signal
import threading

import click

from .output import json_option, plural


def _detail(kind: str, data: dict) -> str:
    """What a person needs to know about one drift, after its kind and subject."""
    needed = ", ".join(data.get("images") or data.get("held_by") or []) or "-"
    if kind == "drift.object-deleted":
        return f"needed by {needed}"
    if kind == "drift.object-modified":
        return f"content now belongs at {data['found_object']}; needed by {needed}"
    if kind == "drift.image-deleted":
        deployed = f" (deployed: {', '.join(data['deployed'])})" if data["deployed"] else ""
        return f"file {data['path']} removed{deployed}"
    if kind == "drift.image-modified":
        return f"file {data['path']} has digest {data['found_digest']}, the journal says {data['digest']}"
    if kind == "drift.image-unknown":
        return f"file {data['path']} belongs to no image ({data['size']} bytes)"
    return f"points to {data['target'] or 'nothing'}, the journal says {data['expected'] or 'nothing'}"


def _printer(as_json: bool):
    from .. import inventory

    def show(event) -> None:
        if as_json:
            click.echo(json.dumps(inventory.event(event), sort_keys=True))
        else:
            click.echo(f"{event.at[:19].replace('T', ' ')} {event.kind.removeprefix('drift.')} "
                       f"{event.subject}: {_detail(event.kind, event.data)}")

    return show


@click.command()
@click.option("--duration", type=click.FloatRange(min=0), metavar="SECONDS",
              help="Stop after SECONDS (default: run until SIGINT or SIGTERM).")
@json_option
@click.pass_context
def watch(ctx, duration, as_json) -> None:
    """Journal every change to the store that apt-layer did not make.

    Watches images/, the digest store and deploy/ (inotify) and records a
    drift.* event for an object deleted or modified (naming the images that
    need it), an image file modified or deleted, an unknown .composefs file,
    or a deployment link changed. apt-layer's own operations are never
    reported. Each drift is printed as a line (a JSON object per line with
    --json). The unit apt-layer-watch.service runs it as a service.

    \b
    Example:
      apt-layer watch
      apt-layer watch --json --duration 60 | jq .subject
      apt-layer log --kind 'drift.*'
    """
    from ..watch import Watcher

    def notice(message: str) -> None:
        if not ctx.obj.quiet:
            click.echo(f"apt-layer watch: {message}", err=True)

    store = ctx.obj.store()
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    watcher = Watcher(store, on_drift=_printer(as_json), on_notice=notice)
    baseline = watcher.start()
    if baseline:
        notice(f"{plural(len(baseline), 'difference')} from the journal already there (not journaled; "
               "see apt-layer fsck and recover)")
    notice(f"watching {store.root}")
    try:
        watcher.run(stop, duration)
    finally:
        undecided = watcher.close()
    if undecided:
        notice(f"stopped with {plural(undecided, 'change')} undecided (apt-layer held the store meanwhile)")
