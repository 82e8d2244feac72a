"""The ways to build an image, cheapest first; the first that can gives the outcome.

For a directory, with the pure-Python backend:

1. **reuse**: the tree is walked with ``lstat`` alone; an unchanged tree is
   recognised by its fingerprint (``cache/trees`` remembers the image each
   fingerprint gave under the same options), and a live image with that
   digest is reused, provided its bytes still hash to it: the staged file is
   a hard link to it (images are never written in place, so the two names
   share nothing that changes), a copy where the file system cannot link;
2. **patch**: a tree that changed in a few entries since the last build
   (``cache/last``) has just those entries read, and the last image patched
   (:mod:`aptlayer.composefs.patch`) when the layout allows it;
3. **render**: anything else is scanned (unchanged entries from the digest
   cache, ``cache/digests``) and laid out whole.

A dump is rendered. With the upstream backend, ``mkcomposefs`` builds
either, and its image is read back for the manifest.

A layered source (a base image and an overlay's upper directory) is built
by the pure-Python backend alone: the upper directory is read as a delta,
only its new files hashed and imported, and laid over the base image's tree
(:mod:`aptlayer.composefs.upper`); the base image's inodes are moved into
the new image with only the changed entries rendered
(:mod:`aptlayer.composefs.relocate`), else the merged tree is rendered; its
manifest is given as a delta of the base's when the journal holds that.
"""

from __future__ import annotations

import dataclasses
import errno
import os
import stat
from collections.abc import Callable
from pathlib import Path

from .. import errors
from ..fault import fault
from ..linux import fsops
from .options import CreateOptions, scan_key
from .outcome import Delta, Known, Outcome, SameAs
from .sources import DumpSource, LayeredSource, Source, TreeSource

#: a build patches the last image only if at most 1/PATCH_MAX_SHARE of the entries changed;
#: past that, reading them one by one costs more than a scan that skips unchanged ones
PATCH_MAX_SHARE = 10
#: why a hard link may fail where a copy works: no hard links on this file system
#: (EPERM, EOPNOTSUPP), another file system, or the file's link count at its limit
_NO_LINK_ERRNOS = (errno.EPERM, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK)


