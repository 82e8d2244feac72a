"""Operations over the whole store: gc, fsck, status, history, audit, journal upkeep.

Like the Store, this joins the journal and the composefs layer; it is kept
apart because none of it is one image's operation.
"""

from __future__ import annotations

from collections.abc import Callable

from . import errors
from .damage import dead_transactions, deployed_damage
from .fault import fault
from .journal import as_dict, kinds
from .layout import new_id
from .store import Store


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
                info.update(created_at=ev.at, created_by=ev.actor.get("user"))
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
        """Events matching ``filters`` (subject, kind, tx, since, until, limit), newest first."""
        return list(self.journal.events(newest_first=True, **filters))

    def audit(self, sql: str):
        """A read-only query on the journal; refused writes and bad SQL are InvalidInput."""
        from .journal import AuditQueryError, AuditRefused, audit_query

        try:
            return audit_query(self.journal.path, sql)
        except AuditRefused as e:
            raise errors.InvalidInput(str(e)) from None
        except AuditQueryError as e:
            raise errors.InvalidInput(f"audit: {e}") from None

    def verify(self) -> int:
        from .journal import ChainBroken

        try:
            return self.journal.verify()
        except ChainBroken as e:
            raise errors.IntegrityError(str(e)) from None

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
        return {"objects_checked": len(rows), "bad_objects": [{"object": o, "state": st} for o, st in bad.items()],
                "images": images, "ok": not bad and not images}
