"""Drift detection: journal changes to the store that apt-layer did not make.

A :class:`Watcher` observes ``images/`` (recursively, so the digest store
too) and ``deploy/`` with watchdog's inotify observer. An event only names a
path that changed; what the change means is decided later, by comparing the
path's state with the journal's projection:

* an object missing while some root (live, staged, deployed or mounted image)
  needs it: ``drift.object-deleted``; an object whose content no longer hashes
  to its name after a write to it: ``drift.object-modified``. New objects are
  never drift (writers add them), nor are removed objects nobody needs (gc);
* a live image's file missing (``drift.image-deleted``) or not hashing to the
  image's digest (``drift.image-modified``); a ``.composefs`` file of no live
  image (``drift.image-unknown``);
* ``deploy/current`` or ``deploy/previous`` not pointing where the projection
  says (``drift.deploy-changed``).

Files whose names start with ``.`` (temp files) are ignored, and so are
``staging/`` and ``trash/``, which are not watched.

Telling apt-layer's own operations apart. Every operation that changes
watched files holds the store lock from before its first event to after its
last file effect, and each effect that could look like drift follows the
event that makes it necessary. So a verdict stands only if the lock was free
when it was computed and no event was appended meanwhile (the journal's last
seq is the same before and after); otherwise the path is judged again
later. Events wait ``settle`` seconds before they are judged, and repeated
events on a path are coalesced.

Nothing lost, nothing twice. inotify says nothing of what happens in a new
fan-out folder (``images/objects/xx``) before watchdog has added its watch:
an object written and removed in that moment leaves no event. So a new
fan-out folder is itself judged: once the journal can be trusted, every
object a root needs in it is checked. When the kernel's inotify queue overflows,
watchdog drops events; the watcher then rescans (every object a root needs,
every image, both deployment links) and judges what differs. What has been
reported is remembered per path: a drift is journaled once however often it
is seen, and again only if the path was found as the journal says in
between. The differences found at start are remembered the same way but not
journaled: the watcher reports changes, ``fsck`` and ``recover`` the state.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from watchdog.events import (
    EVENT_TYPE_CREATED,
    EVENT_TYPE_DELETED,
    EVENT_TYPE_MODIFIED,
    EVENT_TYPE_MOVED,
    DirCreatedEvent,
    DirDeletedEvent,
    DirMovedEvent,
    FileCreatedEvent,
    FileDeletedEvent,
    FileModifiedEvent,
    FileMovedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers import Observer

from .effects import EFFECTS, Drift, file_digest
from .journal import Event, kinds
from .layout import new_id
from .lock import is_held
from .store import Store

SETTLE_S = 0.3
POLL_S = 0.25
DRAIN_S = 10.0
BARRIER_WAIT_S = 3.0
BARRIER_PREFIX = ".apt-layer-watch-barrier-"
#: the watchdog loggers whose warnings announce an inotify queue overflow
OVERFLOW_LOGGERS = ("watchdog.observers.inotify_c", "watchdog.observers.inotify")
EVENT_FILTER = [FileCreatedEvent, FileDeletedEvent, FileModifiedEvent, FileMovedEvent,
                DirCreatedEvent, DirDeletedEvent, DirMovedEvent]

_OBJECT_RE = re.compile(r"images/objects/([0-9a-f]{2}/[0-9a-f]{62})")
_FANOUT_RE = re.compile(r"images/objects/([0-9a-f]{2})")
#: the paths each target kind stands for: objects here, the file effects' own
_PATTERNS = (("object", _OBJECT_RE), *((effect.kind, effect.pattern) for effect in EFFECTS))


@dataclass(frozen=True)
class Target:
    """What a path is to the store: an object, a new fan-out folder, or a file effect's path."""

    kind: str  # "object", "fanout", or an effect's kind ("image", "deploy")
    key: str  # object path (xx/yyyy...), xx, image name or slot


def classify(relpath: str) -> Target | None:
    """The target a path below the store root stands for, or None if it is none."""
    for kind, pattern in _PATTERNS:
        m = pattern.fullmatch(relpath)
        if m:
            return Target(kind, m.group(1))
    return None


@dataclass(frozen=True)
class _Pending:
    due: float
    modified: bool


class _OverflowFilter(logging.Filter):
    """Turns watchdog's overflow warnings into a rescan request (and swallows them).

    watchdog rebuilds its watches after an ``IN_Q_OVERFLOW`` but does not tell
    event handlers; its warning is the only signal it gives. Its complaint
    about an emitter read racing the observer's stop is swallowed too: that
    race is how every stop ends.
    """

    def __init__(self, on_overflow: Callable[[], None]):
        super().__init__()
        self.on_overflow = on_overflow

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if "overflow" in message.lower():
            self.on_overflow()
            return False
        return "when the thread is inactive" not in message


class _Handler(FileSystemEventHandler):
    def __init__(self, watcher: Watcher):
        self.watcher = watcher

    def on_any_event(self, event: FileSystemEvent) -> None:
        self.watcher._note_event(event)


