"""The Store: the one place where an operation becomes events and file effects.

It joins the journal (events, manifests, projection) with the composefs layer
(digest store, image writer and reader, mounts), following the write-ahead
rule of ``docs/architecture.md``: the event that makes an effect necessary is
durable before the effect starts, and every effect is idempotent so recovery
can redo it. Nothing live changes before a transaction's commit event.

Layout of a store root::

    journal.db                  the event journal (SQLite, WAL, synchronous=FULL)
    images/NAME.composefs       one file per live image
    images/objects/xx/yyyy...   the digest store shared by all images
    staging/BOOTID-TX/          work of transaction TX in flight
    deploy/current, previous    symlinks into images/, swapped by rename
    trash/                      objects on their way out (gc)
    lock                        flock: writers shared, gc and recovery exclusive
    publish.lock                flock: one writer at a time commits and does its effects
"""

from __future__ import annotations

import dataclasses
import errno
import os
import sqlite3
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from . import errors, names
from .composefs import fsops
from .fault import fault
from .journal import RECORDED, Derived, Journal, JournalCorruptError, JournalVersionError, ProjectionError
from .lock import LockTimeout, locked

IMAGE_SUFFIX = ".composefs"
#: a build patches the last image only if at most 1/PATCH_MAX_SHARE of the entries changed;
#: past that, reading them one by one costs more than a scan that skips unchanged ones
PATCH_MAX_SHARE = 10


def new_tx_id() -> str:
    """16 random hex digits (``uuid`` would cost a few ms of import at boot)."""
    return os.urandom(8).hex()


@dataclass(frozen=True)
class CreateOptions:
    """How ``image create`` reads its source (mkcomposefs's options)."""

    from_file: bool = False
    use_epoch: bool = False
    skip_devices: bool = False
    skip_xattrs: bool = False
    user_xattrs: bool = False
    min_version: int = 0
    max_version: int = 1
    threads: int = os.cpu_count() or 1
    backend: str = "auto"


def _map_os_error(e: OSError, what: str) -> errors.AptLayerError:
    if e.errno == errno.ENOSPC or e.errno == errno.EDQUOT:
        return errors.NoSpace(f"{what}: no space left on device")
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return errors.PermissionDenied(f"{what}: {e.strerror}")
    if e.errno == errno.ENOENT:
        return errors.NotFound(f"{what}: {e.strerror}")
    return errors.AptLayerError(f"{what}: {e.strerror or e}")


#: errors writing into the store (not reading the source): full disk, read-only store
_STORE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS)
#: why a hard link may fail where a copy works: no hard links on this file system
#: (EPERM, EOPNOTSUPP), another file system, or the file's link count at its limit
_NO_LINK_ERRNOS = (errno.EPERM, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK)


def _os_error_behind(e: BaseException) -> OSError | None:
    """The OSError a wrapped error (BuildError <- ScanError <- OSError) came from, if any."""
    seen = 0
    while e is not None and seen < 8:
        if isinstance(e, OSError):
            return e
        e = e.__cause__ or e.__context__
        seen += 1
    return None


def _map_sqlite_error(e: sqlite3.OperationalError, what: str) -> errors.AptLayerError:
    """SQLite's refusals (read-only file, full disk, busy) as the errors they are."""
    name = getattr(e, "sqlite_errorname", "")
    if name.startswith(("SQLITE_READONLY", "SQLITE_CANTOPEN", "SQLITE_PERM", "SQLITE_AUTH")):
        return errors.PermissionDenied(f"{what}: {e} (not writable by uid {os.geteuid()}; run as root?)")
    if name.startswith("SQLITE_FULL"):
        return errors.NoSpace(f"{what}: no space left on device")
    if name.startswith(("SQLITE_BUSY", "SQLITE_LOCKED")):
        return errors.Conflict(f"{what}: the journal is busy (another apt-layer is writing)")
    return errors.AptLayerError(f"{what}: {e}")


