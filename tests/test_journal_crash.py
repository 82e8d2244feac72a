"""A writer killed with SIGKILL at any moment leaves a sound journal: the last
committed event is there, nothing of the torn transaction is, the chain verifies
and the projection equals a rebuild."""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import time
from pathlib import Path

from aptlayer.journal import Journal
from aptlayer.journal.projection import TABLES

_TORN = """
import os, signal, sys
from aptlayer.journal import Journal
j = Journal.open(sys.argv[1])
with j.transaction() as w:
    w.append("tx.begun", "torn", {}, "torn")
    w.append("image.created", "x", {"digest": "D"}, "torn", manifest=[("o", 1)])
    os.kill(os.getpid(), signal.SIGKILL)
"""

_LOOP = """
import sys
from aptlayer.journal import Journal
j = Journal.open(sys.argv[1])
i = 0
while True:
    i += 1
    tx = f"{sys.argv[2]}-{i}"
    j.append("tx.begun", tx, {}, tx)
    with j.transaction() as w:
        w.append("image.created", tx, {"digest": f"D{i % 7}"}, tx, manifest=[(f"o{i % 7}", 1), ("s", 2)])
        w.append("tx.committed", tx, {}, tx)
    if i % 3 == 0:
        with j.transaction() as w:
            w.append("image.deleted", tx, {"digest": f"D{i % 7}"}, tx + "-d")
"""


def snapshot(j: Journal) -> dict[str, list]:
    return {t: sorted(j.conn.execute(f"SELECT * FROM {t}").fetchall(), key=repr) for t in TABLES}


def assert_sound(path: Path) -> int:
    with Journal.open(path) as j:
        n = j.verify()
        assert j.check() == []
        before = snapshot(j)
        j.rebuild()
        assert snapshot(j) == before
        return n


def test_kill_inside_a_transaction_loses_only_it(tmp_path: Path) -> None:
    path = tmp_path / "journal.db"
    with Journal.open(path) as j:
        j.append("tx.begun", "t0", {}, "t0")
    proc = subprocess.run([sys.executable, "-c", _TORN, str(path)])
    assert proc.returncode == -signal.SIGKILL
    assert assert_sound(path) == 1
    with Journal.open(path) as j:
        assert j.image("x") is None and j.manifest("D") == []
        assert (path.parent / "journal.db-wal").exists()  # recovered from, never deleted


def test_random_kills_of_concurrent_writers(tmp_path: Path) -> None:
    path = tmp_path / "journal.db"
    Journal.open(path).close()
    rng = random.Random(4)
    last = 0
    for round_ in range(6):
        procs = [subprocess.Popen([sys.executable, "-c", _LOOP, str(path), f"r{round_}p{n}"]) for n in range(2)]
        time.sleep(0.4 + rng.random() * 0.6)
        for p in procs:
            p.send_signal(signal.SIGKILL)
            p.wait()
        n = assert_sound(path)
        assert n >= last
        last = n
    assert last > 0
