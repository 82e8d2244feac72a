"""Rule 7 of docs/security.md: keyed checkpoints find a fully rewritten history.

The attack edits an early event and recomputes every chain hash after it:
``journal verify`` alone then passes (the rewrite is complete), and only
``journal verify --key`` finds it.
"""

from __future__ import annotations

import json
import os
import sqlite3
from pathlib import Path

from aptlayer.journal.log import GENESIS, chain_hash

from crashkit import run_cli


def store_with_history(tmp_path: Path) -> Path:
    root = tmp_path / "store"
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_text("x" * 100)
    run_cli(root, "image", "create", str(src), "one")
    run_cli(root, "image", "create", str(src), "two")
    run_cli(root, "image", "delete", "one")
    return root


def rewrite_history(journal: Path) -> None:
    """Make the first event say someone else did it, and recompute every hash after it (and the
    projection's record of the last one): all that someone with write access to the file can do."""
    with sqlite3.connect(journal) as db:
        db.execute("""UPDATE events SET actor = '{"user":"mallory"}' WHERE seq = 1""")
        prev = GENESIS
        for seq, at, tx, kind, subject, data, actor in db.execute(
                "SELECT seq, at, tx, kind, subject, data, actor FROM events ORDER BY seq").fetchall():
            prev = chain_hash(prev, seq, at, tx, kind, subject, data, actor)
            db.execute("UPDATE events SET hash = ? WHERE seq = ?", (prev, seq))
        db.execute("UPDATE meta SET applied_hash = ?", (prev,))  # the projection's note of the last hash too


def test_a_rewritten_chain_passes_verify_but_not_verify_with_the_key(tmp_path: Path) -> None:
    root = store_with_history(tmp_path)
    key = tmp_path / "etc" / "journal.key"
    assert "checkpoint at seq" in run_cli(root, "journal", "checkpoint", "--key", str(key)).stdout
    assert oct(key.stat().st_mode & 0o777) == "0o600"
    ok = json.loads(run_cli(root, "journal", "verify", "--key", str(key), "--json").stdout)
    assert ok["checkpoints"] == 1 and ok["ok"] is True
    rewrite_history(root / "journal.db")
    assert run_cli(root, "journal", "verify").returncode == 0  # the chain alone cannot tell
    proc = run_cli(root, "journal", "verify", "--key", str(key), check=False)
    assert proc.returncode == 10
    assert "the journal's history was rewritten" in proc.stderr


def test_a_checkpoint_forged_without_the_key_is_refused(tmp_path: Path) -> None:
    root = store_with_history(tmp_path)
    key = tmp_path / "journal.key"
    run_cli(root, "journal", "checkpoint", "--key", str(key))
    rewrite_history(root / "journal.db")
    with sqlite3.connect(root / "journal.db") as db:
        seq, new_hash = db.execute("SELECT seq, hash FROM events ORDER BY seq DESC LIMIT 1").fetchone()
    (root / "checkpoints").write_text(f"{seq} {new_hash} {'0' * 64}\n")
    proc = run_cli(root, "journal", "verify", "--key", str(key), check=False)
    assert proc.returncode == 10 and "not made with this key" in proc.stderr


def test_a_key_others_can_read_is_refused(tmp_path: Path) -> None:
    root = store_with_history(tmp_path)
    key = tmp_path / "journal.key"
    key.write_text(os.urandom(32).hex())
    key.chmod(0o644)
    proc = run_cli(root, "journal", "checkpoint", "--key", str(key), check=False)
    assert proc.returncode == 11 and f"journal key {key} must be root's alone" in proc.stderr
