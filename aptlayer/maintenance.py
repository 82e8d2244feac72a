"""Operations over the whole store: gc, fsck, status, history, audit, journal upkeep.

Like the Store, this joins the journal and the composefs layer; it is kept
apart because none of it is one image's operation.
"""

from __future__ import annotations

import fnmatch
import re
from datetime import datetime
from collections.abc import Callable

from . import errors, permissions
from .damage import dead_transactions, deployed_damage
from .fault import fault
from .journal import as_dict, kinds
from .layout import new_id
from .store import Store


#: an ISO 8601 UTC time or a prefix of one (2026, 2026-11-25, 2026-11-25T10:00:00.5Z), as events' ``at`` sorts
_ISO_PREFIX = re.compile(r"\d{4}(-\d{2}(-\d{2}([T ]\d{2}(:\d{2}(:\d{2}(\.\d+)?)?)?)?)?)?Z?")


def _is_utc_time(value: str) -> bool:
    """An ISO 8601 time or prefix whose fields are in range (``2026-13`` is not)."""
    if not _ISO_PREFIX.fullmatch(value):
        return False
    head = value.rstrip("Z").split(".")[0].replace(" ", "T")
    try:
        datetime.fromisoformat(head + "2000-01-01T00:00:00"[len(head):])
    except ValueError:
        return False
    return True


def _check_kind(kind: str) -> None:
    """An event kind (or a ``family.*`` pattern) that events can have."""
    known = sorted(kinds.KINDS)
    if kind in known or kinds.is_other_info(kind) or (kind.endswith("*") and (
            fnmatch.filter(known, kind) or any(p.startswith(kind[:-1]) for p in kinds.INFO_PREFIXES))):
        return
    raise errors.InvalidInput(f"--kind {kind!r}: no event has that kind; the kinds are {', '.join(known)} "
                              "(a pattern such as 'tx.*' matches a family)")