class Builder:
    """Builds images into the digest store ``objects`` and a staged file.

    ``cache(name)`` is where a cache file lives, ``image(name)`` a live
    image's file, ``known`` what the journal knows.
    """

    def __init__(self, objects: Path, cache: Callable[[str], Path], image: Callable[[str], Path], known: Known):
        self.objects = objects
        self.cache = cache
        self.image = image
        self.known = known

    def build(self, source: Source, staged: Path, options: CreateOptions,
              progress: Callable | None = None, what: str = "building the image") -> Outcome:
        """Objects into the store, the image into ``staged``; failures as apt-layer errors, told as ``what``."""
        backend = options.backend
        if backend == "auto" and isinstance(source, DumpSource):
            from ..composefs import upstream

            backend = "upstream" if upstream.find_tool("mkcomposefs") else "python"
        # A directory is read by the Python scanner unless the upstream tool is asked for by
        # name: mkcomposefs 1.0.8 opens a file it listed following symlinks, so an entry
        # swapped for a symlink between its lstat and its open stores the link's target
        # (tests/test_security_trees.py; docs/security.md, rule 3).
        try:
            if isinstance(source, LayeredSource):
                outcome = self._layered(source, staged, options)
            elif isinstance(source, TreeSource):
                outcome = self._tree(source, staged, options)
            elif backend == "upstream":
                outcome = self._upstream(source, staged, options)
            elif isinstance(source, DumpSource):
                outcome = self._render(source.path, staged, options, progress, None, None)
            else:
                outcome = self._directory(source.path, staged, options, progress)
        except Exception as e:
            from ..composefs.build import BuildError  # not before: an unchanged tree never needs it

            if not isinstance(e, BuildError):
                raise
            raise errors.from_build_error(e, what) from None
        fault("create.after-image")
        return outcome

    # --- the pure-Python backend ------------------------------------------------------

    def _directory(self, source: str, staged: Path, options: CreateOptions, progress) -> Outcome:
        from ..composefs.digestcache import DigestCache, LastBuilds, TreeResults
        from ..composefs.lstatwalk import walk

        scan, image_key = options.scan, options.image.key()
        trees = TreeResults(self.cache("trees"))
        walked = walk(source, trees.settled_before_ns, use_epoch=scan.use_epoch, skip_xattrs=scan.skip_xattrs,
                      user_xattrs=scan.user_xattrs, skip_devices=scan.skip_devices)
        if walked is None:  # the scan says what is wrong
            return self._render(source, staged, options, progress, None, None)
        if walked.fingerprint is not None:
            known = trees.recall(walked.fingerprint + image_key)
            if known is not None:
                reused = self._reuse(known, staged)
                if reused is not None:
                    fault("create.after-objects")
                    reused.stats = dataclasses.replace(walked.stats, objects_deduped=walked.stats.external)
                    return reused
        last = LastBuilds(self.cache("last"))
        scope = scan_key(scan) + image_key
        # One cache for both: what a refused patch read, the render takes from it unread.
        cache = DigestCache(self.cache("digests"))
        outcome, created = self._patch(source, staged, options, walked, last.get(scope), cache)
        if outcome is None:
            outcome = self._render(source, staged, options, progress, walked, cache)
            # the objects the refused patch imported, the render found in place
            outcome.stats.objects_created += created
            outcome.stats.objects_deduped -= created
        digest = bytes.fromhex(outcome.digest)
        last.put(scope, digest, walked.state)
        last.save()
        if walked.fingerprint is not None:
            trees.remember(walked.fingerprint + image_key, digest)
            trees.save()
        return outcome

    def _render(self, source: str, staged: Path, options: CreateOptions, progress, walked, cache) -> Outcome:
        """Scan (unchanged entries from the digest cache, if any) and render the whole tree."""
        from ..composefs import build

        store = self._object_store()
        scan = options.scan
        root, stats = build.load_tree(
            source, from_file=options.from_file, store=store, use_epoch=scan.use_epoch,
            skip_devices=scan.skip_devices, skip_xattrs=scan.skip_xattrs, user_xattrs=scan.user_xattrs,
            threads=options.threads, progress=progress, cache=cache, walked=walked)
        store.sync()
        fault("create.after-objects")
        image, digest = build.render(root, min_version=options.min_version, max_version=options.max_version)
        fsops.write_file_atomic(staged, image)
        if cache is not None:
            cache.save()
        manifest = manifest_of(root)
        return Outcome(staged, digest.hex(), len(image), manifest, len(manifest), stats)

    def _patch(self, source: str, staged: Path, options: CreateOptions, walked, last,
               cache) -> tuple[Outcome | None, int]:
        """Read the entries changed since the last build and patch its image.

        Returns the outcome (None if it cannot be patched) and how many
        objects the reading imported. What it read stays in ``cache`` either way.
        """
        from ..composefs import build, fsverity
        from ..composefs.patch import patch_image

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
        store = self._object_store()
        scan = options.scan
        try:
            nodes, read = build.read_entries(source, walked, changed, store=store, use_epoch=scan.use_epoch,
                                             skip_xattrs=scan.skip_xattrs, user_xattrs=scan.user_xattrs,
                                             threads=options.threads, cache=cache)
        except build.BuildError:
            return None, 0  # the full scan reports what is wrong, or finds it right by then
        patched = patch_image(base[2], nodes, self._in_manifest(base_hex))
        store.sync()  # kept either way: the render finds these objects in place
        if patched is None:
            return None, read.objects_created
        fault("create.after-objects")
        image = bytes(patched.image)
        fsops.write_file_atomic(staged, image)
        manifest, objects = self._delta(base_hex, patched.removed, patched.added)
        stats = dataclasses.replace(walked.stats, objects_created=read.objects_created,
                                    objects_deduped=walked.stats.external - read.objects_created)
        return Outcome(staged, fsverity.digest_bytes(image).hex(), len(image), manifest, objects, stats,
                       patched_from=base[0], changed=len(changed)), read.objects_created

    def _object_store(self):
        """The digest store for a build: one batch, made durable by ``sync()``.

        No refreshing of dedupe hits: gc cannot run while the Store holds its lock.
        """
        from ..composefs.objectstore import ObjectStore

        return ObjectStore(self.objects, batch=True, refresh_hits=False)

    def _live_image(self, digest: bytes) -> tuple[str, Path, bytes] | None:
        """(name, file, bytes) of a live image recorded with ``digest`` whose bytes still hash to it."""
        from ..composefs import fsverity

        for name in self.known.images_with_digest(digest.hex()):
            path = self.image(name)
            try:
                image = path.read_bytes()
            except OSError:
                continue
            if fsverity.digest_bytes(image) == digest:
                return name, path, image
        return None

    def _reuse(self, digest: bytes, staged: Path) -> Outcome | None:
        """The build of an unchanged tree: a live image with ``digest``, if one checks out, as the new one."""
        live = self._live_image(digest)
        if live is None:
            return None
        name, path, image = live
        try:
            fsops.link(str(path), str(staged))
        except OSError as e:
            if e.errno not in _NO_LINK_ERRNOS:
                raise
            fsops.write_file_atomic(staged, image)
        else:
            fsops.fsync_dir(str(staged.parent))
        return Outcome(staged, digest.hex(), len(image), SameAs(), self.known.manifest_objects(digest.hex()),
                       reused=name)

    # --- a base image and an upper directory ------------------------------------------

    def _layered(self, source: LayeredSource, staged: Path, options: CreateOptions) -> Outcome:
        """The base image's tree with the upper directory's changes, rendered; only new files read."""
        from ..composefs import build, fsverity, upper
        from ..composefs.lstatwalk import ScanOptions
        from ..composefs.reader import ImageFormatError, read_image

        if options.backend == "upstream":
            raise errors.Unsupported("--backend upstream: mkcomposefs cannot lay an upper directory over an image")
        if options.from_file or options.scan != ScanOptions():
            raise errors.InvalidInput("a layered image is built as its base was: it takes no scan options")
        base_bytes = Path(source.base_image).read_bytes()
        base_hex = fsverity.digest_bytes(base_bytes).hex()
        store = self._object_store()
        delta = upper.read_upper(source.upper, store)
        store.sync()
        fault("create.after-objects")
        moved = self._relocated(base_bytes, base_hex, delta, staged, options)
        if moved is not None:
            return moved
        try:
            base = read_image(base_bytes)
        except ImageFormatError as e:
            raise build.BuildError(f"base image {source.base_image}: {e}") from None
        dropped: list = []
        merged = upper.apply(base, delta, dropped)
        image, digest = build.render(merged, min_version=options.min_version, max_version=options.max_version)
        fsops.write_file_atomic(staged, image)
        rows = manifest_of(merged)
        manifest = self._layered_manifest(base_hex, rows, delta, dropped)
        return Outcome(staged, digest.hex(), len(image), manifest, len(rows), delta.stats,
                       layered_on=base_hex, changed=len(delta.changes))

    def _relocated(self, base_bytes: bytes, base_hex: str, delta, staged: Path, options: CreateOptions) -> Outcome | None:
        """The layered image made by moving the base's inodes (:mod:`aptlayer.composefs.relocate`), if it can be.

        Its manifest is a delta of the base's, so the journal must hold the
        base's; else (or if the change is one it declines) None: render.
        """
        from ..composefs import fsverity, relocate

        if not self.known.manifest_objects(base_hex):
            return None
        done = relocate.layered_image(base_bytes, delta, self._in_manifest(base_hex),
                                      min_version=options.min_version, max_version=options.max_version)
        if done is None:
            return None
        image = bytes(done.image)
        fsops.write_file_atomic(staged, image)
        manifest, objects = self._delta(base_hex, done.removed, done.added)
        return Outcome(staged, fsverity.digest_bytes(image).hex(), len(image), manifest, objects, delta.stats,
                       layered_on=base_hex, changed=len(delta.changes), relocated=True)

    def _in_manifest(self, base_hex: str):
        """Whether the manifest recorded for image ``base_hex`` holds an object (by raw digest)."""
        from ..composefs import fsverity

        return lambda digest: self.known.manifest_has(base_hex, fsverity.object_path(digest))

    def _delta(self, base_hex: str, removed, added: dict) -> tuple[Delta, int]:
        """A build's manifest as its base's less ``removed`` plus ``added`` (raw digests), and its object count."""
        from ..composefs import fsverity

        manifest = Delta(base_hex, frozenset(fsverity.object_path(d) for d in removed),
                         tuple(sorted((fsverity.object_path(d), size) for d, size in added.items())))
        return manifest, self.known.manifest_objects(base_hex) - len(manifest.removed) + len(manifest.added)

    def _layered_manifest(self, base_hex: str, rows: list[tuple[str, int]], delta, dropped: list):
        """The merged tree's manifest as a delta of its base's, read from the change alone; else whole.

        An object can only be new if a file of the upper directory holds
        it, and only be gone if a dropped base subtree held it. The count
        recorded for the base, less the gone, plus the new, must then be
        the merged tree's: else the journal lacks the base's manifest and
        the whole one is recorded.
        """
        from ..composefs import upper

        recorded = self.known.manifest_objects(base_hex)
        if not recorded:
            return rows
        now = dict(rows)
        fresh = {obj for obj in _objects(c.node for c in delta.changes if isinstance(c, upper.Added))
                 if obj in now and not self.known.manifest_has(base_hex, obj)}
        gone = frozenset(obj for obj in _objects(dropped) if obj not in now)
        if recorded - len(gone) + len(fresh) != len(rows):
            return rows
        return Delta(base_hex, gone, tuple(sorted((obj, now[obj]) for obj in fresh)))

    # --- a tree already read ------------------------------------------------------------

    def _tree(self, source: TreeSource, staged: Path, options: CreateOptions) -> Outcome:
        """Render a tree whose objects are in the store; refuse it if it is not the image expected."""
        from ..composefs import build

        image, digest = build.render(source.root, min_version=options.min_version, max_version=options.max_version)
        if source.expect is not None and digest.hex() != source.expect:
            raise errors.IntegrityError(f"{source.recorded_as}: the layers give image {digest.hex()}, not "
                                        f"{source.expect} as its manifest says: not the image that was pushed")
        fsops.write_file_atomic(staged, image)
        manifest = manifest_of(source.root)
        return Outcome(staged, digest.hex(), len(image), manifest, len(manifest))

    # --- the upstream backend -----------------------------------------------------------

    def _upstream(self, source: Source, staged: Path, options: CreateOptions) -> Outcome:
        """Run the upstream mkcomposefs; its output is read back for the manifest."""
        import subprocess

        from ..composefs import fsverity, upstream
        from ..composefs.reader import read_image

        tool = upstream.find_tool("mkcomposefs")
        if tool is None:
            # a program that is not there, like a source that is not: not found (3), not a kernel feature
            raise errors.NotFound("--backend upstream: mkcomposefs is not installed (install Debian's composefs "
                                  "package, or use --backend python)")
        args = [tool, f"--min-version={options.min_version}", f"--max-version={options.max_version}",
                f"--threads={options.threads}"]
        for flag in ("from_file", "use_epoch", "skip_devices", "skip_xattrs", "user_xattrs"):
            if getattr(options, flag):
                args.append("--" + flag.replace("_", "-"))
        if not options.from_file:
            args.append(f"--digest-store={self.objects}")
        proc = subprocess.run([*args, source.path, str(staged)], capture_output=True, text=True)
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
        image = staged.read_bytes()
        manifest = manifest_of(read_image(str(staged)))
        return Outcome(staged, fsverity.digest_bytes(image).hex(), len(image), manifest, len(manifest))


