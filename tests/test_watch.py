"""apt-layer watch: drift detection with watchdog's real inotify observer.

``apt-layer watch --json`` runs in a process of its own while changes are
made by others (``rm``, a Python loop, apt-layer CLI commands, a Store in
the test process); what it decided is read from its output and the journal.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

from aptlayer.composefs import objectstore
from aptlayer.store import CreateOptions, Store
from aptlayer.watch import SETTLE_S, Target, classify

REPO = Path(__file__).resolve().parent.parent
PYTHON = CreateOptions(backend="python", threads=1)


def make_tree(path: Path, files: int, tag: str = "") -> Path:
    """``files`` regular files with distinct content, each large enough to be an object."""
    for i in range(files):
        sub = path / f"d{i % 16:02d}"
        sub.mkdir(parents=True, exist_ok=True)
        (sub / f"f{i}").write_text(f"{tag}{i}".ljust(300, "x"))
    return path


def env() -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO)}


def cli(root: Path, *args: str) -> str:
    proc = subprocess.run([sys.executable, "-m", "aptlayer", "--root", str(root), *args],
                          capture_output=True, text=True, env=env())
    assert proc.returncode == 0, (args, proc.stderr)
    return proc.stdout


def build(root: Path, tmp: Path, *images: tuple[str, int]) -> None:
    """Create each (name, number of files) image with the Store API."""
    store = Store.open(root)
    try:
        for name, files in images:
            store.create(str(make_tree(tmp / f"src-{name}", files, tag=name)), name, PYTHON)
    finally:
        store.close()


def objects_of(root: Path, name: str) -> list[str]:
    store = Store.open(root)
    try:
        return [obj for obj, _ in store.journal.manifest(store.journal.image(name).digest)]
    finally:
        store.close()


def drift_events(root: Path) -> list:
    store = Store.open(root)
    try:
        return list(store.journal.events(kind="drift.*"))
    finally:
        store.close()


class Watch:
    """``apt-layer watch --json`` in a process of its own, its lines collected as they come.

    A process, not a thread: a second Store opened in the watcher's process
    would share the journal file with its connection.
    """

    def __init__(self, root: Path):
        self.proc = subprocess.Popen([sys.executable, "-m", "aptlayer", "--root", str(root), "watch", "--json"],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env())
        self.notices = []
        while not (line := self.proc.stderr.readline()).startswith("apt-layer watch: watching"):
            assert line, self.proc.stderr.read()
            self.notices.append(line)
        self.drifts: list[dict] = []
        self.err = ""
        self.reader = threading.Thread(target=self._read)
        self.reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.drifts.append(json.loads(line))

    def wait_for(self, count: int, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while len(self.drifts) < count and time.monotonic() < deadline:
            time.sleep(0.05)

    def stop(self) -> str:
        """SIGTERM, as systemd stops the service; returns what it said on stderr."""
        os.kill(self.proc.pid, signal.SIGCONT)
        self.proc.terminate()
        err = self.proc.stderr.read()
        assert self.proc.wait(30) == 0, err
        self.reader.join()
        return err


@contextmanager
def watching(root: Path):
    Store.open(root).close()
    watch = Watch(root)
    try:
        yield watch
    finally:
        watch.err = watch.stop()
    assert "undecided" not in watch.err, watch.err


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return tmp_path / "store"


def test_classify_paths():
    obj = "ab/" + "c" * 62
    assert classify(f"images/objects/{obj}") == Target("object", obj)
    assert classify("images/base.composefs") == Target("image", "base")
    assert classify("deploy/current") == Target("deploy", "current")
    for ignored in ("images/.base.composefs", "images/objects/.tmp-0-1-2", "images/objects/ab",
                    "staging/x/base.composefs", "trash/" + "a" * 64, "deploy/.current.tmp-1",
                    "deploy/other", "images/notes.txt", "images/sub/base.composefs"):
        assert classify(ignored) is None, ignored


def test_burst_of_1000_deletions_each_reported_once(root, tmp_path):
    build(root, tmp_path, ("big", 1000), ("small", 5))
    doomed = objects_of(root, "big")
    assert len(doomed) == 1000
    with watching(root) as w:
        subprocess.run([sys.executable, "-c", "import os, sys\nfor p in sys.argv[1:]: os.unlink(p)",
                        *(str(root / "images/objects" / o) for o in doomed)], check=True)
        w.wait_for(1000)
    events = drift_events(root)
    assert [e.kind for e in events] == ["drift.object-deleted"] * 1000
    assert sorted(e.subject for e in events) == sorted(doomed)
    assert all(e.data["images"] == ["big"] and e.data["held_by"] == ["image:big"] for e in events)
    assert len(w.drifts) == 1000


def test_overflow_is_caught_up_by_a_rescan(root, tmp_path):
    """The watcher is stopped (SIGSTOP) while the kernel queue overflows."""
    limit = int(Path("/proc/sys/fs/inotify/max_queued_events").read_text())
    if limit > 100_000:
        pytest.skip(f"max_queued_events is {limit}: too many events to make")
    build(root, tmp_path, ("big", 400))
    doomed = objects_of(root, "big")
    early, late = doomed[:100], doomed[100:300]
    noise = root / "images/objects/noise"
    noise.mkdir()
    with watching(root) as w:
        os.kill(w.proc.pid, signal.SIGSTOP)
        for o in early:
            os.unlink(root / "images/objects" / o)
        for i in range(limit // 2 + 1000):  # a create and a delete each: past the limit
            (noise / f"n{i}").touch()
            (noise / f"n{i}").unlink()
        for o in late:  # their events are past the overflow: only the rescan can see them
            os.unlink(root / "images/objects" / o)
        os.kill(w.proc.pid, signal.SIGCONT)
        w.wait_for(300)
    assert "overflow" in w.err
    assert sorted(d["subject"] for d in w.drifts) == sorted(early + late)
    assert {d["kind"] for d in w.drifts} == {"drift.object-deleted"}
    assert sorted(e.subject for e in drift_events(root)) == sorted(early + late)


def test_apt_layer_operations_are_not_drift(root, tmp_path):
    src_a = make_tree(tmp_path / "a", 40, "a")
    src_b = make_tree(tmp_path / "b", 40, "a")  # the same files: every object deduplicated
    (src_b / "extra").write_text("b" * 500)
    src_c = make_tree(tmp_path / "c", 30, "c")
    cli(root, "image", "create", str(src_a), "a", "--backend", "python")
    victim = objects_of(root, "a")[0]
    with watching(root) as w:
        cli(root, "image", "create", str(src_b), "b", "--backend", "python")
        cli(root, "deploy", "a")
        cli(root, "deploy", "b")
        cli(root, "rollback")
        cli(root, "image", "create", str(src_c), "c", "--backend", "python")
        cli(root, "image", "delete", "c")
        tx = cli(root, "tx", "begin").split()[-1]
        cli(root, "image", "create", "--tx", tx, str(src_c), "c2", "--backend", "python")
        cli(root, "deploy", "--tx", tx, "c2")
        cli(root, "tx", "commit", tx)
        cli(root, "image", "delete", "b")
        cli(root, "gc")
        cli(root, "gc", "--full")
        time.sleep(1)
        assert w.drifts == []
        os.unlink(root / "images/objects" / victim)  # the watcher is alive: a real deletion is seen
        w.wait_for(1)
    assert [(e.kind, e.subject) for e in drift_events(root)] == [("drift.object-deleted", victim)]
    assert not (root / "images/c.composefs").exists()


def test_removing_what_nobody_needs_and_temp_files_are_not_drift(root, tmp_path):
    build(root, tmp_path, ("a", 5), ("b", 5))
    garbage = objects_of(root, "b")
    victim = objects_of(root, "a")[0]
    cli(root, "image", "delete", "b")  # b's objects are garbage now (refcount 0), not yet collected
    with watching(root) as w:
        for obj in garbage:
            os.unlink(root / "images/objects" / obj)
        for folder in ("images", "images/objects", "deploy", "staging", "trash"):
            (root / folder / ".tmp-x").write_text("x")
            (root / folder / ".tmp-x").unlink()
        (root / "staging/b.composefs").write_text("x")
        time.sleep(3 * SETTLE_S)
        assert w.drifts == []
        os.unlink(root / "images/objects" / victim)
        w.wait_for(1)
    assert [(d["kind"], d["subject"]) for d in w.drifts] == [("drift.object-deleted", victim)]


def test_object_deleted_while_a_create_holds_the_store(root, tmp_path, monkeypatch):
    """Objects deleted before the create that wrote them commits are drift once it commits.

    The watcher is stopped while the 20th object is written and deleted: its
    fan-out folder is new, and inotify tells nothing of what happened in a
    folder before its watch was added (the race a loaded machine runs into).
    """
    monkeypatch.setattr(objectstore, "BATCH_OBJECTS", 1)  # each object named as soon as it is copied
    src = make_tree(tmp_path / "src", 40)
    deleted: list[str] = []
    seen: set[str] = set()

    def progress(stats) -> None:
        if stats.files == 19:
            seen.update(p.name for p in (root / "images/objects").glob("??"))
            os.kill(w.proc.pid, signal.SIGSTOP)
        if stats.files == 20 and not deleted:
            new_folders = {p.name for p in (root / "images/objects").glob("??")} - seen
            for obj in sorted((root / "images/objects").glob("??/*")):
                obj.unlink()
                deleted.append(f"{obj.parent.name}/{obj.name}")
            assert new_folders, "the 20th object must land in a new fan-out folder"
            os.kill(w.proc.pid, signal.SIGCONT)
            time.sleep(4 * SETTLE_S)  # the watcher judges them while the create holds the lock

    with watching(root) as w:
        store = Store.open(root)
        try:
            store.create(str(src), "img", PYTHON, progress=progress)
        finally:
            store.close()
        w.wait_for(len(deleted))
    assert deleted
    events = drift_events(root)
    assert sorted(e.subject for e in events) == sorted(deleted)
    assert {e.kind for e in events} == {"drift.object-deleted"}


def test_each_kind_of_drift(root, tmp_path):
    build(root, tmp_path, ("a", 10), ("b", 10))
    cli(root, "deploy", "a")
    images = root / "images"
    modified = objects_of(root, "a")[0]
    with watching(root) as w:
        with open(images / "objects" / modified, "r+b") as f:
            f.write(b"tampered")
        with open(images / "b.composefs", "ab") as f:
            f.write(b"\0")
        (images / "a.composefs").unlink()
        shutil.copy(images / "b.composefs", images / "rogue.composefs")
        tmp_link = root / "deploy/elsewhere"
        tmp_link.symlink_to("../images/b.composefs")
        tmp_link.rename(root / "deploy/current")
        w.wait_for(5)
    got = {e.kind: e for e in drift_events(root)}
    assert sorted(got) == ["drift.deploy-changed", "drift.image-deleted", "drift.image-modified",
                           "drift.image-unknown", "drift.object-modified"]
    obj = got["drift.object-modified"]
    assert obj.subject == modified and obj.data["images"] == ["a"]
    assert obj.data["found_object"] != modified
    assert got["drift.image-modified"].subject == "b"
    assert got["drift.image-modified"].data["found_size"] == got["drift.image-modified"].data["size"] + 1
    assert got["drift.image-deleted"].data == {"path": "images/a.composefs", "image": "a",
                                               "digest": got["drift.image-deleted"].data["digest"],
                                               "deployed": ["current"]}
    assert got["drift.image-unknown"].data["path"] == "images/rogue.composefs"
    assert got["drift.deploy-changed"].data == {
        "path": "deploy/current", "slot": "current", "target": "../images/b.composefs",
        "expected": "../images/a.composefs", "image": "a"}


def test_a_drift_is_reported_again_only_after_it_was_undone(root, tmp_path):
    build(root, tmp_path, ("a", 5))
    obj = root / "images/objects" / objects_of(root, "a")[0]
    saved = tmp_path / "saved"
    with watching(root) as w:
        shutil.copy(obj, saved)
        obj.unlink()
        w.wait_for(1)
        shutil.copy(saved, obj)  # put back: the next deletion is news
        time.sleep(3 * SETTLE_S)
        obj.unlink()
        w.wait_for(2)
        link = root / "deploy/previous"
        link.symlink_to("nowhere")
        w.wait_for(3)
        link.unlink()  # a change back to what the journal says is no drift
        time.sleep(3 * SETTLE_S)
    assert [e.kind for e in drift_events(root)] == ["drift.object-deleted", "drift.object-deleted",
                                                   "drift.deploy-changed"]


def test_drift_found_at_start_is_a_baseline_not_an_event(root, tmp_path):
    build(root, tmp_path, ("a", 5))
    os.unlink(root / "images/objects" / objects_of(root, "a")[0])
    (root / "images/stray.composefs").write_bytes(b"x")
    with watching(root) as w:
        time.sleep(2 * SETTLE_S)
    assert w.notices == ["apt-layer watch: 2 differences from the journal already there "
                         "(not journaled; see apt-layer fsck and recover)\n"]
    assert w.drifts == [] and drift_events(root) == []


def test_cli_prints_a_line_per_drift_for_a_duration(root, tmp_path):
    build(root, tmp_path, ("a", 3))
    proc = subprocess.Popen([sys.executable, "-m", "aptlayer", "--root", str(root), "watch", "--duration", "3"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env())
    assert "watching" in proc.stderr.readline()
    (root / "images/a.composefs").unlink()
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert out.count("\n") == 1
    assert " image-deleted a: file images/a.composefs removed" in out
