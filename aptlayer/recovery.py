"""Recovery: bring the store back to what the journal says, after a crash or at boot.

The journal is the truth. Recovery, holding the store lock exclusively (so no
writer is mid-operation):

1. brings the projection up to the last event (SQLite has already dropped
   any torn WAL tail) and checks the hash chain of the events since the last
   verified one (``journal verify`` checks all);
2. redoes the effects of committed events: an image whose staged file is
   still in staging is renamed into ``images/`` (the staged file exists only
   until that rename, so its presence proves the rename never happened, even
   where an older file of the same name and size is in the way), a deleted
   image's file is unlinked, the deployment links are made to match;
3. aborts transactions that never committed: every open implicit one (its
   command is gone, or it would hold the lock) and explicit ones from an
   earlier boot; their staging goes, as does any staging no open
   transaction owns, and files in an open transaction's staging that it
   never staged (its writer died before recording them);
4. marks recorded mounts that no longer exist as lost: made in an earlier
   boot, or found in no mount namespace (one made inside ``unshare -m`` or a
   container is not in recovery's own);
5. reports live images whose file is missing or has the wrong size, image
   files nobody knows and, after a crash, images whose objects are missing.

Every action is journaled as a ``recover.*`` event, so a second run finds
nothing to do and journals nothing. It never deletes a live image's file or
an object. When there is nothing to do it reads only a few rows and
directories: the boot waits for it.
"""

from __future__ import annotations

import json
import os

from .composefs import fsops
from .damage import deployed_damage
from .fault import fault
from .store import IMAGE_SUFFIX, Store, new_tx_id

#: temporary deployment links are named ``.SLOT.tmp-PID`` (Store.sync_deployments)
_LINK_TEMP_PREFIXES = (".current.tmp-", ".previous.tmp-")


def _boot_of(tx_begun_data: dict) -> str:
    return str(tx_begun_data.get("boot_id", ""))