def manifest_of(root) -> list[tuple[str, int]]:
    """(object path, size) of every backing object a tree references, once each.

    A backing path that is not an object path of the digest store is refused
    (InvalidInput): a dump may name any path (``/etc``, ``../../x``), and gc
    would remove what such a name, joined onto the store, points at.
    """
    from ..composefs.fsverity import OBJECT_PATH_RULE, is_object_path

    objects: dict[str, int] = {}
    for node in _files([root]):
        obj = node.payload.decode("utf-8", "surrogateescape")
        if obj not in objects and not is_object_path(obj):
            # the first such file in path order is the one named
            path, node = next((p, n) for p, n in root.walk() if n.is_reg and n.payload and n.content is None
                              and n.size > 0 and not is_object_path(n.payload.decode("utf-8", "surrogateescape")))
            raise errors.InvalidInput(f"{os.fsdecode(path)}: backing path "
                                      f"{node.payload.decode('utf-8', 'surrogateescape')!r} is not in the digest "
                                      f"store ({OBJECT_PATH_RULE})")
        objects[obj] = node.size
    return sorted(objects.items())


def _files(roots):
    """The regular files with a backing object in the trees at ``roots`` (hard links not again), any order."""
    stack = list(roots)
    while stack:
        node = stack.pop()
        if node.link is not None:
            continue
        if node.children:
            stack.extend(node.children.values())
        elif node.payload and node.content is None and node.size > 0 and stat.S_ISREG(node.mode):
            yield node


def _objects(roots):
    """The object paths the files of the trees at ``roots`` reference."""
    return (node.payload.decode("utf-8", "surrogateescape") for node in _files(roots))
