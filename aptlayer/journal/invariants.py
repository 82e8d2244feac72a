"""Invariants of the projection, recomputed from first principles.

``check_invariants`` does not trust the incremental bookkeeping: it derives
the roots from images, open transactions, deployments and mounts, and the
refcounts from the roots and the manifests, then compares. Tests call it
after every step; ``apt-layer journal verify`` can report it.
"""

from __future__ import annotations

import sqlite3

_EXPECTED_ROOTS = """
    SELECT 'image:' || name, digest FROM images
    UNION ALL
    SELECT 'staged:' || o.tx || ':' || o.name, o.digest
      FROM tx_ops AS o JOIN transactions AS t ON t.id = o.tx
     WHERE o.op = 'create' AND o.effective_seq IS NULL AND t.state = 'open'
    UNION ALL
    SELECT 'deploy:' || slot, digest FROM deployments
    UNION ALL
    SELECT 'mount:' || mountpoint, digest FROM mounts WHERE state = 'mounted'"""

_EXPECTED_REFS = """
    SELECT io.object, count(*), min(io.size)
      FROM (SELECT DISTINCT digest FROM roots) AS r JOIN image_objects AS io ON io.digest = r.digest
     GROUP BY io.object"""


def _pairs(conn: sqlite3.Connection, sql: str) -> set[tuple]:
    return set(conn.execute(sql).fetchall())


def check_invariants(conn: sqlite3.Connection) -> list[str]:
    """Every way the projection disagrees with its definition; empty when sound."""
    problems: list[str] = []
    applied, applied_hash = conn.execute("SELECT applied_seq, applied_hash FROM meta").fetchone()
    last = conn.execute("SELECT seq, hash FROM events ORDER BY seq DESC LIMIT 1").fetchone() or (0, "")
    if (applied, applied_hash) != tuple(last):
        problems.append(f"projection applied up to seq {applied}, journal ends at seq {last[0]}")

    expected_roots = _pairs(conn, _EXPECTED_ROOTS)
    roots = _pairs(conn, "SELECT holder, digest FROM roots")
    for holder, digest in sorted(expected_roots - roots):
        problems.append(f"root {holder} -> {digest} missing")
    for holder, digest in sorted(roots - expected_roots):
        problems.append(f"root {holder} -> {digest} has no reason to exist")
    for (digest,) in conn.execute(
        "SELECT DISTINCT digest FROM roots WHERE digest NOT IN (SELECT digest FROM images_manifest)"
    ):
        problems.append(f"held digest {digest} has no manifest")

    expected = {obj: (count, size) for obj, count, size in conn.execute(_EXPECTED_REFS)}
    for obj, count, size in conn.execute("SELECT object, refcount, size FROM object_refs"):
        want = expected.pop(obj, (0, size))
        if (count, size) != want:
            problems.append(f"object {obj}: refcount {count} size {size}, expected {want[0]} size {want[1]}")
    for obj, (count, _) in sorted(expected.items()):
        problems.append(f"object {obj}: no refcount row, expected {count}")

    for tx, state, pending, effective in conn.execute(
        "SELECT t.id, t.state, sum(o.effective_seq IS NULL), sum(o.effective_seq IS NOT NULL) "
        "FROM transactions AS t JOIN tx_ops AS o ON o.tx = t.id GROUP BY t.id"
    ):
        if state == "committed" and pending:
            problems.append(f"committed transaction {tx} has {pending} staged operations never made effective")
        if state == "aborted" and effective:
            problems.append(f"aborted transaction {tx} has {effective} effective operations")
    orphans = conn.execute("SELECT count(*) FROM tx_ops WHERE tx NOT IN (SELECT id FROM transactions)").fetchone()[0]
    if orphans:
        problems.append(f"{orphans} staged operations belong to no transaction")
    slots = {r[0] for r in conn.execute("SELECT slot FROM deployments")}
    if slots == {"previous"}:
        problems.append("a previous deployment without a current one")
    return problems
