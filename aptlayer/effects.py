"""The file effects of committed events: each knows how to apply, redo and judge itself.

An effect is what must happen on disk after an event commits (write-ahead:
the event first, then the effect, which is idempotent). Each effect kind
answers three questions, so that the Store, recovery and watch loop over
:data:`EFFECTS` instead of keeping three parallel chains of cases:

``apply(events)``
    carry out what the events just committed need (the Store, after commit);
``redo(report)``
    make the files agree with the journal after a crash (recovery), telling
    ``report`` what it did and what it found wrong;
``drift(key)``
    the drift at one watched path (watch), or None if it is as the journal says.

Image files (``images/NAME.composefs``) and deployment links (``deploy/*``)
are the effects today; boot entries will be the next.
"""

from __future__ import annotations

import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from . import layout as names
from .composefs import fsverity
from .fault import fault
from .journal import Event, Journal, kinds
from .layout import Layout
from .linux import fsops


@dataclass(frozen=True)
class Drift:
    """One change apt-layer did not make, as ``watch`` will journal it.

    ``fingerprint`` tells one state of a drifted path from another (the digest
    found, the link target found, the digest of the image whose file went):
    a drift is reported again only when it changes.
    """

    kind: str
    subject: str
    data: dict
    fingerprint: object = None


class Report(Protocol):
    """What recovery gives an effect's ``redo``."""

    def act(self, event: kinds.EventData) -> None:
        """Journal a repair (a ``recover.*`` event) and list it."""

    def problem(self, **fields) -> None:
        """List something wrong that recovery does not repair."""


def file_digest(path: os.PathLike) -> str | None:
    """The fs-verity digest of a file, or None if it cannot be read (gone, a folder...)."""
    try:
        return fsverity.digest_file(path).hex()
    except OSError:
        return None


class ImageFiles:
    """``images/NAME.composefs``: placed from staging after ``image.created``, unlinked after ``image.deleted``."""

    kind = "image"
    pattern = re.compile(r"images/([^/.][^/]*)" + re.escape(names.IMAGE_SUFFIX))

    def __init__(self, layout: Layout, journal: Journal):
        self.layout = layout
        self.journal = journal

    def apply(self, events: list[Event]) -> None:
        for ev in events:
            if ev.kind == "image.created":
                self.place(ev.subject, self.layout.root / ev.typed().staged)
                fault("effects.after-place")
            elif ev.kind == "image.deleted":
                self.remove(ev.subject)
                fault("effects.after-unlink")

    def place(self, name: str, staged: Path) -> bool:
        """Move a committed image from staging into ``images/``; False if already there.

        Both directories are reached through fds that follow no symlink below
        the store's root: a staging folder swapped for a link to elsewhere
        fails the rename instead of moving a file in from outside.
        """
        try:
            with self.layout.opened(staged.parent) as src, self.layout.opened(self.layout.images) as dst:
                fsops.rename_at(src, staged.name, dst, self.layout.image(name).name)
                fsops.fsync(dst)
        except FileNotFoundError:
            return False
        return True

    def remove(self, name: str) -> bool:
        with self.layout.opened(self.layout.images) as images:
            try:
                fsops.unlink_at(images, self.layout.image(name).name)
            except FileNotFoundError:
                return False
            fsops.fsync(images)
        return True

    def redo(self, report: Report) -> None:
        """Place images whose staged file is still in staging; unlink what a committed delete left.

        The staged file exists only until the rename that places it, so its
        presence proves the rename never happened, even where an older file
        of the same name and size is in the way. A file in ``images/`` with a
        deleted image's name is unlinked only if it is that image (same
        digest): anything else is reported and kept.
        """
        staged = self._staged_files()
        live = self.journal.images()
        for image in live:
            created = self.journal.event(image.created_seq) if staged else None
            rel = created.typed().staged if created is not None else None
            if rel is not None and rel in staged:
                self.place(image.name, staged[rel])
                fault("recover.after-place")
                report.act(kinds.RecoverImagePlaced(subject=image.name, digest=image.digest, from_=rel))
                continue
            path = self.layout.image(image.name)
            try:
                st = path.stat()
            except FileNotFoundError:
                report.problem(problem="image file missing", image=image.name, path=str(path))
                continue
            if st.st_size != image.size:
                report.problem(problem="image file has the wrong size", image=image.name, path=str(path),
                               expected=image.size, found=st.st_size)
        with os.scandir(self.layout.images) as it:
            files = {n for e in it if (n := names.image_name(e.name)) and e.is_file(follow_symlinks=False)}
        for name in sorted(files - {image.name for image in live}):
            last = self.journal.last_image_event(name)
            if last is not None and last.kind == "image.deleted" and \
                    file_digest(self.layout.image(name)) == last.typed().digest:
                self.remove(name)
                fault("recover.after-unlink")
                report.act(kinds.RecoverImageUnlinked(subject=name))
            else:
                report.problem(problem="unknown image file", image=name, path=str(self.layout.image(name)))

    def _staged_files(self) -> dict[str, Path]:
        """``{"staging/DIR/NAME.composefs": path}`` of every image file in a staging folder."""
        found = {}
        with os.scandir(self.layout.staging) as it:
            folders = [e.name for e in it if e.is_dir(follow_symlinks=False)]
        for folder in folders:
            with os.scandir(self.layout.staging / folder) as it:
                for f in it:
                    if f.name.endswith(names.IMAGE_SUFFIX) and f.is_file(follow_symlinks=False):
                        found[f"staging/{folder}/{f.name}"] = self.layout.staging / folder / f.name
        return found

    def keys(self) -> list[str]:
        """Every image name watch should judge after lost events: live ones and files found."""
        found = {image.name for image in self.journal.images()}
        with os.scandir(self.layout.images) as it:
            found |= {n for e in it if (n := names.image_name(e.name))}
        return sorted(found)

    def drift(self, name: str) -> Drift | None:
        path = self.layout.image(name)
        live = self.journal.image(name)
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            st = None
        data = {"path": self.layout.relative(path), "image": name}
        if st is None:
            if live is None:
                return None
            slots = [slot for slot, dep in self.journal.deployments().items() if dep.image == name]
            return Drift("drift.image-deleted", name, {**data, "digest": live.digest, "deployed": slots},
                         fingerprint=live.digest)
        if live is None:
            return Drift("drift.image-unknown", name, {**data, "size": st.st_size})
        found = file_digest(path) if stat.S_ISREG(st.st_mode) else None
        if found == live.digest:
            return None
        return Drift("drift.image-modified", name,
                     {**data, "digest": live.digest, "found_digest": found,
                      "size": live.size, "found_size": st.st_size}, fingerprint=found)


