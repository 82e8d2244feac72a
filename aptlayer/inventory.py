"""What a store holds, as the commands show it: images, transactions, mounts.

Read-only joins of the journal's typed rows into the records ``image list``,
``image info``, ``tx list|show`` and ``status`` print (and give as JSON).
"""

from __future__ import annotations

from . import errors
from .store import Store


def _slots(deployments: dict, name: str) -> list[str]:
    """The deployment slots (``current``, ``previous``) that hold image ``name``: ``deployed`` in JSON."""
    return [slot for slot in ("current", "previous") if slot in deployments and deployments[slot].image == name]


def actor(ev) -> dict:
    """Who recorded an event, as ``created_by`` shows it."""
    return {k: ev.actor.get(k) for k in ("user", "uid", "host", "pid")}


def event(ev) -> dict:
    """One journal event, as ``log``, ``watch`` and ``tx show`` print it."""
    return {"seq": ev.seq, "at": ev.at, "tx": ev.tx, "kind": ev.kind, "subject": ev.subject, "data": ev.data,
            "actor": ev.actor}


def images(store: Store) -> list[dict]:
    """Every live image, by name, with its manifest's size and its deployment slots."""
    journal = store.journal
    deps = journal.deployments()
    return [{"name": i.name, "digest": i.digest, "size": i.size, "created_at": i.created_at, "tx": i.tx,
             "objects": objects, "content_bytes": content, "deployed": _slots(deps, i.name)}
            for i, objects, content in journal.images_with_manifests()]


def image_info(store: Store, name: str) -> dict:
    image = store.journal.image(name)
    if image is None:
        raise errors.NotFound(f"no image named {name!r}")
    journal = store.journal
    info = {"name": name, "digest": image.digest, "size": image.size, "created_seq": image.created_seq,
            "created_at": image.created_at, "tx": image.tx, "path": str(store.image_path(name))}
    info["objects"], info["content_bytes"] = journal.manifest_summary(image.digest) or (0, 0)
    info["deployed"] = _slots(journal.deployments(), name)
    info["mounts"] = journal.mounts_of(name)
    created = next(journal.events(subject=name, kind="image.created", newest_first=True, limit=1), None)
    info["created_by"] = actor(created) if created is not None else None
    info["source"] = created.typed().source if created is not None else None
    return info


def transactions(store: Store, state: str | None = None) -> list[dict]:
    return [{"tx": t.id, "state": t.state, "explicit": t.explicit, "begun_at": t.begun_at, "ended_at": t.ended_at}
            for t in store.journal.transactions(state)]


def transaction(store: Store, tx: str) -> dict:
    t = store.journal.transaction_row(tx)
    if t is None:
        raise errors.NotFound(f"no transaction {tx!r}")
    info = {"tx": t.id, "state": t.state, "explicit": t.explicit, "begun_at": t.begun_at, "ended_at": t.ended_at}
    info["ops"] = ops(store, tx)
    info["events"] = [event(e) for e in store.journal.events(tx=tx)]
    return info


def ops(store: Store, tx: str) -> list[dict]:
    """The operations staged in transaction ``tx``; ``effective_seq`` once committed."""
    return [{"op": o.op, "name": o.name, "digest": o.digest, "effective_seq": o.effective_seq}
            for o in store.journal.staged_ops(tx)]


def mounts(store: Store) -> list[dict]:
    return [{"mountpoint": m.mountpoint, "image": m.image, "digest": m.digest, "state": m.state,
             "boot_id": m.boot_id} for m in store.journal.mounts()]
