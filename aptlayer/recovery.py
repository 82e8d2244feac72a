"""Recovery: bring the store back to what the journal says, after a crash or at boot.

The journal is the truth. Recovery, holding the store lock exclusively (so no
writer is mid-operation):

1. brings the projection up to the last event (SQLite has already dropped
   any torn WAL tail) and checks the hash chain of the events since the last
   verified one (``journal verify`` checks all);
2. has each effect (:mod:`aptlayer.effects`) redo what committed events
   need: staged images placed, deleted images' files unlinked, the
   deployment links made to match;
3. aborts transactions that never committed: every open implicit one (its
   command is gone, or it would hold the lock) and explicit ones from an
   earlier boot; their staging goes, as does any staging no open
   transaction owns, and files in an open transaction's staging that it
   never staged (its writer died before recording them);
4. marks recorded mounts that no longer exist as lost: made in an earlier
   boot, or found in no mount namespace (one made inside ``unshare -m`` or a
   container is not in recovery's own; one in a namespace only an nsfs bind
   mount pins is found by entering it, and if that cannot be done no mount
   of this boot is called lost);
5. reports live images whose file is missing or has the wrong size, image
   files nobody knows and, after a crash, images whose objects are missing.

Every action is journaled as a ``recover.*`` event, so a second run finds
nothing to do and journals nothing. It never deletes a live image's file or
an object. When there is nothing to do it reads only a few rows and
directories: the boot waits for it.
"""

from __future__ import annotations

import os

from . import errors, mounts
from .damage import deployed_damage
from .fault import fault
from .journal import kinds
from .layout import new_id
from .linux import fsops
from .linux.beneath import open_dir_beneath
from .store import Store