class Recovery:
    def __init__(self, store: Store):
        self.store = store
        self.journal = store.journal
        self.actions: list[dict] = []
        self.problems: list[dict] = []
        self._tx = new_tx_id()

    def _record(self, kind: str, subject: str, data: dict) -> None:
        self.store.record(kind, subject, data, self._tx)
        self.actions.append({"kind": kind, "subject": subject, **data})

    def run(self) -> dict:
        from .journal import ChainBroken, ProjectionError

        s = self.store
        with s.exclusive():
            try:
                caught_up = self.journal.catch_up()
            except (ChainBroken, ProjectionError) as e:
                # The projection cannot follow the events: acting on it could
                # remove what the journal still needs. Report and touch nothing.
                self.problems.append({"problem": f"journal cannot be replayed: {e}",
                                      "seq": getattr(e, "seq", None)})
                return {"actions": self.actions, "problems": self.problems}
            if caught_up:
                self.actions.append({"kind": "projection.caught-up", "subject": "journal", "events": caught_up})
                fault("recover.after-catch-up")
            self._verify_tail()
            self._redo_images()
            self._abort_dead_transactions()
            self._clear_staging_leftovers()
            self._redo_deployments()
            self._reconcile_mounts()
            if self.actions:
                self._report_missing_objects()
            else:  # what the next boot needs, checked even when nothing else was wrong
                self.problems += deployed_damage(s, files=False)  # missing files: _redo_images
        return {"actions": self.actions, "problems": self.problems}

    def _verify_tail(self) -> None:
        """Check the hash chain from the last verified event to the end.

        The checkpoint (``ROOT/verified``: seq and hash) only saves work: a
        full check is ``journal verify``. A broken chain is reported, and
        recovery goes on, since refusing to boot helps nobody.
        """
        from .journal import ChainBroken

        mark = self.store.root / "verified"
        try:
            seq_text, prev = mark.read_text().split()
            start = int(seq_text)
        except (OSError, ValueError):
            start, prev = 0, ""
        last = self.journal.last_seq()
        if start > last:
            self.problems.append({"problem": f"the journal ends at seq {last}, but seq {start} was "
                                             "verified before: committed events were lost", "seq": last + 1})
            self._record("recover.events-lost", "journal", {"verified_up_to": start, "journal_ended_at": last})
            start, last = 0, self.journal.last_seq()
        try:
            if start:
                row = self.journal.conn.execute("SELECT hash FROM events WHERE seq = ?", (start,)).fetchone()
                if row is None or row[0] != prev:
                    raise ChainBroken(start, "event differs from the one verified before")
            if last > start:
                self.journal.verify(after=start)
        except ChainBroken as e:
            self.problems.append({"problem": str(e), "seq": e.seq})
            return
        if last != start:
            self._write_mark(last)

    def _write_mark(self, seq: int) -> None:
        row = self.journal.conn.execute("SELECT hash FROM events WHERE seq = ?", (seq,)).fetchone()
        root = str(self.store.root)
        tmp = os.path.join(root, ".verified.tmp")  # one name: a recovery killed while writing it leaves no litter
        if os.path.lexists(tmp):
            fsops.unlink(tmp)
        fd = fsops.create(tmp, 0o644)
        try:
            fsops.write(fd, f"{seq} {row[0] if row else ''}\n".encode(), 0)
            fsops.fsync(fd)
        finally:
            os.close(fd)
        fsops.rename(tmp, os.path.join(root, "verified"))
        fsops.fsync_dir(root)

    # -- images ---------------------------------------------------------------------

    def _redo_images(self) -> None:
        s = self.store
        staged = self._staged_images()
        live = {name: (digest, size, created_seq) for name, digest, size, created_seq in
                self.journal.conn.execute("SELECT name, digest, size, created_seq FROM images")}
        for name, (digest, size, created_seq) in sorted(live.items()):
            rel = self._staged_rel(created_seq) if staged else None
            if rel is not None and rel in staged:
                s.place_image(name, staged[rel])
                fault("recover.after-place")
                self._record("recover.image-placed", name, {"digest": digest, "from": rel})
                continue
            path = s.image_path(name)
            try:
                st = path.stat()
            except FileNotFoundError:
                self.problems.append({"problem": "image file missing", "image": name, "path": str(path)})
                continue
            if st.st_size != size:
                self.problems.append({"problem": "image file has the wrong size", "image": name,
                                      "path": str(path), "expected": size, "found": st.st_size})
        files = {e.name[: -len(IMAGE_SUFFIX)] for e in os.scandir(s.images_dir)
                 if e.name.endswith(IMAGE_SUFFIX) and e.is_file(follow_symlinks=False)}
        for name in sorted(files - set(live)):
            last = self.journal.conn.execute(
                "SELECT kind, data FROM events WHERE subject = ? AND kind IN ('image.created', 'image.deleted') "
                "ORDER BY seq DESC LIMIT 1", (name,)).fetchone()
            if last is not None and last[0] == "image.deleted" and self._is_deleted_image(name, last[1]):
                s.remove_image_file(name)
                fault("recover.after-unlink")
                self._record("recover.image-unlinked", name, {})
            else:
                self.problems.append({"problem": "unknown image file", "image": name,
                                      "path": str(s.image_path(name))})

    def _is_deleted_image(self, name: str, deleted_data: str) -> bool:
        """Whether ``images/NAME.composefs`` is the very file a committed delete meant to unlink.

        Only that file is unlinked: one that merely carries the name (a
        restored backup, an image copied in by hand) is reported as unknown
        and kept.
        """
        from .composefs import fsverity

        try:
            digest = fsverity.digest_file(str(self.store.image_path(name))).hex()
        except OSError:
            return False
        return digest == json.loads(deleted_data).get("digest")

    def _staged_images(self) -> dict:
        """``{"staging/DIR/NAME.composefs": path}`` of every image file in staging."""
        found = {}
        for entry in os.scandir(self.store.staging_dir):
            if entry.is_dir(follow_symlinks=False):
                for f in os.scandir(entry.path):
                    if f.name.endswith(IMAGE_SUFFIX) and f.is_file(follow_symlinks=False):
                        found[f"staging/{entry.name}/{f.name}"] = self.store.root / "staging" / entry.name / f.name
        return found

    def _staged_rel(self, created_seq: int) -> str | None:
        """Where the event that created an image says its file was staged."""
        row = self.journal.conn.execute("SELECT data FROM events WHERE seq = ?", (created_seq,)).fetchone()
        return json.loads(row[0]).get("staged") if row else None

    def _report_missing_objects(self) -> None:
        s = self.store
        for name, digest in self.journal.conn.execute("SELECT name, digest FROM images ORDER BY name").fetchall():
            missing = [o for o, _ in self.journal.manifest(digest) if not (s.objects_dir / o).is_file()]
            if missing:
                self.problems.append({"problem": f"{len(missing)} objects missing", "image": name,
                                      "objects": missing})

    # -- transactions and staging ------------------------------------------------------

    def _abort_dead_transactions(self) -> None:
        s = self.store
        for txid, explicit, begun in self.journal.open_transactions():
            boot = _boot_of(begun.data)
            if explicit and boot == s.boot_id:
                continue
            why = "interrupted" if not explicit else "left open by an earlier boot"
            s.record("tx.aborted", txid, {"reason": f"recovery: transaction {why}"}, txid)
            self.actions.append({"kind": "tx.aborted", "subject": txid, "reason": why})
            fault("recover.after-abort")
            s.clear_staging(txid)

    def _clear_staging_leftovers(self) -> None:
        """Remove staging no open transaction owns, and files an open one never staged."""
        s = self.store
        open_here = {s.staging_path(t).name: t for (t,) in self.journal.conn.execute(
            "SELECT id FROM transactions WHERE state = 'open'")}
        removed = []
        for entry in sorted(os.scandir(s.staging_dir), key=lambda e: e.name):
            if entry.is_symlink():
                self.problems.append({"problem": "symlink in staging, left alone: apt-layer never made it "
                                                 "and never follows it; remove it by hand",
                                      "path": entry.path, "target": os.readlink(entry.path)})
                continue
            tx = open_here.get(entry.name)
            if tx is None:
                _remove(entry)
                removed.append(entry.name)
                continue
            keep = {os.path.basename(op["data"].get("staged", "")) for op in self.journal.staged_ops(tx)
                    if op["op"] == "create" and op["effective_seq"] is None}
            unstaged = sorted((f for f in os.scandir(entry.path) if f.name not in keep), key=lambda e: e.name)
            for f in unstaged:
                _remove(f)
                removed.append(f"{entry.name}/{f.name}")
            if unstaged:
                fsops.fsync_dir(entry.path)
        if removed:
            fsops.fsync_dir(str(s.staging_dir))
        for name in removed:
            self._record("recover.staging-removed", name, {})
            fault("recover.after-staging-removed")

    # -- deployments and mounts ------------------------------------------------------------

    def _redo_deployments(self) -> None:
        s = self.store
        temps = sorted(e.name for e in os.scandir(s.deploy_dir) if e.name.startswith(_LINK_TEMP_PREFIXES))
        for name in temps:
            fsops.unlink(str(s.deploy_dir / name))
        if temps:
            fsops.fsync_dir(str(s.deploy_dir))
            self._record("recover.deploy-temp-removed", "deploy", {"links": temps})
        changed = s.sync_deployments()
        if changed:
            fault("recover.after-deploy-sync")
            self._record("recover.deploy-synced", "deploy", {"slots": changed})

    def _reconcile_mounts(self) -> None:
        rows = self.journal.conn.execute(
            "SELECT mountpoint, image, boot_id FROM mounts WHERE state = 'mounted'").fetchall()
        if not rows:
            return
        # ctypes: only when there are mounts to check
        from .composefs.mount import composefs_mount_points_elsewhere, mount_info

        present = {m.mount_point for m in mount_info() if m.is_composefs}
        elsewhere = None
        for mountpoint, image, boot in rows:
            if boot == self.store.boot_id and mountpoint not in present:
                if elsewhere is None:
                    elsewhere = composefs_mount_points_elsewhere()
                if mountpoint in elsewhere:
                    present.add(mountpoint)
            if boot == self.store.boot_id and mountpoint in present:
                continue
            self.store.record("mount.lost", image, {"mountpoint": mountpoint,
                                                     "reason": "not mounted" if boot == self.store.boot_id
                                                     else "mounted in an earlier boot"}, self._tx)
            self.actions.append({"kind": "mount.lost", "subject": image, "mountpoint": mountpoint})


def _remove(entry: os.DirEntry) -> None:
    if entry.is_dir(follow_symlinks=False):
        fsops.remove_tree(entry.path)
    else:
        fsops.unlink(entry.path)


def recover(store: Store) -> dict:
    return Recovery(store).run()


def mount_deployment(store: Store, target: str) -> dict:
    """Mount the current deployment on ``target`` (for ``recover --boot``)."""
    current = store.journal.deployments().get("current")
    if current is None:
        return {"mounted": None, "reason": "nothing deployed"}
    from .composefs.mount import is_mounted

    if is_mounted(target):
        return {"mounted": None, "reason": f"{target} is already mounted"}
    os.makedirs(target, exist_ok=True)
    result = store.mount(current["image"], target, readonly=True)
    return {"mounted": current["image"], "mountpoint": result["mountpoint"]}
