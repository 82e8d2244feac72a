"""Recovery: bring the store back to what the journal says, after a crash or at boot.

The journal is the truth. Recovery, holding the store lock exclusively (so no
writer is mid-operation):

1. brings the projection up to the last event (SQLite has already dropped
   any torn WAL tail) and checks the hash chain of the events since the last
   verified one (``journal verify`` checks all);
2. redoes the effects of committed events: an image still in staging is
   renamed into ``images/``, a deleted image's file is unlinked, the
   deployment links are made to match;
3. aborts transactions that never committed: every open implicit one (its
   command is gone, or it would hold the lock) and explicit ones from an
   earlier boot; their staging goes, as does any staging no open
   transaction owns;
4. marks recorded mounts that no longer exist as lost;
5. reports live images whose file is missing or has the wrong size, and
   image files nobody knows.

Every action is journaled as a ``recover.*`` event, so a second run finds
nothing to do and journals nothing. It never deletes a live image's file or
an object. When there is nothing to do it reads only a few rows and
directories: the boot waits for it.
"""

from __future__ import annotations

import os
import shutil

from .composefs import fsops
from .fault import fault
from .store import IMAGE_SUFFIX, Store, new_tx_id


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
        self.store._append(kind, subject, data, self._tx)
        self.actions.append({"kind": kind, "subject": subject, **data})

    def run(self) -> dict:
        s = self.store
        with s.exclusive():
            caught_up = self.journal.catch_up()
            self._verify_tail()
            if caught_up:
                self.actions.append({"kind": "projection.caught-up", "subject": "journal", "events": caught_up})
            self._redo_images()
            self._abort_dead_transactions()
            self._clear_orphan_staging()
            self._redo_deployments()
            self._reconcile_mounts()
        return {"actions": self.actions, "problems": self.problems}

    def _verify_tail(self) -> None:
        """Check the hash chain from the last verified event to the end.

        The checkpoint (``ROOT/verified``: seq and hash) only saves work: a
        full check is ``journal verify``. A broken chain is reported, and
        recovery goes on, since refusing to boot helps nobody.
        """
        from .journal import ChainBroken, chain_hash

        mark = self.store.root / "verified"
        try:
            seq_text, prev = mark.read_text().split()
            start = int(seq_text)
        except (OSError, ValueError):
            start, prev = 0, "00" * 32
        last = self.journal.last_seq()
        if last == start:
            return
        if last < start:
            start, prev = 0, "00" * 32
        expected = start + 1
        try:
            if start:
                row = self.journal.conn.execute("SELECT hash FROM events WHERE seq = ?", (start,)).fetchone()
                if row is None or row[0] != prev:
                    raise ChainBroken(start, "event differs from the one verified before")
            for seq, at, tx, kind, subject, data, actor, digest in self.journal.conn.execute(
                    "SELECT seq, at, tx, kind, subject, data, actor, hash FROM events WHERE seq > ? ORDER BY seq",
                    (start,)):
                if seq != expected:
                    raise ChainBroken(expected, "event missing")
                if chain_hash(prev, seq, at, tx, kind, subject, data, actor) != digest:
                    raise ChainBroken(seq, "hash does not match: event edited, reordered or inserted")
                prev, expected = digest, seq + 1
        except ChainBroken as e:
            self.problems.append({"problem": str(e), "seq": e.seq})
            return
        tmp = mark.with_name(f".verified.tmp-{os.getpid()}")
        tmp.write_text(f"{expected - 1} {prev}\n")
        os.replace(tmp, mark)

    # -- images ---------------------------------------------------------------------

    def _redo_images(self) -> None:
        s = self.store
        live = {name: (digest, size, created_seq) for name, digest, size, created_seq in
                self.journal.conn.execute("SELECT name, digest, size, created_seq FROM images")}
        for name, (digest, size, created_seq) in sorted(live.items()):
            path = s.image_path(name)
            try:
                st = path.stat()
            except FileNotFoundError:
                st = None
            if st is not None and st.st_size == size:
                continue
            staged = self._staged_file(created_seq)
            if staged is not None and staged.exists() and staged.stat().st_size == size:
                s.place_image(name, digest, staged)
                fault("recover.after-place")
                self._record("recover.image-placed", name, {"digest": digest, "from": str(staged.relative_to(s.root))})
            elif st is None:
                self.problems.append({"problem": "image file missing", "image": name, "path": str(path)})
            else:
                self.problems.append({"problem": "image file has the wrong size", "image": name,
                                      "path": str(path), "expected": size, "found": st.st_size})
        files = {e.name[: -len(IMAGE_SUFFIX)] for e in os.scandir(s.images_dir)
                 if e.name.endswith(IMAGE_SUFFIX) and e.is_file(follow_symlinks=False)}
        for name in sorted(files - set(live)):
            last = self.journal.conn.execute(
                "SELECT kind FROM events WHERE subject = ? AND kind IN ('image.created', 'image.deleted') "
                "ORDER BY seq DESC LIMIT 1", (name,)).fetchone()
            if last is not None and last[0] == "image.deleted":
                s.remove_image_file(name)
                fault("recover.after-unlink")
                self._record("recover.image-unlinked", name, {})
            else:
                self.problems.append({"problem": "unknown image file", "image": name,
                                      "path": str(s.image_path(name))})

    def _staged_file(self, created_seq: int):
        row = self.journal.conn.execute("SELECT data FROM events WHERE seq = ?", (created_seq,)).fetchone()
        if row is None:
            return None
        import json

        staged = json.loads(row[0]).get("staged")
        return self.store.root / staged if staged else None

    # -- transactions and staging ------------------------------------------------------

    def _abort_dead_transactions(self) -> None:
        s = self.store
        rows = self.journal.conn.execute(
            "SELECT t.id, t.explicit, e.data FROM transactions t JOIN events e ON e.seq = t.begun_seq "
            "WHERE t.state = 'open'").fetchall()
        import json

        for txid, explicit, data in rows:
            boot = _boot_of(json.loads(data))
            if explicit and boot == s.boot_id:
                continue
            why = "interrupted" if not explicit else "left open by an earlier boot"
            s._append("tx.aborted", txid, {"reason": f"recovery: transaction {why}"}, txid)
            self.actions.append({"kind": "tx.aborted", "subject": txid, "reason": why})
            fault("recover.after-abort")
            s._clear_staging(txid)

    def _clear_orphan_staging(self) -> None:
        s = self.store
        open_here = {f"{s.boot_id}-{t}" for (t,) in self.journal.conn.execute(
            "SELECT id FROM transactions WHERE state = 'open'")}
        for entry in sorted(os.scandir(s.staging_dir), key=lambda e: e.name):
            if entry.name in open_here:
                continue
            shutil.rmtree(entry.path, ignore_errors=True)
            self._record("recover.staging-removed", entry.name, {})
        if self.actions:
            fsops.fsync_dir(str(s.staging_dir))

    # -- deployments and mounts ------------------------------------------------------------

    def _redo_deployments(self) -> None:
        changed = self.store.sync_deployments()
        if changed:
            self._record("recover.deploy-synced", "deploy", {"slots": changed})

    def _reconcile_mounts(self) -> None:
        from .composefs.mount import mount_info

        rows = self.journal.conn.execute(
            "SELECT mountpoint, image, boot_id FROM mounts WHERE state = 'mounted'").fetchall()
        if not rows:
            return
        present = {m.mountpoint for m in mount_info() if m.is_composefs}
        for mountpoint, image, boot in rows:
            if boot == self.store.boot_id and mountpoint in present:
                continue
            self.store._append("mount.lost", image, {"mountpoint": mountpoint,
                                                     "reason": "not mounted" if boot == self.store.boot_id
                                                     else "mounted in an earlier boot"}, self._tx)
            self.actions.append({"kind": "mount.lost", "subject": image, "mountpoint": mountpoint})


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
