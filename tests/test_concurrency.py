"""Several ``apt-layer`` processes at once against one store.

Creates of overlapping trees race with deletes and with gcs that sweep the
very objects the creates dedupe against. Afterwards the store must be whole:
every live image has all its objects, the projection equals a rebuild, the
chain verifies, and after a final ``gc --full`` the digest store holds
exactly the objects live images reference.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from aptlayer import inventory
from aptlayer.journal.projection import TABLES
from aptlayer.maintenance import Maintenance
from aptlayer.store import Store

REPO = Path(__file__).resolve().parent.parent
POOL = 60  # distinct file contents; tree i holds contents i*6 .. i*6+17, so neighbours share


def make_tree(root: Path, i: int) -> Path:
    for n in range(i * 6, i * 6 + 18):
        path = root / f"d{n % 4}" / f"f{n}"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(f"content {n % POOL}\n".encode() * (10 + n % POOL))
    return root


def start(root: Path, *args: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-m", "aptlayer", "--root", str(root), "-q", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def finish(procs: list[subprocess.Popen]) -> list[tuple[int, str]]:
    return [(p.wait(timeout=120), p.communicate()[1]) for p in procs]


def projection(store: Store) -> dict[str, list]:
    return {t: store.journal.conn.execute(f"SELECT * FROM {t} ORDER BY 1, 2").fetchall() for t in TABLES}


@pytest.fixture
def trees(tmp_path: Path) -> list[Path]:
    return [make_tree(tmp_path / f"tree{i}", i) for i in range(8)]


def test_creates_deletes_and_gcs_at_once_leave_a_whole_store(tmp_path: Path, trees: list[Path]) -> None:
    root = tmp_path / "store"
    for rc, err in finish([start(root, "image", "create", "--backend", "python", str(trees[i]), f"old{i}")
                           for i in range(0, 8, 2)]):
        assert rc == 0, err
    procs = [start(root, "image", "create", "--backend", "python", str(t), f"new{i}") for i, t in enumerate(trees)]
    procs += [start(root, "image", "delete", f"old{i}") for i in range(0, 8, 2)]
    procs += [start(root, "gc"), start(root, "gc", "--full"), start(root, "gc")]
    procs += [start(root, "image", "create", "--backend", "python", str(trees[1]), "same-name") for _ in range(2)]
    results = finish(procs)
    assert all(rc == 0 for rc, _ in results[:-2]), results
    assert sorted(rc for rc, _ in results[-2:]) == [0, 4], results[-2:]
    loser = max(results[-2:])[1]
    assert re.fullmatch(r"apt-layer: (an image named 'same-name' exists|"
                        r"image\.created 'same-name' \(seq \d+\): name is taken by a live image)\n", loser)
    assert_whole(root, [f"new{i}" for i in range(8)] + ["same-name"])


def test_creates_race_gcs_sweeping_their_dedupe_hits(tmp_path: Path, trees: list[Path]) -> None:
    root = tmp_path / "store"
    for rc, err in finish([start(root, "image", "create", "--backend", "python", str(t), f"img{i}")
                           for i, t in enumerate(trees[:4])]):
        assert rc == 0, err
    for rc, err in finish([start(root, "image", "delete", f"img{i}") for i in range(4)]):
        assert rc == 0, err
    procs = []
    for i, t in enumerate(trees[:4]):
        procs += [start(root, "image", "create", "--backend", "python", str(t), f"again{i}"), start(root, "gc")]
    for rc, err in finish(procs):
        assert rc == 0, err
    assert_whole(root, [f"again{i}" for i in range(4)])


def assert_whole(root: Path, names: list[str]) -> None:
    """Every live image complete; rebuild == projection; after gc --full nothing unreferenced."""
    store = Store.open(root)
    try:
        assert sorted(i["name"] for i in inventory.images(store)) == sorted(names)
        for name in names:
            assert store.missing_objects(name) == [], name
        m = Maintenance(store)
        m.verify()
        before = projection(store)
        assert m.rebuild()["problems"] == []
        assert projection(store) == before
        m.gc(full=True)
        referenced = {o for (o,) in store.journal.conn.execute("SELECT object FROM object_refs WHERE refcount > 0")}
        on_disk = {str(p.relative_to(store.objects_dir)) for p in store.objects_dir.glob("??/*")}
        assert on_disk == referenced
        assert not list(store.objects_dir.glob(".tmp-*"))
        assert list(store.staging_dir.iterdir()) == [] and list(store.trash_dir.iterdir()) == []
        assert inventory.transactions(store, "open") == []
    finally:
        store.close()
