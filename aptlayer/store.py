"""The Store: the one place where an operation becomes events and file effects.

It joins the journal (events, manifests, projection) with what is on disk,
following the write-ahead rule of ``docs/architecture.md``: the event that
makes an effect necessary is durable before the effect starts, and every
effect is idempotent so recovery can redo it. Nothing live changes before a
transaction's commit event. Building an image is the builder's job
(:mod:`aptlayer.builder`), the paths are the layout's (:mod:`aptlayer.layout`),
the file effects are :mod:`aptlayer.effects`'; the Store validates, records,
and orders them.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from . import errors, names, permissions
from .bootable import refuse_unbootable
from .builder import Builder, CreateOptions, Delta, Outcome, SameAs, Source, source_for
from .effects import EFFECTS, DeployLinks, ImageFiles, clear_staging
from .fault import fault
from .journal import (RECORDED, Derived, Journal, JournalCorruptError, JournalStorageError, JournalVersionError,
                      ProjectionError, kinds)
from .layout import Layout, new_id
from .linux import fsops
from .linux.fanout import missing_files
from .lock import LockTimeout, locked

__all__ = ["CreateOptions", "Store"]


class Store:
    """An apt-layer store at ``root``. Open with :meth:`Store.open`."""

    def __init__(self, layout: Layout, journal: Journal, config=None):
        self.layout = layout
        self.root = layout.root
        self.journal = journal
        self.config = config
        self.boot_id = names.boot_id()
        self.images_dir, self.objects_dir = layout.images, layout.objects
        self.staging_dir, self.deploy_dir, self.trash_dir = layout.staging, layout.deploy, layout.trash
        self.lock_path = layout.lock
        self.effects = [effect(layout, journal) for effect in EFFECTS]
        self.image_files = next(e for e in self.effects if isinstance(e, ImageFiles))
        self.links = next(e for e in self.effects if isinstance(e, DeployLinks))
        self.builder = Builder(layout.objects, layout.cache_file, layout.image, known=journal)

    # --- opening --------------------------------------------------------------

    @classmethod
    def open(cls, root: str | os.PathLike, config=None, create: bool = True, write: bool = True) -> Store:
        """Open the store at ``root``; without ``create``, NotFound if there is none.

        With ``write`` (a command that may change the store), the store and
        its parents must be safe (:mod:`aptlayer.permissions`: exit 11
        otherwise). Without it, the journal is opened read-only when the
        caller is not root, so the read-only commands work for any user who
        can read it.
        """
        if not os.fspath(root):
            raise errors.InvalidInput("the store's root must not be an empty path")
        os.umask(0o022)  # every file apt-layer makes gets the mode it asks for, whatever the caller's umask
        layout = Layout(Path(root).absolute())
        if not create and not layout.exists():
            raise errors.NotFound(f"no apt-layer store at {layout.root} (check --root, APT_LAYER_ROOT or the "
                                  "configuration's root; `apt-layer image create` makes a new store)")
        if write:
            _refuse_unsafe(permissions.check_parents(layout.root))
        readonly = not write and os.geteuid() != 0
        try:
            if not readonly:
                layout.prepare()
        except OSError as e:
            raise errors.from_os_error(e, f"cannot create store at {layout.root}") from None
        if write:
            _refuse_unsafe(permissions.check_store(layout.root, *layout.guarded))
        try:
            journal = Journal.open(layout.journal, readonly=readonly)
        except JournalVersionError as e:
            raise errors.StoreVersionError(str(e)) from None
        except JournalCorruptError as e:
            raise errors.StoreCorrupt(str(e)) from None
        except JournalStorageError as e:
            raise errors.from_journal_storage(e.reason, str(e), str(layout.journal)) from None
        except OSError as e:
            raise errors.from_os_error(e, str(layout.journal)) from None
        return cls(layout, journal, config)

    def close(self) -> None:
        self.journal.close()

    # --- locking ----------------------------------------------------------------

    @contextmanager
    def writing(self) -> Iterator[None]:
        """Writers share the store lock; gc and recovery wait for them to finish."""
        with self._journal_errors(), self._lock(exclusive=False):
            yield

    @contextmanager
    def publishing(self) -> Iterator[None]:
        """One writer at a time from its commit event to the end of its effects.

        Writers build side by side under the shared store lock, but the
        effects that follow a commit act on names (``images/NAME.composefs``,
        ``deploy/*``) that a second writer's commit may have given new
        meaning: a delete's unlink after a create of the same name committed,
        or two deploys writing links from different projections. Holding this
        lock from reading the state an event is computed from to the last
        effect makes each commit-and-effects step happen as one. Taken inside
        the shared store lock, never inside an SQLite transaction.
        """
        with locked(self.layout.publish_lock, exclusive=True):
            yield

    @contextmanager
    def exclusive(self, timeout: float | None = None) -> Iterator[None]:
        try:
            with self._journal_errors(), self._lock(exclusive=True, timeout=timeout):
                yield
        except LockTimeout:
            raise errors.Conflict("the store is busy (another apt-layer holds its lock)") from None

    @contextmanager
    def _lock(self, exclusive: bool, timeout: float | None = None) -> Iterator[None]:
        """The store lock; failing to open the lock file (not root) is a one-line error."""
        held = False
        try:
            with locked(self.layout.lock, exclusive=exclusive, timeout=timeout):
                held = True
                yield
        except OSError as e:
            if held:
                raise
            raise errors.from_os_error(e, f"cannot lock the store ({self.layout.lock})") from None

    @contextmanager
    def _journal_errors(self) -> Iterator[None]:
        """A journal write refused by SQLite (read-only, full disk) is a one-line error."""
        try:
            yield
        except JournalStorageError as e:
            raise errors.from_journal_storage(e.reason, str(e), self.journal.path) from None

    # --- paths and small helpers --------------------------------------------------

    def image_path(self, name: str) -> Path:
        return self.layout.image(name)

    def staging_path(self, tx: str) -> Path:
        return self.layout.staging_dir(self.boot_id, tx)

    def record(self, event: kinds.EventData, tx: str | None = None, manifest=None):
        """Append one typed event in its own SQLite transaction, under apt-layer
        transaction ``tx`` (a fresh id if None); an event the projection
        refuses is a Conflict."""
        try:
            return self.journal.append_event(event, tx or new_id(), manifest=manifest)
        except ProjectionError as e:
            raise errors.Conflict(str(e)) from None

    def _live(self, name: str):
        image = self.journal.image(name)
        if image is None:
            raise errors.NotFound(f"no image named {name!r}")
        return image

    def _open_tx(self, tx: str) -> None:
        state = self.journal.transaction_state(tx)
        if state is None:
            raise errors.NotFound(f"no transaction {tx!r}")
        if state != "open":
            raise errors.Conflict(f"transaction {tx} is {state}")

    def check_name_free(self, name: str, tx: str | None = None) -> None:
        names.check_new_image_name(name)
        if self.journal.image(name) is not None:
            staged_delete = tx is not None and any(
                op.op == "delete" and op.name == name for op in self.journal.staged_ops(tx))
            if not staged_delete:
                raise errors.Conflict(f"an image named {name!r} exists")
        other = self.journal.staging_tx_of(name)
        if other is not None:
            raise errors.Conflict(f"an image named {name!r} is staged in open transaction {other}")

    def _in_use(self, name: str) -> None:
        for slot, dep in self.journal.deployments().items():
            if dep.image == name:
                hint = ("deploy another image first" if slot == "current" else
                        "`apt-layer cleanup -r` drops the rollback deployment")
                raise errors.Conflict(f"image {name!r} is the {slot} deployment; {hint}")
        self._not_mounted(name)

    def _not_mounted(self, name: str) -> None:
        mounted = self.journal.mounts_of(name)
        if mounted:
            raise errors.Conflict(f"image {name!r} is mounted at {mounted[0]}; unmount it first")

    def absent(self, rows) -> list[str]:
        """The objects of the (object, size) rows that the digest store lacks."""
        return missing_files(str(self.layout.objects), (obj for obj, _ in rows))

    def _whole(self, name: str, digest: str) -> None:
        """Refuse to deploy an image the digest store cannot back: its next boot would fail."""
        missing = len(self.absent(self.journal.manifest(digest)))
        if missing:
            raise errors.StoreCorrupt(
                f"image {name!r} cannot be deployed: {missing} of its objects are missing from the store "
                f"(see `apt-layer image missing-objects {name}`)")

    # --- create -------------------------------------------------------------------

    def create(self, source: str | Source, name: str, options: CreateOptions = CreateOptions(),
               tx: str | None = None, progress: Callable | None = None, about: dict | None = None,
               also: tuple[kinds.EventData, ...] = ()) -> dict:
        """Build image ``name`` from a directory (or a dump with ``from_file``, or a given source).

        ``about`` adds what the event should say of the image's making
        (``origin``: a bootstrap or an import; ``lineage``: base and request);
        ``also`` are events recorded with ``image.created``, in its SQLite
        transaction (``image.pulled``; not for a staged create).

        Objects go into the digest store as they are read; the image is
        written into the transaction's staging folder; then one SQLite
        transaction records the image and its manifest (and, without ``tx``,
        commits); only then is the image renamed into ``images/``.
        """
        names.check_new_image_name(name)
        if also and tx is not None:
            raise errors.InvalidInput("this image cannot be staged in a transaction")
        src = source_for(source, options.from_file) if isinstance(source, str) else source
        with self.writing():
            if tx is not None:
                self._open_tx(tx)
            self.check_name_free(name, tx)
            implicit = tx is None
            txid = tx or new_id()
            if implicit:
                self.record(kinds.TxBegun(subject=txid, explicit=False, boot_id=self.boot_id, op="create",
                                          name=name), txid)
            try:  # from the begin on: an interrupt (Ctrl-C) anywhere after it aborts the transaction
                fault("create.after-begin")
                built = self._build(src, name, txid, options, progress)
            except BaseException as e:
                if implicit:
                    self._abort(txid, reason=str(e) or type(e).__name__)
                if isinstance(e, OSError):
                    raise errors.from_os_error(e, f"creating image {name!r}") from None
                raise
            manifest = _journal_manifest(built.manifest)
            missing = len(self.absent(manifest)) if options.from_file else 0
            data = dict(digest=built.digest, size=built.size, staged=self.layout.relative(built.staged),
                        source=src.recorded_as, objects=built.objects, reused=built.reused,
                        patched=kinds.Patched(built.patched_from, built.changed) if built.patched_from else None,
                        layered=built.provenance().get("layered"), **(about or {}))
            if not implicit:
                self.record(kinds.ImageStaged(subject=name, **data), txid, manifest=manifest)
                fault("create.after-stage")
                return built.report(name, txid, staged=True, missing=missing)
            with self.publishing():
                try:
                    with self.journal.transaction() as w:
                        w.append_event(kinds.ImageCreated(subject=name, **data), txid, manifest=manifest)
                        for event in also:
                            w.append_event(event, txid)
                        fault("create.mid-commit")
                        w.append_event(kinds.TxCommitted(subject=txid, ops=1), txid)
                except ProjectionError as e:
                    self._abort(txid, reason=str(e))
                    raise errors.Conflict(str(e)) from None
                fault("create.after-commit")
                self.image_files.place(name, built.staged)
                fault("create.after-place")
            self.clear_staging(txid)
            return built.report(name, txid, staged=False, missing=missing)

    def _build(self, source, name: str, tx: str, options: CreateOptions, progress) -> Outcome:
        """Objects into the store, the image into the transaction's staging folder."""
        staging = self.staging_path(tx)
        if not staging.is_dir():
            fsops.mkdir(str(staging), 0o755)
            fsops.fsync_dir(str(self.layout.staging))
        return self.builder.build(source, self.layout.new_staged_image(staging), options, progress,
                                  what=f"creating image {name!r}")

    # --- effects and staging ---------------------------------------------------------

    def apply_effects(self, events) -> None:
        """Carry out the file effects of committed events (in order)."""
        for effect in self.effects:
            effect.apply(events)

    def clear_staging(self, tx: str) -> list[str]:
        """Remove the staging folders of ``tx`` (see :func:`effects.clear_staging`)."""
        return clear_staging(self.layout, tx)

    def _abort(self, tx: str, reason: str) -> list[str]:
        """Record ``tx.aborted`` and drop the transaction's staged work.

        On a full disk the staged work goes first, to make room for the event.
        Returns what :meth:`clear_staging` left alone.
        """
        if self.journal.transaction_state(tx) == "open":
            aborted = kinds.TxAborted(subject=tx, reason=reason[:500])
            try:
                self.record(aborted, tx)
            except JournalStorageError as e:
                if e.reason != "full":
                    raise
                self.clear_staging(tx)
                self.record(aborted, tx)
        fault("abort.after-event")
        return self.clear_staging(tx)

    # --- delete, deploy, rollback ----------------------------------------------------

    def delete(self, name: str, tx: str | None = None) -> dict:
        """Delete image ``name``; refused while it is deployed or mounted.

        Staged in a transaction, its deployments are checked at the commit,
        against the slots the transaction leaves: a transaction that deploys
        another image may delete the one it replaces (see :meth:`tx_commit`).
        """
        names.check_image_name(name)
        with self.writing():
            image = self._live(name)
            if tx is None:
                self._in_use(name)
            else:
                self._not_mounted(name)
                self._open_tx(tx)
                self.record(kinds.DeleteStaged(subject=name, digest=image.digest), tx)
                fault("delete.after-stage")
                return {"name": name, "digest": image.digest, "tx": tx, "staged": True}
            with self.publishing():
                # Checked again inside the write transaction: a deploy or mount
                # committed since the check above must win over this delete.
                events = self._single(kinds.ImageDeleted(subject=name, digest=image.digest), op="delete",
                                      check=lambda: self._in_use(name))
                fault("delete.after-commit")
                self.apply_effects(events)
            return {"name": name, "digest": image.digest, "tx": events[0].tx, "staged": False}

    def _single(self, event: kinds.EventData, op: str, check: Callable[[], None] | None = None) -> list:
        """One operation as its own transaction: begun, the event, committed, atomically.

        ``check`` runs inside the SQLite write transaction (which excludes
        other writers), so what it reads cannot change before the commit.
        """
        txid = new_id()
        try:
            with self.journal.transaction() as w:
                if check is not None:
                    check()
                w.append_event(kinds.TxBegun(subject=txid, explicit=False, boot_id=self.boot_id, op=op,
                                             name=event.subject), txid)
                ev = w.append_event(event, txid)
                fault(f"{op}.mid-commit")
                w.append_event(kinds.TxCommitted(subject=txid, ops=1), txid)
        except ProjectionError as e:
            raise errors.Conflict(str(e)) from None
        return [ev]

    def deploy(self, name: str, tx: str | None = None) -> dict:
        """Make ``name`` what the next boot mounts; the current one becomes previous."""
        names.check_image_name(name)
        with self.writing():
            if tx is not None:
                self._open_tx(tx)
                pending = [op for op in self.journal.staged_ops(tx) if op.effective_seq is None]
                staged = [op for op in pending if op.op == "create" and op.name == name]
                digest = staged[-1].digest if staged else self._live(name).digest
                self._whole(name, digest)
                # One deploy per transaction: the last one staged. An earlier one is withdrawn in the same
                # SQLite transaction (a second deployed event would make the first image the rollback
                # target without it ever being booted).
                try:
                    with self.journal.transaction() as w:
                        for op in pending:
                            if op.op == "deploy":
                                w.append_event(kinds.DeployUnstaged(subject=op.name, digest=op.digest), tx)
                        w.append_event(kinds.DeployStaged(subject=name, digest=digest), tx)
                except ProjectionError as e:
                    raise errors.Conflict(str(e)) from None
                fault("deploy.after-stage")
                current = self.journal.deployments().get("current")
                return {"current": name, "digest": digest, "previous": current.image if current else None,
                        "tx": tx, "staged": True}
            with self.publishing():
                image = self._live(name)
                current = self.journal.deployments().get("current")
                if current is not None and current.image == name and current.digest == image.digest:
                    raise errors.Conflict(f"image {name!r} is already the current deployment")
                self._whole(name, image.digest)
                refuse_unbootable(self.image_path(name), name)
                events = self._single(kinds.Deployed(subject=name, current=kinds.Slot(name, image.digest),
                                                     previous=_slot(current)), op="deploy")
                fault("deploy.after-commit")
                self.apply_effects(events)
            return {"current": name, "digest": image.digest,
                    "previous": current.image if current else None, "tx": events[0].tx, "staged": False}

    def rollback(self) -> dict:
        """Swap the current and previous deployments, like ``rpm-ostree rollback``."""
        with self.writing(), self.publishing():
            deps = self.journal.deployments()
            if "previous" not in deps:
                raise errors.Conflict("no previous deployment to roll back to")
            previous, current = deps["previous"], deps.get("current")
            self._whole(previous.image, previous.digest)
            events = self._single(kinds.RolledBack(subject=previous.image, current=_slot(previous),
                                                   previous=_slot(current)), op="rollback")
            fault("rollback.after-commit")
            self.apply_effects(events)
            # as deploy reports it: the slots after the change
            return {"current": previous.image, "digest": previous.digest,
                    "previous": current.image if current else None, "tx": events[0].tx, "staged": False}

    def cleanup(self, *, rollback: bool = False, staged: bool = False) -> dict:
        """Drop the rollback deployment (``rollback``, like ``rpm-ostree cleanup -r``) and withdraw the
        deploys staged in open transactions (``staged``, like ``-p``). The images stay: ``image
        delete`` and ``gc`` take them after."""
        result: dict = {"undeployed": None, "unstaged": []}
        with self.writing(), self.publishing():
            if rollback:
                previous = self.journal.deployments().get("previous")
                if previous is not None:
                    events = self._single(kinds.Undeployed(subject=previous.image, slot="previous",
                                                           digest=previous.digest), op="cleanup")
                    fault("cleanup.after-commit")
                    self.apply_effects(events)
                    result["undeployed"] = {"image": previous.image, "digest": previous.digest}
            if staged:
                for t in (t for t in self.journal.transactions("open") if t.explicit):
                    for op in self.journal.staged_ops(t.id):
                        if op.op == "deploy" and op.effective_seq is None:
                            self.record(kinds.DeployUnstaged(subject=op.name, digest=op.digest), t.id)
                            result["unstaged"].append({"tx": t.id, "image": op.name, "digest": op.digest})
        return result

    # --- explicit transactions -----------------------------------------------------------

    def tx_begin(self, op: str | None = None, name: str | None = None) -> str:
        """Open a transaction: explicit (``tx begin``), or, given ``op``, the implicit one of a
        command made of several steps (``install``), which recovery aborts if its process dies."""
        txid = new_id()
        with self.writing():
            self.record(kinds.TxBegun(subject=txid, explicit=op is None, boot_id=self.boot_id, op=op, name=name),
                        txid)
        return txid

    def tx_commit(self, tx: str) -> dict:
        """Make every staged operation of ``tx`` effective at once, then do the effects."""
        with self.writing():
            self._open_tx(tx)
            with self.publishing():
                try:
                    with self.journal.transaction() as w:
                        events = w.commit_tx(tx, closing=self._staged_deletes_unused(tx))
                except (ProjectionError, errors.Conflict) as e:
                    raise errors.Conflict(f"cannot commit {tx}: {e}; the transaction stays open "
                                          f"(`apt-layer tx rollback {tx}` discards it)") from None
                fault("commit.after-commit")
                self.apply_effects(events)
                fault("commit.after-effects")
            self.clear_staging(tx)
            ops = [e for e in events if e.kind != "tx.committed"]
            return {"tx": tx, "ops": [{"kind": e.kind, "subject": e.subject} for e in ops]}

    def _staged_deletes_unused(self, tx: str) -> list[kinds.EventData]:
        """Check the staged deletes against the deployments ``tx`` leaves; the events that drop
        what it both replaces and deletes.

        A deleted image may not stay the current deployment, nor be mounted.
        One that the transaction's deploy pushes into the previous slot (or
        out of both) is what it replaces: the commit drops the previous slot
        (an ``undeployed`` event) rather than leave a rollback target that
        no longer exists. Called inside the commit's SQLite transaction, so
        no deploy or mount slips in between.
        """
        ops = [op for op in self.journal.staged_ops(tx) if op.effective_seq is None]
        slots = dict(self.journal.deployments())
        replaced = slots.get("current")
        deploys = [op for op in ops if op.op == "deploy"]  # at most one (see deploy)
        for op in deploys:
            if "current" in slots:
                slots["previous"] = slots["current"]
            slots["current"] = kinds.Slot(op.name, op.digest)
        closing: list[kinds.EventData] = []
        for op in ops:
            if op.op != "delete":
                continue
            self._not_mounted(op.name)
            current, previous = slots.get("current"), slots.get("previous")
            if current is not None and current.image == op.name:
                raise errors.Conflict(f"image {op.name!r} {'would still be' if deploys else 'is'} the current "
                                      f"deployment; stage a deploy of another image in {tx} first")
            if previous is None or previous.image != op.name:
                continue
            if not deploys or replaced is None or replaced.image != op.name:
                raise errors.Conflict(f"image {op.name!r} is the previous deployment; `apt-layer cleanup -r` "
                                      "drops the rollback deployment")
            if not closing:
                closing.append(kinds.Undeployed(subject=op.name, slot="previous", digest=previous.digest))
        return closing

    def tx_rollback(self, tx: str, reason: str = "rolled back by request") -> dict:
        with self.writing():
            self._open_tx(tx)
            ops = self.journal.staged_ops(tx)
            left = self._abort(tx, reason=reason)
            result = {"tx": tx, "discarded": [{"op": o.op, "name": o.name} for o in ops]}
            if left:
                result["left_in_staging"] = left
            return result

    # --- reading ----------------------------------------------------------------------------

    def image_file(self, name: str) -> Path:
        self._live(name)
        path = self.image_path(name)
        if not path.exists():
            raise errors.StoreCorrupt(f"image {name!r}: file {path} is missing (run apt-layer recover)")
        return path

    def missing_objects(self, name: str) -> list[str]:
        """Objects the image's manifest lists that are not in the digest store."""
        return self.absent(self.journal.manifest(self._live(name).digest))


def _refuse_unsafe(found: list[permissions.Unsafe]) -> None:
    """Exit 11 on the first unsafe path, in one line with its fix."""
    if found:
        more = f" (and {len(found) - 1} more: `apt-layer fsck` lists them)" if len(found) > 1 else ""
        raise errors.UnsafePermissions(f"unsafe permissions: {found[0]}{more}")


def _slot(deployment) -> kinds.Slot | None:
    """A deployment as events name it."""
    return kinds.Slot(deployment.image, deployment.digest) if deployment is not None else None


def _journal_manifest(manifest):
    """The builder's manifest in the journal's terms."""
    if isinstance(manifest, SameAs):
        return RECORDED
    if isinstance(manifest, Delta):
        return Derived(manifest.base, manifest.removed, manifest.added)
    return manifest
