"""Cheap checks of what the next boot and the open work depend on.

``fsck`` recomputes every digest; these only ``stat``: the file and the
objects of each deployed image (what the next boot, or a rollback, mounts)
and whether the process behind each open transaction is still there. ``recover``
and ``status`` run them, so that damage which would break the next boot is
reported where an administrator looks, not only by an explicit ``fsck``.
"""

from __future__ import annotations

from .linux.process import pid_alive
from .store import Store


def deployed_damage(store: Store, files: bool = True) -> list[dict]:
    """Deployed images whose file (unless not ``files``) or objects are missing, a problem each."""
    problems = []
    for slot, dep in sorted(store.journal.deployments().items()):
        name = dep.image
        path = store.image_path(name)
        if files and not path.is_file():
            problems.append({"problem": f"the {slot} deployment's image file is missing", "image": name,
                             "deployed": slot, "path": str(path)})
        missing = store.absent(store.journal.manifest(dep.digest))
        if missing:
            problems.append({"problem": f"the {slot} deployment lacks {len(missing)} of its objects "
                                        "(run apt-layer fsck)", "image": name, "deployed": slot,
                             "objects": missing})
    return problems


def dead_transactions(store: Store) -> list[dict]:
    """Open transactions nobody will finish: an implicit one whose process is gone, any from an earlier boot.

    An explicit transaction outlives the ``tx begin`` that opened it, so only
    a reboot makes it dead. ``recover`` aborts all of these.
    """
    dead = []
    for t, begun in store.journal.open_transactions():
        tx = t.id
        pid = begun.actor.get("pid")
        if begun.typed().boot_id != store.boot_id:
            why = "opened in an earlier boot"
        elif not t.explicit and not pid_alive(pid):
            why = f"its process {pid} is gone"
        else:
            continue
        dead.append({"problem": f"transaction {tx} is open but {why} (run apt-layer recover)", "tx": tx})
    return dead