class Maintenance:
    """gc, fsck, status and journal upkeep: operations over the whole store."""

    def __init__(self, store: Store):
        self.store = store
        self.journal = store.journal

    def gc(self, *, full: bool = False, dry_run: bool = False, grace_seconds: int = 0,
           progress: Callable | None = None) -> dict:
        """Collect objects no image needs; see ``aptlayer.gc.collect``."""
        from .gc import collect

        s = self.store
        with s.exclusive():
            gc_plan = collect.plan(self.journal, s.objects_dir, full=full, grace_seconds=grace_seconds)
            result = {"full": full, "dry_run": dry_run, "marked": gc_plan.marked,
                      "candidates": len(gc_plan.objects), "candidate_bytes": gc_plan.bytes,
                      "spared_by_grace": len(gc_plan.spared), "temp_files": len(gc_plan.temp_files),
                      "refused": gc_plan.refused}
            if dry_run:
                result["objects"] = [{"object": o, "size": n} for o, n in gc_plan.objects]
                return result
            txid = new_id()
            s.record(kinds.GcBegun(subject="store", full=full, marked=gc_plan.marked,
                                   candidates=len(gc_plan.objects), candidate_bytes=gc_plan.bytes), txid)
            fault("gc.after-begun")
            removed, freed = collect.sweep(gc_plan, s.objects_dir, s.trash_dir, progress)
            fault("gc.after-sweep")
            # the kept objects' rows stay: the next gc sees them again
            s.record(kinds.GcSwept(subject="store", removed=removed, bytes=freed, temp_files=len(gc_plan.temp_files),
                                   spared=tuple(gc_plan.kept)), txid)
            result.update(removed=removed, bytes_freed=freed)
            return result

    def status(self) -> dict:
        from . import inventory
        from .layering import Lineage

        s = self.store
        deps = self.journal.deployments()

        def describe(slot: str):
            dep = deps.get(slot)
            if dep is None:
                return None
            info = dep.ref()
            ev = next(self.journal.events(subject=dep.image, kind="image.created",
                                          newest_first=True, limit=1), None)
            if ev is not None:
                info.update(created_at=ev.at, created_by=inventory.actor(ev))
                lineage = ev.typed().lineage
                if lineage:
                    info.update(Lineage.from_data(lineage).summary())
            return info

        from .boot.booted import booted

        usage = self.journal.usage()
        return {
            "root": str(s.root),
            "deployments": {"current": describe("current"), "previous": describe("previous")},
            "booted": booted(s),
            "next_boot": (deps["current"].image if "current" in deps else None),
            "boot_mount": str(s.config.deploy_mount) if s.config and s.config.deploy_mount else None,
            "transactions": inventory.transactions(s, "open"),
            "mounts": inventory.mounts(s),
            "store": as_dict(usage),
            "journal": {"events": self.journal.last_seq()},
            "problems": deployed_damage(s) + dead_transactions(s),
        }

    def history(self, **filters) -> list:
        """Events matching ``filters`` (subject, kind, tx, since, until, limit), newest first.

        A kind no event can have, or a time that is not ISO 8601, is
        InvalidInput: a filter that can match nothing is a typo, not an
        empty history.
        """
        if filters.get("kind") is not None:
            _check_kind(filters["kind"])
        for bound in ("since", "until"):
            value = filters.get(bound)
            if value is None:
                continue
            if not _is_utc_time(value):
                raise errors.InvalidInput(f"--{bound} {value!r} is not a UTC time: give ISO 8601 or a "
                                          "prefix of it, e.g. 2026-11-25 or 2026-11-25T10:00")
            filters[bound] = value.replace(" ", "T", 1)  # as `log` prints times; events store a T
        return list(self.journal.events(newest_first=True, **filters))

    def audit(self, sql: str, **bounds):
        """A read-only query on the journal; refused writes, bad SQL and a runaway query are InvalidInput.

        ``bounds``: ``timeout`` (seconds) and ``memory`` (bytes), see :func:`journal.audit.query`.
        """
        from .journal import AuditLimit, AuditQueryError, AuditRefused, audit_query

        if not sql.strip():
            raise errors.InvalidInput('audit: the query is empty (e.g. apt-layer audit "SELECT * FROM v_images")')

        try:
            return audit_query(self.journal.path, sql, **bounds)
        except AuditRefused as e:
            raise errors.InvalidInput(str(e)) from None
        except (AuditQueryError, AuditLimit) as e:
            raise errors.InvalidInput(f"audit: {e}") from None

    def verify(self, key: str | None = None) -> dict:
        """The hash chain, and with ``key`` (a key file) the keyed checkpoints too (IntegrityError)."""
        from . import checkpoints
        from .journal import ChainBroken

        try:
            count = self.journal.verify()
        except ChainBroken as e:
            raise errors.IntegrityError(str(e)) from None
        result = {"events": count}
        if key is not None:
            result["checkpoints"] = checkpoints.verify(self.store.root, self.journal, checkpoints.load_key(key))
        return result

    def checkpoint(self, key: str) -> dict | None:
        """A keyed checkpoint of the last event (the key made if missing); None if there was one."""
        from . import checkpoints

        with self.store.exclusive():
            return checkpoints.add(self.store.root, self.journal, checkpoints.load_key(key, create=True))

    def rebuild(self, *, force: bool = False) -> dict:
        """Rebuild the projection from the events, once ``verify`` passes.

        The projection of an edited journal would present forged state as
        real, so a broken chain is an IntegrityError; ``force`` rebuilds
        anyway and says where the chain broke (``chain_broken``). Nothing is
        recorded either way: ``journal verify`` keeps failing.
        """
        from .journal import ChainBroken

        broken = None
        with self.store.exclusive():
            try:
                self.journal.verify()
            except ChainBroken as e:
                if not force:
                    raise errors.IntegrityError(f"{e}; refusing to rebuild from a damaged journal "
                                                "(`journal rebuild --force` rebuilds anyway)") from None
                broken = {"seq": e.seq, "reason": e.reason}
            count = self.journal.rebuild()
            problems = self.journal.check()
        return {"events": count, "problems": problems, "chain_broken": broken}

    def fsck(self, progress: Callable | None = None) -> dict:
        """Recompute every referenced object's digest and every image's digest.

        Reports the objects that are missing or corrupt and the images that
        need them; changes nothing.
        """
        from .composefs import fsverity

        s = self.store
        bad: dict[str, str] = {}
        rows = list(self.journal.referenced())
        for i, obj in enumerate(rows):
            path = s.objects_dir / obj
            try:
                digest = fsverity.digest_file(str(path))
            except FileNotFoundError:
                bad[obj] = "missing"
                continue
            if fsverity.object_path(digest) != obj:
                bad[obj] = "corrupt"
            if progress is not None and i % 64 == 0:
                progress(i, len(rows))
        images = []
        for img in self.journal.images():
            path = s.image_path(img.name)
            problem = None
            if not path.exists():
                problem = "image file missing"
            elif fsverity.digest_file(str(path)).hex() != img.digest:
                problem = "image file modified"
            objs = [o for o, _ in self.journal.manifest(img.digest) if o in bad]
            if problem or objs:
                images.append({"name": img.name, "problem": problem,
                               "objects": [{"object": o, "state": bad[o]} for o in objs]})
        unsafe = [u.to_dict() for u in permissions.check_store(s.root, *s.layout.guarded)]
        return {"objects_checked": len(rows), "bad_objects": [{"object": o, "state": st} for o, st in bad.items()],
                "images": images, "permissions": unsafe, "ok": not bad and not images and not unsafe}