class Watcher:
    """Watch one store; journal each drift and hand its event to ``on_drift``.

    Use from one thread (the one that opened ``store``): :meth:`start`, then
    :meth:`run` until a stop event or a duration, then :meth:`close`.
    """

    def __init__(self, store: Store, *, settle: float = SETTLE_S,
                 on_drift: Callable[[Event], None] | None = None,
                 on_notice: Callable[[str], None] | None = None):
        self.store = store
        self.settle = settle
        self.on_drift = on_drift or (lambda event: None)
        self.on_notice = on_notice or (lambda message: None)
        self._root_prefix = str(store.root) + os.sep
        self._cond = threading.Condition()
        self._pending: dict[Target, _Pending] = {}
        self._rescan_requested = False
        self._barriers_seen: set[str] = set()
        self._marks: dict[Target, tuple[str, object]] = {}
        self._filter = _OverflowFilter(self._request_rescan)
        self._observer = Observer()
        self._effects = {effect.kind: effect for effect in store.effects}

    # --- lifecycle ---------------------------------------------------------------

    def start(self) -> list[Drift]:
        """Start observing; return the drift already present (the baseline, not journaled)."""
        for name in OVERFLOW_LOGGERS:
            logger = logging.getLogger(name)
            if not logger.isEnabledFor(logging.WARNING):
                logger.setLevel(logging.WARNING)
            logger.addFilter(self._filter)
        handler = _Handler(self)
        self._observer.schedule(handler, str(self.store.images_dir), recursive=True, event_filter=EVENT_FILTER)
        self._observer.schedule(handler, str(self.store.deploy_dir), recursive=False, event_filter=EVENT_FILTER)
        self._observer.start()
        targets = {t: False for t in self._rescan_targets()}
        while (verdicts := self._judge(targets)) is None:
            time.sleep(self.settle)
        for target, drift in verdicts:
            if drift is not None:
                self._marks[target] = (drift.kind, drift.fingerprint)
        return [drift for _, drift in verdicts if drift is not None]

    def run(self, stop: threading.Event, duration: float | None = None) -> None:
        """Judge and journal changes until ``stop`` is set or ``duration`` seconds passed."""
        deadline = None if duration is None else time.monotonic() + duration
        while not stop.is_set() and (deadline is None or time.monotonic() < deadline):
            self._step()

    def close(self) -> int:
        """Stop observing, after judging every change seen so far; return how many stay undecided.

        A barrier file in each watched folder proves that the observer has
        delivered every earlier event before it is stopped.
        """
        self._barrier()
        self._observer.stop()
        self._observer.join()
        deadline = time.monotonic() + DRAIN_S + self.settle
        while (self._pending or self._rescan_requested) and time.monotonic() < deadline:
            self._step()
        for name in OVERFLOW_LOGGERS:
            logging.getLogger(name).removeFilter(self._filter)
        return len(self._pending)

    # --- events in (observer threads) ------------------------------------------------

    def _note_event(self, event: FileSystemEvent) -> None:
        if event.is_directory:
            # A folder moved away takes its files along without an event for each.
            if event.event_type in (EVENT_TYPE_DELETED, EVENT_TYPE_MOVED):
                self._request_rescan()
            elif event.event_type == EVENT_TYPE_CREATED:
                m = _FANOUT_RE.fullmatch(os.fsdecode(event.src_path).removeprefix(self._root_prefix))
                if m:
                    self._enqueue([Target("fanout", m.group(1))], False)
            return
        self._note(os.fsdecode(event.src_path), event.event_type == EVENT_TYPE_MODIFIED)
        if event.event_type == EVENT_TYPE_MOVED:
            self._note(os.fsdecode(event.dest_path), False)

    def _note(self, path: str, modified: bool) -> None:
        name = os.path.basename(path)
        if name.startswith(BARRIER_PREFIX):
            with self._cond:
                self._barriers_seen.add(name)
                self._cond.notify_all()
            return
        target = classify(path.removeprefix(self._root_prefix))
        if target is not None:
            self._enqueue([target], modified)

    def _enqueue(self, targets: Iterable[Target], modified: bool) -> None:
        """Queue targets to be judged after the settle delay.

        Every entry is (re)inserted with the same delay, so the dict stays
        ordered by due time and the due ones are found at its front.
        """
        due = time.monotonic() + self.settle
        with self._cond:
            for target in targets:
                old = self._pending.pop(target, None)
                self._pending[target] = _Pending(due, modified or (old is not None and old.modified))

    def _request_rescan(self) -> None:
        with self._cond:
            self._rescan_requested = True
            self._cond.notify_all()

    # --- the loop (the store's thread) -----------------------------------------------

    def _step(self) -> None:
        with self._cond:
            rescan, self._rescan_requested = self._rescan_requested, False
        if rescan:
            self.on_notice("events were lost (inotify queue overflow): rescanning the store")
            self._enqueue(self._rescan_targets(), False)
        batch = self._take_due()
        if batch:
            self._decide(batch)

    def _take_due(self) -> dict[Target, bool]:
        """Remove and return the due entries (target -> modified), or wait for the next one."""
        with self._cond:
            now = time.monotonic()
            due: dict[Target, bool] = {}
            for target, pending in self._pending.items():
                if pending.due > now:
                    break
                due[target] = pending.modified
            if not due:
                first = next(iter(self._pending.values()), None)
                wait = POLL_S if first is None else min(POLL_S, first.due - now)
                if not self._rescan_requested:
                    self._cond.wait(max(wait, 0.0))
                return due
            for target in due:
                del self._pending[target]
            return due

    def _decide(self, batch: dict[Target, bool]) -> None:
        verdicts = self._judge(batch)
        if verdicts is None:
            undecided = [t for t in batch if self._depends_on_journal(t, batch[t])]
            for modified in (False, True):
                self._enqueue([t for t in undecided if batch[t] == modified], modified)
            return
        self._publish(verdicts)

    def _judge(self, batch: dict[Target, bool]) -> list[tuple[Target, Drift | None]] | None:
        """Each target's verdict, or None if apt-layer may have been mid-operation.

        The last seq is read before the lock is tested: an operation that
        takes the lock after the test appends its first event after that
        read, and its file effects follow that event.
        """
        journal = self.store.journal
        seq = journal.last_seq()
        if is_held(self.store.lock_path):
            return None
        verdicts = []
        for target, modified in batch.items():
            if target.kind == "fanout":  # what it holds that roots need, judged as objects
                verdicts += [(t, self._verdict(t, False)) for t in self._needed_in(target.key)]
            else:
                verdicts.append((target, self._verdict(target, modified)))
        return verdicts if journal.last_seq() == seq else None

    def _depends_on_journal(self, target: Target, modified: bool) -> bool:
        """False only for a new object nobody questioned: never drift, whatever the journal says."""
        return not (target.kind == "object" and not modified and target not in self._marks
                    and os.path.lexists(self.store.objects_dir / target.key))

    def _publish(self, verdicts: list[tuple[Target, Drift | None]]) -> None:
        new: list[Drift] = []
        for target, drift in verdicts:
            if drift is None:
                self._marks.pop(target, None)
                continue
            mark = (drift.kind, drift.fingerprint)
            if self._marks.get(target) != mark:
                self._marks[target] = mark
                new.append(drift)
        if not new:
            return
        tx = new_id()
        with self.store.journal.transaction() as w:
            events = [w.append_event(kinds.parse(d.kind, d.subject, d.data), tx) for d in new]
        for event in events:
            self.on_drift(event)

    def _barrier(self) -> None:
        names = []
        for folder in (self.store.images_dir, self.store.deploy_dir):
            name = f"{BARRIER_PREFIX}{os.getpid()}-{threading.get_ident()}-{len(names)}"
            try:
                with open(folder / name, "x"):
                    pass
            except OSError:
                continue
            names.append((folder, name))
        deadline = time.monotonic() + BARRIER_WAIT_S
        with self._cond:
            while not {n for _, n in names} <= self._barriers_seen and time.monotonic() < deadline:
                self._cond.wait(deadline - time.monotonic())
        for folder, name in names:
            os.unlink(folder / name)

    # --- rescans ----------------------------------------------------------------------

    def _rescan_targets(self) -> list[Target]:
        """Paths to judge after events were lost: needed objects that are missing,
        whatever was reported, every image and both deployment links."""
        s = self.store
        targets = [Target("object", obj) for obj in s.journal.referenced()
                   if not os.path.lexists(s.objects_dir / obj)]
        targets += self._marks
        for kind, effect in self._effects.items():
            targets += [Target(kind, key) for key in effect.keys()]
        return list(dict.fromkeys(targets))

    def _needed_in(self, fanout: str) -> list[Target]:
        """The objects in one fan-out folder that some root needs."""
        return [Target("object", obj) for obj in self.store.journal.referenced_in(fanout)]

    # --- verdicts -----------------------------------------------------------------------

    def _verdict(self, target: Target, modified: bool) -> Drift | None:
        if target.kind == "object":
            return self._object_verdict(target, modified)
        return self._effects[target.kind].drift(target.key)

    def _object_verdict(self, target: Target, modified: bool) -> Drift | None:
        obj = target.key
        path = self.store.objects_dir / obj
        exists = os.path.lexists(path)
        if exists:
            # Only a write, or an earlier report, makes an object worth hashing.
            if not (modified or target in self._marks):
                return None
            found = _object_digest(path)
            if found == obj:
                return None
        journal = self.store.journal
        holders = journal.holders_of(obj)
        if not holders:
            return None
        data = {"path": f"images/objects/{obj}", "object": obj, "images": journal.images_needing(obj),
                "held_by": holders}
        if not exists:
            return Drift("drift.object-deleted", obj, data)
        return Drift("drift.object-modified", obj, {**data, "found_object": found}, fingerprint=found)


def _object_digest(path: os.PathLike) -> str | None:
    """The digest store path the content of ``path`` belongs at (xx/yyyy...)."""
    digest = file_digest(path)
    return None if digest is None else f"{digest[:2]}/{digest[2:]}"