class DeployLinks:
    """``deploy/current`` and ``deploy/previous``: symlinks the journal's deployments decide."""

    kind = "deploy"
    pattern = re.compile(r"deploy/(" + "|".join(names.SLOTS) + ")")

    def __init__(self, layout: Layout, journal: Journal):
        self.layout = layout
        self.journal = journal

    def apply(self, events: list[Event]) -> None:
        if any(ev.kind in ("deployed", "rolled-back", "undeployed") for ev in events):
            self.sync()
            fault("effects.after-deploy")

    def sync(self) -> list[str]:
        """Make the links match the journal; returns the slots changed.

        Each link is replaced by a rename of a new link over it, so a reader
        (or the next boot) sees the old target or the new, never neither.
        """
        changed = []
        wanted = self.journal.deployments()
        with self.layout.opened(self.layout.deploy) as deploy:
            for slot in names.SLOTS:
                link = self.layout.link(slot).name
                target = names.link_text(wanted[slot].image) if slot in wanted else None
                if _read_link(link, deploy) == target:
                    continue
                if target is None:
                    fsops.unlink_at(deploy, link)
                else:
                    tmp = self.layout.link_temp(slot).name
                    try:
                        fsops.unlink_at(deploy, tmp)
                    except FileNotFoundError:
                        pass
                    fsops.symlink_at(target, deploy, tmp)
                    fault("links.after-temp")
                    fsops.rename_at(deploy, tmp, deploy, link)
                changed.append(slot)
                fault("links.after-swap")
            if changed:
                fsops.fsync(deploy)
        return changed

    def redo(self, report: Report) -> None:
        """Remove temporary links left by a killed writer, then make the links match."""
        with self.layout.opened(self.layout.deploy) as deploy:
            with os.scandir(deploy) as it:
                temps = sorted(e.name for e in it if names.is_link_temp(e.name))
            for name in temps:
                fsops.unlink_at(deploy, name)
            if temps:
                fsops.fsync(deploy)
        if temps:
            report.act(kinds.RecoverDeployTempRemoved(subject="deploy", links=temps))
        changed = self.sync()
        if changed:
            fault("recover.after-deploy-sync")
            report.act(kinds.RecoverDeploySynced(subject="deploy", slots=changed))

    def keys(self) -> list[str]:
        return list(names.SLOTS)

    def drift(self, slot: str) -> Drift | None:
        dep = self.journal.deployments().get(slot)
        expected = names.link_text(dep.image) if dep else None
        found = _read_link(self.layout.link(slot))
        if found == expected:
            return None
        return Drift("drift.deploy-changed", slot,
                     {"path": f"deploy/{slot}", "slot": slot, "target": found, "expected": expected,
                      "image": dep.image if dep else None}, fingerprint=found)


def _read_link(link: Path | str, dir_fd: int | None = None) -> str | None:
    try:
        return os.readlink(link, dir_fd=dir_fd)
    except FileNotFoundError:
        return None
    except OSError:
        return "(not a symlink)"


def clear_staging(layout: Layout, tx: str) -> list[str]:
    """Remove the staging folders of ``tx``; returns the names of those it left alone.

    Only real directories are removed, through file descriptors opened with
    ``O_NOFOLLOW``: an entry of that name that is not one (a symlink planted
    there) was not made by apt-layer and is left, as is whatever it points to.
    """
    left = []
    with layout.opened(layout.staging) as fd:
        with os.scandir(fd) as it:
            entries = [(e.name, e.is_dir(follow_symlinks=False)) for e in it if Layout.belongs_to(e.name, tx)]
        for entry, is_dir in entries:
            if is_dir:
                fsops.remove_tree_at(fd, entry)
            else:
                left.append(entry)
        fsops.fsync(fd)
    return left


#: the effect kinds, in the order they are applied and redone
EFFECTS = (ImageFiles, DeployLinks)
