"""Every operation killed (SIGKILL) at every fault point it passes, then recovered.

The points are discovered, not listed: each operation runs once on a copy of
the store with ``APT_LAYER_FAULT_LOG`` set, and every point it logged is
then hit in a fresh copy with ``APT_LAYER_FAULT=NAME:N`` (each of the first
hits and the last one where a point repeats). After each kill a real
``apt-layer recover`` runs and invariants 1-5 (``tests/crashkit.py``) must
hold.
"""

from __future__ import annotations

import json
import random
import shutil
import sqlite3
from contextlib import closing
from pathlib import Path

import pytest

from crashkit import check_store, fault_points, kill_at, make_tree, populate, run_cli, shared_pool

#: hits tried per point: the first ones, and the last
FIRST_HITS = 2


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> dict:
    """A store with history: deployments, garbage, strays, an open transaction.

    ``tx`` replaces ``img-c`` by a new image of the same name, creates
    ``img-e`` and deploys it; ``img-d`` was deleted (its objects are
    garbage) and a create killed after writing its objects left strays.
    """
    base = tmp_path_factory.mktemp("crash")
    rng = random.Random(4)
    pool = shared_pool(rng)
    trees = {n: make_tree(base / "src" / n, rng, pool) for n in "abcdefgrx"}
    root = base / "template"
    tx = populate(root, trees, trees["g"])
    with closing(sqlite3.connect(root / "journal.db")) as conn:
        sizes = {r[0] for r in conn.execute(
            "SELECT size FROM images WHERE name = 'img-c' UNION ALL "
            "SELECT json_extract(data, '$.size') FROM tx_ops WHERE op = 'create' AND name = 'img-c'")}
    assert len(sizes) == 1, "the replacement must have the old image's size: recovery once took one for the other"
    assert check_store(_copy(root, base / "check")) == []
    return {"root": root, "base": base, "tx": tx, "trees": trees}


def _copy(src: Path, dst: Path) -> Path:
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst, symlinks=True)
    return dst


def _hits(count: int) -> list[int]:
    return sorted({*range(1, min(count, FIRST_HITS) + 1), count})


def _recover(root: Path) -> dict:
    proc = run_cli(root, "recover", "--json", check=False)
    assert proc.returncode in (0, 10), proc.stderr
    return json.loads(proc.stdout)


def visible(root: Path) -> tuple:
    """What users see: the live images with their digests, and the deployments."""
    with closing(sqlite3.connect(root / "journal.db")) as conn:
        return (tuple(conn.execute("SELECT name, digest FROM images ORDER BY name")),
                tuple(conn.execute("SELECT slot, image, digest FROM deployments ORDER BY slot")))


def kill_everywhere(template: dict, start: Path, *args: str) -> dict[str, list[str]]:
    """Kill ``args`` at each of its points from the state ``start``; recover; check.

    Besides invariants 1-5, the operation must be atomic: after recovery
    users see either the state before it or the state a run to the end
    left. Returns the failures per ``point:n`` (empty when all is well) and
    asserts the operation passed at least one point.
    """
    base = template["base"]
    probe = _copy(start, base / "probe")
    points = fault_points(probe, *args, log=base / "fault.log")
    assert points, f"{' '.join(args)} passed no fault point"
    outcomes = {visible(start), visible(probe)}
    failures: dict[str, list[str]] = {}
    kills = 0
    for point, count in sorted(points.items()):
        for n in _hits(count):
            root = _copy(start, base / "case")
            kill_at(root, point, n, *args)
            kills += 1
            problems = check_store(root, _recover(root))
            if visible(root) not in outcomes:
                problems.append(f"neither before nor after: {visible(root)}")
            if problems:
                failures[f"{point}:{n}"] = problems
    print(f"{' '.join(args[:2])}: {len(points)} fault points, {kills} kills: {dict(points)}")
    return failures


def _op_args(template: dict, op: str) -> tuple[str, ...]:
    trees, tx = template["trees"], template["tx"]
    return {
        "create": ("image", "create", str(trees["f"]), "img-new", "--backend", "python"),
        "create-staged": ("image", "create", str(trees["f"]), "img-new", "--tx", tx, "--backend", "python"),
        "delete": ("image", "delete", "img-x"),
        "delete-staged": ("image", "delete", "img-x", "--tx", tx),
        "deploy": ("deploy", "img-x"),
        "deploy-staged": ("deploy", "img-x", "--tx", tx),
        "rollback": ("rollback",),
        "tx-commit": ("tx", "commit", tx),
        "tx-rollback": ("tx", "rollback", tx),
        "gc": ("gc",),
        "gc-full": ("gc", "--full"),
    }[op]


@pytest.mark.parametrize("op", ["create", "create-staged", "delete", "delete-staged", "deploy", "deploy-staged",
                                "rollback", "tx-commit", "tx-rollback", "gc", "gc-full"])
def test_operation_killed_at_every_point(template, op):
    assert kill_everywhere(template, template["root"], *_op_args(template, op)) == {}


def test_patched_create_killed_at_every_point(template):
    """A create that patches the last image (one file of the tree rewritten), killed at each point."""
    import time

    base = template["base"]
    src = base / "src" / "patched"
    shutil.copytree(template["trees"]["f"], src, symlinks=True)
    start = _copy(template["root"], base / "patch-start")
    time.sleep(2.1)  # settled: the last build's keys vouch for the entries
    run_cli(start, "image", "create", str(src), "img-p0", "--backend", "python")
    (src / "own").write_bytes(random.Random(5).randbytes(3000))
    args = ("image", "create", str(src), "img-new", "--backend", "python", "--json")
    probe = _copy(start, base / "patch-probe")
    assert json.loads(run_cli(probe, *args).stdout)["patched"] == {"from": "img-p0", "changed": 1}
    assert kill_everywhere(template, start, *args) == {}


@pytest.mark.parametrize("crash", ["commit.after-commit", "create.after-commit", "create.after-objects",
                                   "links.after-temp", "delete.after-commit"])
def test_recover_killed_at_every_point(template, crash):
    """Recovery itself, killed at each of its points while it repairs a crashed store."""
    op = {"commit.after-commit": "tx-commit", "create.after-commit": "create",
          "create.after-objects": "create", "links.after-temp": "deploy",
          "delete.after-commit": "delete"}[crash]
    crashed = _copy(template["root"], template["base"] / "crashed")
    kill_at(crashed, crash, 1, *_op_args(template, op))
    assert kill_everywhere(template, crashed, "recover") == {}


def test_torture_small(tmp_path):
    """A short run of tools/torture.py (random SIGKILLs from outside); long runs are reported by hand."""
    import subprocess
    import sys

    from crashkit import REPO, cli_env

    proc = subprocess.run([sys.executable, str(REPO / "tools" / "torture.py"), "--iterations", "20",
                           "--seed", "20", "--json", "--workdir", str(tmp_path)],
                          env=cli_env(), capture_output=True, text=True, timeout=300)
    result = json.loads(proc.stdout)
    assert result["failures"] == [] and proc.returncode == 0, proc.stdout
    assert result["kills"] + result["recover_kills"] > 0