class Store:
    """An apt-layer store at ``root``. Open with :meth:`Store.open`."""

    def __init__(self, root: Path, journal: Journal, config=None):
        self.root = root
        self.journal = journal
        self.config = config
        self.images_dir = root / "images"
        self.objects_dir = self.images_dir / "objects"
        self.staging_dir = root / "staging"
        self.deploy_dir = root / "deploy"
        self.trash_dir = root / "trash"
        self.lock_path = root / "lock"
        self.publish_lock_path = root / "publish.lock"
        self.boot_id = names.boot_id()

    # --- opening --------------------------------------------------------------

    @classmethod
    def open(cls, root: str | os.PathLike, config=None, create: bool = True) -> Store:
        """Open the store at ``root``; without ``create``, NotFound if there is none."""
        if not os.fspath(root):
            raise errors.InvalidInput("the store's root must not be an empty path")
        root = Path(root).absolute()
        if not create and not (root / "journal.db").is_file():
            raise errors.NotFound(f"no apt-layer store at {root} (check --root, APT_LAYER_ROOT or the "
                                  "configuration's root; `apt-layer image create` makes a new store)")
        try:
            for d in (root, root / "images", root / "images" / "objects", root / "staging",
                      root / "deploy", root / "trash"):
                if d != root and d.is_symlink():
                    raise errors.StoreCorrupt(
                        f"{d} is a symlink (to {os.readlink(d)}): apt-layer never follows a symlink "
                        "inside its store; replace it with a directory")
                if not d.is_dir():
                    d.mkdir(mode=0o755, parents=True, exist_ok=True)
                    fsops.fsync_dir(str(d.parent))
        except OSError as e:
            raise _map_os_error(e, f"cannot create store at {root}") from None
        try:
            journal = Journal.open(root / "journal.db")
        except JournalVersionError as e:
            raise errors.StoreVersionError(str(e)) from None
        except JournalCorruptError as e:
            raise errors.StoreCorrupt(str(e)) from None
        except OSError as e:
            raise _map_os_error(e, f"{root}/journal.db") from None
        except sqlite3.OperationalError as e:
            raise _map_sqlite_error(e, f"{root}/journal.db") from None
        return cls(root, journal, config)

    def close(self) -> None:
        self.journal.close()

    # --- locking and paths ------------------------------------------------------

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
        with locked(self.publish_lock_path, exclusive=True):
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
            with locked(self.lock_path, exclusive=exclusive, timeout=timeout):
                held = True
                yield
        except OSError as e:
            if held:
                raise
            raise _map_os_error(e, f"cannot lock the store ({self.lock_path})") from None

    @contextmanager
    def _journal_errors(self) -> Iterator[None]:
        """A journal write refused by SQLite (read-only, full disk) is a one-line error."""
        try:
            yield
        except sqlite3.OperationalError as e:
            raise _map_sqlite_error(e, self.journal.path) from None

    def image_path(self, name: str) -> Path:
        return self.images_dir / (name + IMAGE_SUFFIX)

    def staging_path(self, tx: str) -> Path:
        return self.staging_dir / f"{self.boot_id}-{tx}"

    # --- small helpers ----------------------------------------------------------

    def record(self, kind: str, subject: str, data: dict, tx: str | None = None, manifest=None):
        """Append one event in its own SQLite transaction, under apt-layer
        transaction ``tx`` (a fresh id if None); an event the projection
        refuses is a Conflict."""
        try:
            return self.journal.append(kind, subject, data, tx or new_tx_id(), manifest=manifest)
        except ProjectionError as e:
            raise errors.Conflict(str(e)) from None

    def _live(self, name: str) -> dict:
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

    def _name_free(self, name: str, tx: str | None) -> None:
        if self.journal.image(name) is not None:
            staged_delete = tx is not None and any(
                op["op"] == "delete" and op["name"] == name for op in self.journal.staged_ops(tx))
            if not staged_delete:
                raise errors.Conflict(f"an image named {name!r} exists")
        row = self.journal.conn.execute(
            "SELECT o.tx FROM tx_ops o JOIN transactions t ON t.id = o.tx "
            "WHERE o.op = 'create' AND o.name = ? AND o.effective_seq IS NULL AND t.state = 'open'",
            (name,)).fetchone()
        if row is not None:
            raise errors.Conflict(f"an image named {name!r} is staged in open transaction {row[0]}")

    def _in_use(self, name: str) -> None:
        for slot, dep in self.journal.deployments().items():
            if dep["image"] == name:
                raise errors.Conflict(f"image {name!r} is the {slot} deployment; deploy another image first")
        row = self.journal.conn.execute(
            "SELECT mountpoint FROM mounts WHERE image = ? AND state = 'mounted'", (name,)).fetchone()
        if row is not None:
            raise errors.Conflict(f"image {name!r} is mounted at {row[0]}; unmount it first")

    # --- create -------------------------------------------------------------------

    def create(self, source: str, name: str, options: CreateOptions = CreateOptions(),
               tx: str | None = None, progress: Callable | None = None) -> dict:
        """Build image ``name`` from a directory (or a dump with ``from_file``).

        Objects go into the digest store as they are read; the image is
        written into the transaction's staging folder; then one SQLite
        transaction records the image and its manifest (and, without ``tx``,
        commits); only then is the image renamed into ``images/``.
        """
        names.check_image_name(name)
        if not options.from_file and not os.path.isdir(source):
            raise errors.NotFound(f"source {source}: not a directory" if os.path.exists(source)
                                  else f"source {source}: no such directory")
        if options.from_file and source != "-" and not os.path.exists(source):
            raise errors.NotFound(f"source {source}: no such file")
        with self.writing():
            if tx is not None:
                self._open_tx(tx)
            self._name_free(name, tx)
            implicit = tx is None
            txid = tx or new_tx_id()
            if implicit:
                self.record("tx.begun", txid, {"explicit": False, "boot_id": self.boot_id,
                                                 "op": "create", "name": name}, txid)
            fault("create.after-begin")
            staging = self.staging_path(txid)
            try:
                built = self._build(source, name, staging, options, progress)
            except BaseException as e:
                if implicit:
                    self._abort(txid, reason=str(e) or type(e).__name__)
                if isinstance(e, OSError):
                    raise _map_os_error(e, f"creating image {name!r}") from None
                raise
            missing = self._missing_of(built.manifest) if options.from_file else 0
            data = {"digest": built.digest, "size": built.size, "staged": str(built.staged.relative_to(self.root)),
                    "source": os.path.abspath(source), "objects": built.objects}
            if built.reused is not None:
                data["reused"] = built.reused
            if built.patched_from is not None:
                data["patched"] = {"from": built.patched_from, "changed": built.changed}
            if not implicit:
                self.record("image.staged", name, data, txid, manifest=built.manifest)
                fault("create.after-stage")
                return self._created_info(name, data, txid, built.stats, staged=True, missing=missing)
            with self.publishing():
                try:
                    with self.journal.transaction() as w:
                        w.append("image.created", name, data, txid, manifest=built.manifest)
                        fault("create.mid-commit")
                        w.append("tx.committed", txid, {"ops": 1}, txid)
                except ProjectionError as e:
                    self._abort(txid, reason=str(e))
                    raise errors.Conflict(str(e)) from None
                fault("create.after-commit")
                self.place_image(name, built.staged)
                fault("create.after-place")
            self.clear_staging(txid)
            return self._created_info(name, data, txid, built.stats, staged=False, missing=missing)

    def _created_info(self, name, data, txid, stats, staged, missing) -> dict:
        info = {"name": name, "digest": data["digest"], "size": data["size"],
                "objects": data["objects"], "objects_missing": missing, "tx": txid, "staged": staged,
                "reused": data.get("reused"), "patched": data.get("patched")}
        if stats is not None:
            info.update(files=stats.files, bytes=stats.bytes,
                        objects_created=stats.objects_created, objects_deduped=stats.objects_deduped)
        return info

    def _missing_of(self, manifest) -> int:
        """How many objects of a built image's manifest (a list of rows) the digest store lacks."""
        return sum(1 for obj, _ in manifest if not (self.objects_dir / obj).is_file())

    def _whole(self, name: str, digest: str) -> None:
        """Refuse to deploy an image the digest store cannot back: its next boot would fail."""
        missing = sum(1 for obj, _ in self.journal.manifest(digest) if not (self.objects_dir / obj).is_file())
        if missing:
            raise errors.StoreCorrupt(
                f"image {name!r} cannot be deployed: {missing} of its objects are missing from the store "
                f"(see `apt-layer image missing-objects {name}`)")

    def _build(self, source, name, staging: Path, options: CreateOptions, progress) -> _Built:
        """Objects into the store, image into staging; returns what the event records."""
        if not staging.is_dir():
            fsops.mkdir(str(staging), 0o755)
            fsops.fsync_dir(str(self.staging_dir))
        # Not NAME: a writer's temp file beside a 245-byte NAME.composefs would exceed NAME_MAX.
        staged = staging / (new_tx_id() + IMAGE_SUFFIX)
        backend = options.backend
        if backend == "auto":
            from .composefs import upstream

            backend = "upstream" if upstream.find_tool("mkcomposefs") else "python"
        try:
            if backend == "upstream":
                from .composefs import fsverity

                root = self._build_upstream(source, staged, options)
                image = staged.read_bytes()
                manifest = manifest_of(root)
                built = _Built(staged, fsverity.digest_bytes(image).hex(), len(image), manifest, len(manifest))
            else:
                built = self._build_python(source, staged, options, progress)
        except Exception as e:
            from .composefs.build import BuildError  # not before: an unchanged tree never needs it

            if not isinstance(e, BuildError):
                raise
            cause = _os_error_behind(e)
            if cause is not None and cause.errno in _STORE_ERRNOS:
                raise _map_os_error(cause, f"creating image {name!r}") from None
            raise errors.InvalidInput(str(e)) from None
        fault("create.after-image")
        return built

    def _build_python(self, source, staged: Path, options: CreateOptions, progress) -> _Built:
        """The pure-Python build: reuse, patch or render, cheapest first.

        A directory is first walked with ``lstat`` alone.  An unchanged tree
        is recognised by its fingerprint: ``cache/trees`` remembers the image
        each fingerprint (plus the version options) gave, and a live image
        with that digest is reused, provided its bytes still hash to it; its
        manifest is the one the journal recorded for that digest.  A tree
        that changed in a few entries since the last build (``cache/last``)
        has just those entries read, and the last image patched
        (:mod:`.composefs.patch`) when the layout allows it.  Anything else
        is scanned and rendered.
        """
        from .composefs.digestcache import DigestCache, LastBuilds, TreeResults
        from .composefs.lstatwalk import walk

        if options.from_file:
            return self._render(source, staged, options, progress, None, None)
        versions = f"v{options.min_version}-{options.max_version}".encode()
        trees = TreeResults(self.root / "cache" / "trees")
        walked = walk(source, trees.settled_before_ns, use_epoch=options.use_epoch,
                      skip_xattrs=options.skip_xattrs, user_xattrs=options.user_xattrs,
                      skip_devices=options.skip_devices)
        if walked is None:  # the scan says what is wrong
            return self._render(source, staged, options, progress, None, None)
        if walked.fingerprint is not None:
            known = trees.recall(walked.fingerprint + versions)
            if known is not None:
                reused = self._reuse_live_image(known, staged)
                if reused is not None:
                    fault("create.after-objects")
                    reused.stats = dataclasses.replace(walked.stats, objects_deduped=walked.stats.external)
                    return reused
        last = LastBuilds(self.root / "cache" / "last")
        scope = walked.options + versions
        # One cache for both: what a refused patch read, the render takes from it unread.
        cache = DigestCache(self.root / "cache" / "digests")
        built, created = self._patch(source, staged, options, walked, last.get(scope), cache)
        if built is None:
            built = self._render(source, staged, options, progress, walked, cache)
            # the objects the refused patch imported, the render found in place
            built.stats.objects_created += created
            built.stats.objects_deduped -= created
        digest = bytes.fromhex(built.digest)
        last.put(scope, digest, walked.state)
        last.save()
        if walked.fingerprint is not None:
            trees.remember(walked.fingerprint + versions, digest)
            trees.save()
        return built

    def _render(self, source, staged: Path, options: CreateOptions, progress, walked, cache) -> _Built:
        """Scan (unchanged entries from the digest cache, if any) and render the whole tree."""
        from .composefs import build

        store = self._object_store()
        root, stats = build.load_tree(
            source, from_file=options.from_file, store=store, use_epoch=options.use_epoch,
            skip_devices=options.skip_devices, skip_xattrs=options.skip_xattrs,
            user_xattrs=options.user_xattrs, threads=options.threads, progress=progress, cache=cache,
            walked=walked)
        store.sync()
        fault("create.after-objects")
        image, digest = build.render(root, min_version=options.min_version, max_version=options.max_version)
        fsops.write_file_atomic(staged, image)
        if cache is not None:
            cache.save()
        manifest = manifest_of(root)
        return _Built(staged, digest.hex(), len(image), manifest, len(manifest), stats)

    def _patch(self, source, staged: Path, options: CreateOptions, walked, last, cache) -> tuple[_Built | None, int]:
        """Read the entries changed since the last build and patch its image.

        Returns the build (None if it cannot be patched) and how many objects
        the reading imported.  What it read stays in ``cache`` either way.
        """
        from .composefs import build, fsverity
        from .composefs.patch import patch_image
        if last is None:
            return None, 0
        base_digest, base_state = last
        changed = walked.changed_since(base_state)
        if changed is None or len(changed) > max(1, walked.stats.entries // PATCH_MAX_SHARE):
            return None, 0
        base = self._live_image(base_digest)
        if base is None:
            return None, 0
        base_hex = base_digest.hex()

        def in_base(digest: bytes) -> bool:
            return self.journal.manifest_has(base_hex, fsverity.object_path(digest))

        store = self._object_store()
        try:
            nodes, read = build.read_entries(source, walked, changed, store=store, use_epoch=options.use_epoch,
                                             skip_xattrs=options.skip_xattrs, user_xattrs=options.user_xattrs,
                                             threads=options.threads, cache=cache)
        except build.BuildError:
            return None, 0  # the full scan reports what is wrong, or finds it right by then
        patched = patch_image(base[1], nodes, in_base)
        store.sync()  # kept either way: the render finds these objects in place
        if patched is None:
            return None, read.objects_created
        fault("create.after-objects")
        image = bytes(patched.image)
        fsops.write_file_atomic(staged, image)
        manifest = Derived(base_hex, frozenset(fsverity.object_path(d) for d in patched.removed),
                           tuple((fsverity.object_path(d), size) for d, size in patched.added.items()))
        objects = self.journal.manifest_summary(base_hex)[0] - len(manifest.removed) + len(manifest.added)
        stats = dataclasses.replace(walked.stats, objects_created=read.objects_created,
                                    objects_deduped=walked.stats.external - read.objects_created)
        return _Built(staged, fsverity.digest_bytes(image).hex(), len(image), manifest, objects, stats,
                      patched_from=base[0], changed=len(changed)), read.objects_created

    def _object_store(self):
        """The digest store for a build: one batch, made durable by ``sync()``.

        No refreshing of dedupe hits: gc cannot run while this writer holds the lock.
        """
        from .composefs.objectstore import ObjectStore

        return ObjectStore(self.objects_dir, batch=True, refresh_hits=False)

    def _live_image(self, digest: bytes) -> tuple[str, bytes] | None:
        """(name, bytes) of a live image recorded with ``digest`` whose bytes still hash to it."""
        from .composefs import fsverity

        for (name,) in self.journal.conn.execute(
                "SELECT name FROM images WHERE digest = ? ORDER BY name", (digest.hex(),)):
            try:
                image = self.image_path(name).read_bytes()
            except OSError:
                continue
            if fsverity.digest_bytes(image) == digest:
                return name, image
        return None

    def _reuse_live_image(self, digest: bytes, staged: Path) -> _Built | None:
        """The build of an unchanged tree: a live image with ``digest``, if one checks out, as the new one.

        The staged file is a hard link to the live image's file: images are
        never written in place (a new image is a new file renamed into
        place), so the two names share nothing that can change, and the data
        is on disk already.  Where the file system cannot link, it is a copy.
        """
        live = self._live_image(digest)
        if live is None:
            return None
        name, image = live
        try:
            fsops.link(str(self.image_path(name)), str(staged))
        except OSError as e:
            if e.errno not in _NO_LINK_ERRNOS:
                raise
            fsops.write_file_atomic(staged, image)
        else:
            fsops.fsync_dir(str(staged.parent))
        objects, _ = self.journal.manifest_summary(digest.hex())
        return _Built(staged, digest.hex(), len(image), RECORDED, objects, reused=name)

    def _build_upstream(self, source, staged: Path, options: CreateOptions):
        """Run the upstream mkcomposefs; its output is read back for the manifest."""
        import subprocess

        from .composefs import upstream
        from .composefs.reader import read_image

        tool = upstream.find_tool("mkcomposefs")
        if tool is None:
            raise errors.Unsupported("--backend upstream: mkcomposefs is not installed")
        args = [tool, f"--min-version={options.min_version}", f"--max-version={options.max_version}",
                f"--threads={options.threads}"]
        for flag in ("from_file", "use_epoch", "skip_devices", "skip_xattrs", "user_xattrs"):
            if getattr(options, flag):
                args.append("--" + flag.replace("_", "-"))
        if not options.from_file:
            args.append(f"--digest-store={self.objects_dir}")
        proc = subprocess.run([*args, source, str(staged)], capture_output=True, text=True)
        if proc.returncode != 0:
            if os.strerror(errno.ENOSPC) in proc.stderr:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            raise errors.InvalidInput(proc.stderr.strip().splitlines()[0] if proc.stderr.strip()
                                      else f"mkcomposefs failed ({proc.returncode})")
        fd = os.open(staged, os.O_RDONLY)
        try:
            fsops.fsync(fd)
        finally:
            os.close(fd)
        return read_image(str(staged))

    # --- effects (idempotent; recovery redoes them) ---------------------------------

    def place_image(self, name: str, staged: Path) -> bool:
        """Move a committed image from staging into ``images/``; False if already there."""
        dest = self.image_path(name)
        if not staged.exists():
            return False
        fsops.rename(str(staged), str(dest))
        fsops.fsync_dir(str(self.images_dir))
        return True

    def remove_image_file(self, name: str) -> bool:
        try:
            fsops.unlink(str(self.image_path(name)))
        except FileNotFoundError:
            return False
        fsops.fsync_dir(str(self.images_dir))
        return True

    def sync_deployments(self) -> list[str]:
        """Make ``deploy/current`` and ``deploy/previous`` match the journal.

        Each link is replaced by a rename of a new link over it, so a reader
        (or the next boot) sees the old target or the new, never neither.
        """
        changed = []
        wanted = self.journal.deployments()
        for slot in ("current", "previous"):
            link = self.deploy_dir / slot
            target = f"../images/{wanted[slot]['image']}{IMAGE_SUFFIX}" if slot in wanted else None
            try:
                have = os.readlink(link)
            except FileNotFoundError:
                have = None
            except OSError:
                have = "<not a link>"
            if have == target:
                continue
            if target is None:
                fsops.unlink(str(link))
            else:
                tmp = self.deploy_dir / f".{slot}.tmp-{os.getpid()}"
                if os.path.lexists(tmp):
                    fsops.unlink(str(tmp))
                fsops.symlink(target, str(tmp))
                fault("links.after-temp")
                fsops.rename(str(tmp), str(link))
            changed.append(slot)
            fault("links.after-swap")
        if changed:
            fsops.fsync_dir(str(self.deploy_dir))
        return changed

    def clear_staging(self, tx: str) -> list[str]:
        """Remove the staging folders of ``tx``; returns the names of those it left alone.

        Only real directories are removed: an entry of that name that is not
        one (a symlink planted there) was not made by apt-layer and is left,
        as is whatever it points to.
        """
        left = []
        fd = fsops.open_dir(self.staging_dir)
        try:
            with os.scandir(fd) as it:
                entries = [(e.name, e.is_dir(follow_symlinks=False)) for e in it if e.name.endswith(f"-{tx}")]
            for name, is_dir in entries:
                if is_dir:
                    fsops.remove_tree_at(fd, name)
                else:
                    left.append(name)
            fsops.fsync(fd)
        finally:
            os.close(fd)
        return left

    def _abort(self, tx: str, reason: str) -> list[str]:
        """Record ``tx.aborted`` and drop the transaction's staged work.

        On a full disk the staged work goes first, to make room for the event.
        Returns what :meth:`clear_staging` left alone.
        """
        if self.journal.transaction_state(tx) == "open":
            data = {"reason": reason[:500]}
            try:
                self.record("tx.aborted", tx, data, tx)
            except sqlite3.OperationalError as e:
                if not getattr(e, "sqlite_errorname", "").startswith("SQLITE_FULL"):
                    raise
                self.clear_staging(tx)
                self.record("tx.aborted", tx, data, tx)
        fault("abort.after-event")
        return self.clear_staging(tx)

    def apply_effects(self, events) -> None:
        """Carry out the file effects of committed events (in order)."""
        deploys = False
        for ev in events:
            if ev.kind == "image.created":
                self.place_image(ev.subject, self.root / ev.data["staged"])
                fault("effects.after-place")
            elif ev.kind == "image.deleted":
                self.remove_image_file(ev.subject)
                fault("effects.after-unlink")
            elif ev.kind in ("deployed", "rolled-back"):
                deploys = True
        if deploys:
            self.sync_deployments()
            fault("effects.after-deploy")

    # --- delete, deploy, rollback ----------------------------------------------------

    def delete(self, name: str, tx: str | None = None) -> dict:
        names.check_image_name(name)
        with self.writing():
            image = self._live(name)
            self._in_use(name)
            if tx is not None:
                self._open_tx(tx)
                self.record("delete.staged", name, {"digest": image["digest"]}, tx)
                fault("delete.after-stage")
                return {"name": name, "digest": image["digest"], "tx": tx, "staged": True}
            with self.publishing():
                # Checked again inside the write transaction: a deploy or mount
                # committed since the check above must win over this delete.
                events = self._single(name, "image.deleted", {"digest": image["digest"]}, op="delete",
                                      check=lambda: self._in_use(name))
                fault("delete.after-commit")
                self.apply_effects(events)
            return {"name": name, "digest": image["digest"], "tx": events[0].tx, "staged": False}

    def _single(self, subject: str, kind: str, data: dict, op: str,
                check: Callable[[], None] | None = None) -> list:
        """One operation as its own transaction: begun, the event, committed, atomically.

        ``check`` runs inside the SQLite write transaction (which excludes
        other writers), so what it reads cannot change before the commit.
        """
        txid = new_tx_id()
        try:
            with self.journal.transaction() as w:
                if check is not None:
                    check()
                w.append("tx.begun", txid, {"explicit": False, "boot_id": self.boot_id,
                                            "op": op, "name": subject}, txid)
                ev = w.append(kind, subject, data, txid)
                fault(f"{op}.mid-commit")
                w.append("tx.committed", txid, {"ops": 1}, txid)
        except ProjectionError as e:
            raise errors.Conflict(str(e)) from None
        return [ev]

    def deploy(self, name: str, tx: str | None = None) -> dict:
        """Make ``name`` what the next boot mounts; the current one becomes previous."""
        names.check_image_name(name)
        with self.writing():
            if tx is not None:
                self._open_tx(tx)
                staged = [op for op in self.journal.staged_ops(tx)
                          if op["op"] == "create" and op["name"] == name and op["effective_seq"] is None]
                digest = staged[-1]["digest"] if staged else self._live(name)["digest"]
                self._whole(name, digest)
                self.record("deploy.staged", name, {"digest": digest}, tx)
                fault("deploy.after-stage")
                return {"current": name, "digest": digest, "tx": tx, "staged": True}
            with self.publishing():
                image = self._live(name)
                current = self.journal.deployments().get("current")
                if current is not None and current["image"] == name and current["digest"] == image["digest"]:
                    raise errors.Conflict(f"image {name!r} is already the current deployment")
                self._whole(name, image["digest"])
                events = self._single(name, "deployed", {
                    "current": {"image": name, "digest": image["digest"]}, "previous": current}, op="deploy")
                fault("deploy.after-commit")
                self.apply_effects(events)
            return {"current": name, "digest": image["digest"],
                    "previous": current["image"] if current else None, "staged": False}

    def rollback(self) -> dict:
        """Swap the current and previous deployments, like ``rpm-ostree rollback``."""
        with self.writing(), self.publishing():
            deps = self.journal.deployments()
            if "previous" not in deps:
                raise errors.Conflict("no previous deployment to roll back to")
            self._whole(deps["previous"]["image"], deps["previous"]["digest"])
            events = self._single(deps["previous"]["image"], "rolled-back", {
                "current": deps["previous"], "previous": deps.get("current")}, op="rollback")
            fault("rollback.after-commit")
            self.apply_effects(events)
            return {"current": deps["previous"]["image"], "previous": deps["current"]["image"]}

    # --- explicit transactions -----------------------------------------------------------

    def tx_begin(self) -> str:
        txid = new_tx_id()
        with self.writing():
            self.record("tx.begun", txid, {"explicit": True, "boot_id": self.boot_id}, txid)
        return txid

    def tx_commit(self, tx: str) -> dict:
        """Make every staged operation of ``tx`` effective at once, then do the effects."""
        with self.writing():
            self._open_tx(tx)
            with self.publishing():
                try:
                    with self.journal.transaction() as w:
                        self._staged_deletes_unused(tx)
                        events = w.commit_tx(tx)
                except (ProjectionError, errors.Conflict) as e:
                    raise errors.Conflict(f"cannot commit {tx}: {e}") from None
                fault("commit.after-commit")
                self.apply_effects(events)
                fault("commit.after-effects")
            self.clear_staging(tx)
            ops = [e for e in events if e.kind != "tx.committed"]
            return {"tx": tx, "ops": [{"kind": e.kind, "subject": e.subject} for e in ops]}

    def _staged_deletes_unused(self, tx: str) -> None:
        """An image deployed or mounted since its delete was staged is not deleted by the commit.

        Called inside the commit's SQLite transaction, so no deploy or mount slips in between.
        """
        for op in self.journal.staged_ops(tx):
            if op["op"] == "delete" and op["effective_seq"] is None:
                self._in_use(op["name"])

    def tx_rollback(self, tx: str) -> dict:
        with self.writing():
            self._open_tx(tx)
            ops = self.journal.staged_ops(tx)
            left = self._abort(tx, reason="rolled back by request")
            result = {"tx": tx, "discarded": [{"op": o["op"], "name": o["name"]} for o in ops]}
            if left:
                result["left_in_staging"] = left
            return result

    def transactions(self, state: str | None = None) -> list[dict]:
        sql = "SELECT id, state, explicit, begun_at, ended_at FROM transactions"
        args: tuple = ()
        if state:
            sql += " WHERE state = ?"
            args = (state,)
        rows = self.journal.conn.execute(sql + " ORDER BY begun_seq", args).fetchall()
        return [{"tx": r[0], "state": r[1], "explicit": bool(r[2]), "begun_at": r[3], "ended_at": r[4]}
                for r in rows]

    def transaction(self, tx: str) -> dict:
        rows = [t for t in self.transactions() if t["tx"] == tx]
        if not rows:
            raise errors.NotFound(f"no transaction {tx!r}")
        info = rows[0]
        info["ops"] = [{"op": o["op"], "name": o["name"], "digest": o["digest"],
                        "effective_seq": o["effective_seq"]} for o in self.journal.staged_ops(tx)]
        info["events"] = [{"seq": e.seq, "kind": e.kind, "subject": e.subject, "at": e.at}
                          for e in self.journal.events(tx=tx)]
        return info

    # --- reading ----------------------------------------------------------------------------

    def images(self) -> list[dict]:
        deps = {d["image"]: slot for slot, d in self.journal.deployments().items()}
        rows = self.journal.conn.execute(
            "SELECT i.name, i.digest, i.size, i.created_at, i.tx, m.objects, m.size "
            "FROM images i LEFT JOIN images_manifest m ON m.digest = i.digest ORDER BY i.name").fetchall()
        return [{"name": r[0], "digest": r[1], "size": r[2], "created_at": r[3], "tx": r[4],
                 "objects": r[5] or 0, "content_bytes": r[6] or 0, "deployed": deps.get(r[0])}
                for r in rows]

    def image_info(self, name: str) -> dict:
        image = self._live(name)
        info = {"name": name, **image, "path": str(self.image_path(name))}
        info["objects"], info["content_bytes"] = self.journal.manifest_summary(image["digest"]) or (0, 0)
        info["deployed"] = [slot for slot, d in self.journal.deployments().items() if d["image"] == name]
        info["mounts"] = [r[0] for r in self.journal.conn.execute(
            "SELECT mountpoint FROM mounts WHERE image = ? AND state = 'mounted'", (name,))]
        created = next(self.journal.events(subject=name, kind="image.created", newest_first=True, limit=1), None)
        if created is not None:
            info["created_by"] = {k: created.actor.get(k) for k in ("user", "uid", "host", "pid")}
            info["source"] = created.data.get("source")
        return info

    def image_file(self, name: str) -> Path:
        self._live(name)
        path = self.image_path(name)
        if not path.exists():
            raise errors.StoreCorrupt(f"image {name!r}: file {path} is missing (run apt-layer recover)")
        return path

    def missing_objects(self, name: str) -> list[str]:
        """Objects the image's manifest lists that are not in the digest store."""
        image = self._live(name)
        return [obj for obj, _ in self.journal.manifest(image["digest"])
                if not (self.objects_dir / obj).is_file()]

    # --- mounts -------------------------------------------------------------------------------

    def mount(self, name: str, mountpoint: str, *, basedirs: tuple[str, ...] = (),
              upperdir: str | None = None, workdir: str | None = None, readonly: bool = False,
              verity: str = "off", idmap: str | None = None, backend: str = "python") -> dict:
        """Mount image ``name`` and record it; warns (in the result) about missing objects.

        ``backend`` "python" mounts natively, "upstream" through
        ``mount.composefs``, "auto" through it when installed.
        """
        from .composefs import mount as cfsmount, upstream

        path = self.image_file(name)
        image = self._live(name)
        target = os.path.realpath(mountpoint)
        missing = self.missing_objects(name)
        if backend == "auto":
            backend = "upstream" if upstream.find_tool("mount.composefs") else "python"
        if backend == "upstream" and upstream.find_tool("mount.composefs") is None:
            raise errors.Unsupported("--backend upstream: mount.composefs is not installed")
        do_mount = upstream.mount_with_tool if backend == "upstream" else cfsmount.mount
        with self.writing():
            # Write-ahead like every other operation: once the kernel holds the
            # mount, its objects must already be protected from gc. A mount
            # that then fails is recorded as undone; one that never happened
            # because we were killed is marked lost by the next recovery.
            event = self.record("mounted", name, {"mountpoint": target, "digest": image["digest"],
                                                   "boot_id": self.boot_id, "writable": upperdir is not None,
                                                   "backend": backend})
            fault("mount.after-event")
            try:
                do_mount(str(path), target, [str(self.objects_dir), *basedirs], upperdir=upperdir,
                         workdir=workdir, readonly=readonly, verity=verity, idmap=idmap)
            except BaseException as e:
                self.record("unmounted", name, {"mountpoint": target,
                                                 "reason": f"mount failed: {e}"[:500]}, event.tx)
                if isinstance(e, cfsmount.MountError):
                    raise _mount_error(e) from None
                raise
            fault("mount.after-kernel")
        return {"name": name, "mountpoint": target, "digest": image["digest"], "missing_objects": missing}

    def unmount(self, mountpoint: str, lazy: bool = False, force: bool = False) -> dict:
        """Unmount a mount this store made (recorded in its journal); ``force`` for any other."""
        from .composefs import mount as cfsmount

        target = os.path.realpath(mountpoint)
        row = self.journal.conn.execute(
            "SELECT image, state FROM mounts WHERE mountpoint = ?", (target,)).fetchone()
        with self.writing():
            if cfsmount.is_mounted(target):
                if row is None and not force:
                    raise errors.Conflict(
                        f"{target} is not a mount of this store (its journal has no record of it); "
                        "pass --force to unmount it anyway")
                try:
                    cfsmount.unmount(target, lazy=lazy)
                except cfsmount.MountError as e:
                    raise _mount_error(e) from None
            elif row is None:
                raise errors.NotFound(f"{target} is not mounted")
            elif row[1] == "mounted" and target in cfsmount.composefs_mount_points_elsewhere():
                raise errors.Conflict(f"{target} is mounted in another mount namespace; unmount it there")
            fault("unmount.after-kernel")
            if row is not None:
                self.record("unmounted", row[0], {"mountpoint": target})
        return {"mountpoint": target, "image": row[0] if row else None}

    def mounts(self) -> list[dict]:
        return [{"mountpoint": r[0], "image": r[1], "digest": r[2], "state": r[3], "boot_id": r[4]}
                for r in self.journal.conn.execute(
                    "SELECT mountpoint, image, digest, state, boot_id FROM mounts ORDER BY mountpoint")]


def _mount_error(e: OSError) -> errors.AptLayerError:
    message = e.strerror or str(e)
    if e.errno in (errno.EPERM, errno.EACCES):
        return errors.PermissionDenied(message)
    if e.errno in (errno.ENODEV, errno.EOPNOTSUPP, errno.ENOTTY, errno.ENOSYS):
        return errors.Unsupported(message)
    if e.errno == errno.ENOENT:
        return errors.NotFound(message)
    if e.errno in (errno.EBUSY, errno.EEXIST):
        return errors.Conflict(message)
    return errors.AptLayerError(message)


@dataclass
class _Built:
    """What a build gives the event that records it."""

    staged: Path
    digest: str
    size: int
    #: the rows, RECORDED when the journal has this digest's already, or Derived from another's
    manifest: list[tuple[str, int]] | object
    objects: int
    stats: object = None
    #: the live image whose bytes were reused
    reused: str | None = None
    #: the live image that was patched, and how many entries changed
    patched_from: str | None = None
    changed: int = 0


def manifest_of(root) -> list[tuple[str, int]]:
    """(object path, size) of every backing object a tree references, once each.

    A backing path that is not an object path of the digest store is refused
    (InvalidInput): a dump may name any path (``/etc``, ``../../x``), and gc
    would remove what such a name, joined onto the store, points at.
    """
    from .composefs.fsverity import OBJECT_PATH_RULE, is_object_path

    objects: dict[str, int] = {}
    for path, node in root.walk():
        if node.is_reg and node.payload and node.content is None and node.size > 0:
            obj = node.payload.decode("utf-8", "surrogateescape")
            if not is_object_path(obj):
                raise errors.InvalidInput(f"{os.fsdecode(path)}: backing path {obj!r} is not in the digest store "
                                          f"({OBJECT_PATH_RULE})")
            objects[obj] = node.size
    return sorted(objects.items())