class Recovery:
    def __init__(self, store: Store):
        self.store = store
        self.journal = store.journal
        self.actions: list[dict] = []
        self.problems: list[dict] = []
        self._tx = new_id()

    def act(self, event: kinds.EventData) -> None:
        """Journal one repair and list it (``effects.Report``)."""
        self.store.record(event, self._tx)
        self.actions.append({"kind": event.kind, "subject": event.subject, **event.to_data()})

    def problem(self, **fields) -> None:
        self.problems.append(fields)

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
            for effect in s.effects:
                effect.redo(self)
            self._unmount_staging()
            self._abort_dead_transactions()
            self._clear_staging_leftovers()
            self._reconcile_mounts()
            if self.actions:
                self._report_missing_objects()
            else:  # what the next boot needs, checked even when nothing else was wrong
                self.problems += deployed_damage(s, files=False)  # missing files: ImageFiles.redo
        return {"actions": self.actions, "problems": self.problems}

    def _verify_tail(self) -> None:
        """Check the hash chain from the last verified event to the end.

        The checkpoint (``ROOT/verified``: seq and hash) only saves work: a
        full check is ``journal verify``. A broken chain is reported, and
        recovery goes on, since refusing to boot helps nobody.
        """
        from .journal import ChainBroken

        mark = self.store.layout.verified
        try:
            seq_text, prev = mark.read_text().split()
            start = int(seq_text)
        except (OSError, ValueError):
            start, prev = 0, ""
        last = self.journal.last_seq()
        if start > last:
            self.problems.append({"problem": f"the journal ends at seq {last}, but seq {start} was "
                                             "verified before: committed events were lost", "seq": last + 1})
            self.act(kinds.RecoverEventsLost(subject="journal", verified_up_to=start, journal_ended_at=last))
            start, last = 0, self.journal.last_seq()
        try:
            if start:
                if self.journal.hash_at(start) != prev:
                    raise ChainBroken(start, "event differs from the one verified before")
            if last > start:
                self.journal.verify(after=start)
        except ChainBroken as e:
            self.problems.append({"problem": str(e), "seq": e.seq})
            return
        if last != start:
            self._write_mark(last)
            self._checkpoint()

    def _checkpoint(self) -> None:
        """A keyed checkpoint of the verified chain, when the journal key is there (docs/security.md)."""
        from . import checkpoints

        if not checkpoints.DEFAULT_KEY.exists():
            return
        try:
            checkpoints.add(self.store.root, self.journal, checkpoints.load_key(checkpoints.DEFAULT_KEY))
        except errors.AptLayerError as e:
            self.problems.append({"problem": f"no keyed checkpoint: {e}"})

    def _write_mark(self, seq: int) -> None:
        root = str(self.store.root)
        tmp = os.path.join(root, ".verified.tmp")  # one name: a recovery killed while writing it leaves no litter
        if os.path.lexists(tmp):
            fsops.unlink(tmp)
        fd = fsops.create(tmp, 0o644)
        try:
            fsops.write(fd, f"{seq} {self.journal.hash_at(seq) or ''}\n".encode(), 0)
            fsops.fsync(fd)
        finally:
            os.close(fd)
        fsops.rename(tmp, str(self.store.layout.verified))
        fsops.fsync_dir(root)

    # -- what the effects do not cover --------------------------------------------------

    def _report_missing_objects(self) -> None:
        s = self.store
        for image in self.journal.images():
            missing = s.absent(self.journal.manifest(image.digest))
            if missing:
                self.problem(problem=f"{len(missing)} objects missing", image=image.name, objects=missing)

    # -- transactions and staging ------------------------------------------------------

    def _unmount_staging(self) -> None:
        """Detach what a killed layering left mounted in staging (an image mounted writable there).

        No writer holds the lock, so every mount below ``staging/`` is stale;
        its record is then marked lost like any vanished mount.
        """
        prefix = str(self.store.layout.staging) + "/"
        with open("/proc/self/mountinfo", "rb") as f:
            if os.fsencode(prefix) not in f.read():
                return
        from .composefs.mount import unmount
        from .linux.mountinfo import mount_info

        stale = sorted({m.mount_point for m in mount_info() if m.mount_point.startswith(prefix)},
                       key=len, reverse=True)
        for mountpoint in stale:
            unmount(mountpoint, lazy=True)
            self.act(kinds.RecoverStagingUnmounted(subject=mountpoint))

    def _abort_dead_transactions(self) -> None:
        s = self.store
        for t, begun in self.journal.open_transactions():
            txid = t.id
            if t.explicit and begun.typed().boot_id == s.boot_id:
                continue
            why = "interrupted" if not t.explicit else "left open by an earlier boot"
            s.record(kinds.TxAborted(subject=txid, reason=f"recovery: transaction {why}"), txid)
            self.actions.append({"kind": "tx.aborted", "subject": txid, "reason": why})
            fault("recover.after-abort")
            s.clear_staging(txid)

    def _clear_staging_leftovers(self) -> None:
        """Remove staging no open transaction owns, and files an open one never staged.

        All through fds that follow no symlink (:meth:`Layout.opened`): a
        staging folder swapped for a link meanwhile fails the open, and its
        target is left alone.
        """
        s = self.store
        open_here = {s.staging_path(t.id).name: t.id for t in self.journal.transactions("open")}
        removed = []
        try:
            staging = s.layout.open_fd(s.staging_dir)
        except OSError as e:
            self.problem(problem=f"staging is not a directory apt-layer can use ({e.strerror}), left alone: "
                                 "replace it with a directory", path=str(s.staging_dir))
            return
        try:
            for name, kind in _entries(staging):
                if kind == "link":
                    self.problem(problem="symlink in staging, left alone: apt-layer never made it and never "
                                         "follows it; remove it by hand", path=str(s.staging_dir / name),
                                 target=os.readlink(name, dir_fd=staging))
                    continue
                tx = open_here.get(name)
                if tx is None or kind != "dir":
                    _remove_at(staging, name, kind)
                    removed.append(name)
                    continue
                keep = {os.path.basename(op.data.get("staged", "")) for op in self.journal.staged_ops(tx)
                        if op.op == "create" and op.effective_seq is None}
                folder = open_dir_beneath(staging, name)
                try:
                    unstaged = [(f, k) for f, k in _entries(folder) if f not in keep]
                    for f, k in unstaged:
                        _remove_at(folder, f, k)
                        removed.append(f"{name}/{f}")
                    if unstaged:
                        fsops.fsync(folder)
                finally:
                    os.close(folder)
            if removed:
                fsops.fsync(staging)
        finally:
            os.close(staging)
        for name in removed:
            self.act(kinds.RecoverStagingRemoved(subject=name))
            fault("recover.after-staging-removed")

    # -- mounts ----------------------------------------------------------------------------

    def _reconcile_mounts(self) -> None:
        rows = [(m.mountpoint, m.image, m.boot_id) for m in self.journal.mounts("mounted")]
        if not rows:
            return
        # ctypes: only when there are mounts to check
        from .composefs.mount import composefs_mount_points_elsewhere, is_composefs
        from .linux.mountinfo import mount_info

        from .linux.nsfs import NamespaceUnreadable

        present = {m.mount_point for m in mount_info() if is_composefs(m)}
        elsewhere = None
        for mountpoint, image, boot in rows:
            if boot == self.store.boot_id and mountpoint not in present:
                if elsewhere is None:
                    try:
                        elsewhere = composefs_mount_points_elsewhere()
                    except NamespaceUnreadable as e:
                        # a namespace whose mounts are unknown may hold this one: not lost
                        self.problem(problem=f"{e}; mounts of this boot are not checked", image=image)
                        elsewhere = set()
                        present.update(m for m, _, b in rows if b == self.store.boot_id)
                if mountpoint in elsewhere:
                    present.add(mountpoint)
            if boot == self.store.boot_id and mountpoint in present:
                continue
            reason = "not mounted" if boot == self.store.boot_id else "mounted in an earlier boot"
            self.store.record(kinds.MountLost(subject=image, mountpoint=mountpoint, reason=reason), self._tx)
            self.actions.append({"kind": "mount.lost", "subject": image, "mountpoint": mountpoint})


def _entries(dir_fd: int) -> list[tuple[str, str]]:
    """(name, "dir" | "link" | "file") of a directory's entries, sorted; nothing is followed."""
    with os.scandir(dir_fd) as it:
        found = [(e.name, "link" if e.is_symlink() else "dir" if e.is_dir(follow_symlinks=False) else "file")
                 for e in it]
    return sorted(found)


def _remove_at(dir_fd: int, name: str, kind: str) -> None:
    if kind == "dir":
        fsops.remove_tree_at(dir_fd, name)
    else:
        fsops.unlink_at(dir_fd, name)


def recover(store: Store) -> dict:
    return Recovery(store).run()


def mount_deployment(store: Store, target: str) -> dict:
    """Mount the current deployment on ``target`` (for ``recover --boot``)."""
    current = store.journal.deployments().get("current")
    if current is None:
        return {"mounted": None, "reason": "nothing deployed"}
    from .linux.mountinfo import is_mounted

    if is_mounted(target):
        return {"mounted": None, "reason": f"{target} is already mounted"}
    os.makedirs(target, exist_ok=True)
    result = mounts.mount(store, current.image, target, readonly=True, boot=True)
    return {"mounted": current.image, "mountpoint": result["mountpoint"]}
