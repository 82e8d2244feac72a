#!/usr/bin/env python3
"""Torture apt-layer: random operations killed with SIGKILL at random moments.

Each iteration picks an operation that fits the store's state (create, with
or without a transaction, delete, deploy, rollback, tx begin/commit/rollback,
gc, gc --full), starts it as a real ``apt-layer`` process and kills it from
outside after a random delay drawn from how long that operation usually
takes, so kills land anywhere, not only at the named fault points. Then
``apt-layer recover`` runs (itself killed at a random moment one time in
four, then run again to its end), and invariants 1-4 of
``tests/crashkit.py`` are checked, 5 (a full gc) every few iterations.

Source trees are tiny and drawn from a shared pool of contents, so objects
are deduplicated between images. A failing iteration keeps a copy of its
store under ``WORKDIR/failures`` and the worker continues on a fresh store.

Example::

    tools/torture.py --iterations 200 --workers 2
    tools/torture.py --iterations 20 --seed 7 --json   # what CI runs

Exit status 0 if no invariant was violated, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from crashkit import KILLED, check_store, make_tree, run_cli, shared_pool, spawn_cli  # noqa: E402

MAX_IMAGES = 8
#: run the full-gc invariant (5) every this many iterations; it empties the garbage incremental gc works on
GC_CHECK_EVERY = 4
#: one recovery in this many is itself killed before it runs to the end
RECOVER_KILL_ODDS = 4
#: one run in this many of each operation is left to finish, to measure how long it takes
CALIBRATE_ODDS = 8
STARTUP_EVERY = 50


@dataclass
class Stats:
    iterations: int = 0
    kills: int = 0
    kills_mid_operation: int = 0
    kills_before_effect: int = 0
    completed: int = 0
    recover_kills: int = 0
    failures: list[dict] = field(default_factory=list)
    per_op: Counter = field(default_factory=Counter)
    per_op_mid: Counter = field(default_factory=Counter)

    def merge(self, other: Stats) -> None:
        for name in ("iterations", "kills", "kills_mid_operation", "kills_before_effect", "completed",
                     "recover_kills"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.failures += other.failures
        self.per_op.update(other.per_op)
        self.per_op_mid.update(other.per_op_mid)


def store_state(root: Path) -> dict:
    """What the journal says now: live images, deployments, open explicit transactions."""
    if not (root / "journal.db").exists():
        return {"images": [], "deployed": {}, "open": [], "staged": {}}
    with closing(sqlite3.connect(root / "journal.db")) as conn:
        images = [r[0] for r in conn.execute("SELECT name FROM images ORDER BY name")]
        deployed = dict(conn.execute("SELECT slot, image FROM deployments").fetchall())
        open_txs = [r[0] for r in conn.execute(
            "SELECT id FROM transactions WHERE state = 'open' AND explicit = 1 ORDER BY begun_seq")]
        staged = {tx: [(op, name) for op, name in conn.execute(
            "SELECT op, name FROM tx_ops WHERE tx = ? AND effective_seq IS NULL", (tx,))] for tx in open_txs}
    return {"images": images, "deployed": deployed, "open": open_txs, "staged": staged}


def fingerprint(root: Path) -> tuple:
    """Everything a kill could have changed: the event count and every path with its size."""
    events = 0
    if (root / "journal.db").exists():
        with closing(sqlite3.connect(root / "journal.db")) as conn:
            events = conn.execute("SELECT count(*) FROM events").fetchone()[0]
    paths = []
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            if not name.startswith("journal.db") and name != "verified":
                paths.append((p, os.lstat(p).st_size if not os.path.isdir(p) else -1))
    return events, tuple(sorted(paths))


class Worker:
    def __init__(self, seed: int, workdir: Path):
        self.rng = random.Random(seed)
        self.workdir = workdir
        self.pool = shared_pool(self.rng)
        self.root = workdir / "store"
        self.serial = 0
        #: how long each operation took when it was left to finish (seconds)
        self.durations: dict[str, list[float]] = {}
        self.startup: float | None = None
        self.startup_at = 0
        self.stats = Stats()

    # -- choosing an operation ---------------------------------------------------------

    def choose(self) -> tuple[str, list[str]]:
        st = store_state(self.root)
        rng = self.rng
        images, deployed = st["images"], st["deployed"]
        free = [i for i in images if i not in deployed.values()]
        tx = st["open"][0] if st["open"] else None
        staged_names = {n for ops in st["staged"].values() for _, n in ops}
        choices: list[tuple[str, list[str]]] = []
        if len(images) < MAX_IMAGES:
            choices += [("create", self._create_args(None))] * 3
        if images:
            choices.append(("deploy", ["deploy", rng.choice(images)]))
        if free:
            choices += [("delete", ["image", "delete", rng.choice(free)])] * (2 if len(images) > 4 else 1)
        if "previous" in deployed:
            choices.append(("rollback", ["rollback"]))
        if tx is None:
            choices.append(("tx-begin", ["tx", "begin"]))
        else:
            choices += [("create-tx", self._create_args(tx)), ("tx-commit", ["tx", "commit", tx]),
                        ("tx-rollback", ["tx", "rollback", tx])]
            candidates = [i for i in free if i not in staged_names]
            if candidates:
                choices.append(("delete-tx", ["image", "delete", rng.choice(candidates), "--tx", tx]))
            if images:
                choices.append(("deploy-tx", ["deploy", rng.choice(images), "--tx", tx]))
        choices += [("gc", ["gc"]), ("gc-full", ["gc", "--full"])]
        return rng.choice(choices)

    def _create_args(self, tx: str | None) -> list[str]:
        self.serial += 1
        src = make_tree(self.workdir / "src" / str(self.serial % 4), self.rng, self.pool,
                        files=self.rng.randint(2, 8))
        args = ["image", "create", str(src), f"img-{self.serial}", "--backend", "python"]
        return args + (["--tx", tx] if tx else [])

    # -- one iteration ------------------------------------------------------------------

    def _startup(self) -> float:
        """How long apt-layer takes to start and open the store: a kill before that changes nothing.

        Measured again every STARTUP_EVERY iterations: it follows the load of the machine.
        """
        if self.startup is None or self.stats.iterations >= self.startup_at + STARTUP_EVERY:
            self.startup_at = self.stats.iterations
            times = []
            for _ in range(3):
                start = time.monotonic()
                run_cli(self.root, "tx", "list", check=False)
                times.append(time.monotonic() - start)
            self.startup = sorted(times)[1]
        return self.startup

    def kill_randomly(self, op: str, args: list[str]) -> str:
        """Run ``args``, SIGKILL it after a random delay; 'killed' or 'completed'.

        The delay falls between the end of the start-up and the end of a
        typical run of that operation. The first runs of each operation, and
        one in CALIBRATE_ODDS after, are left to finish to measure that.
        """
        runs = self.durations.setdefault(op, [])
        delay = None
        if len(runs) >= 2 and self.rng.randrange(CALIBRATE_ODDS):
            typical = statistics.median(runs[-20:])
            delay = self.rng.uniform(0.9 * min(self._startup(), typical), 1.05 * typical)
        start = time.monotonic()
        proc = spawn_cli(self.root, *args)
        try:
            proc.wait(timeout=delay)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        proc.communicate()
        if proc.returncode == KILLED:
            return "killed"
        if delay is None:  # a run that finished before its kill would bias the measure down
            runs.append(time.monotonic() - start)
        return "completed"

    def recover(self) -> dict:
        if self.rng.randrange(RECOVER_KILL_ODDS) == 0:
            if self.kill_randomly("recover", ["recover"]) == "killed":
                self.stats.recover_kills += 1
        proc = run_cli(self.root, "recover", "--json", check=False)
        if proc.returncode not in (0, 10):
            return {"problems": [{"problem": f"recover exited {proc.returncode}: {proc.stderr.strip()}"}]}
        return json.loads(proc.stdout)

    def iterate(self, i: int) -> None:
        op, args = self.choose()
        before = fingerprint(self.root)
        outcome = self.kill_randomly(op, args)
        s = self.stats
        s.iterations += 1
        s.per_op[op] += 1
        if outcome == "killed":
            s.kills += 1
            if fingerprint(self.root) != before:
                s.kills_mid_operation += 1
                s.per_op_mid[op] += 1
            else:
                s.kills_before_effect += 1
        else:
            s.completed += 1
        problems = check_store(self.root, self.recover(), gc=(i % GC_CHECK_EVERY == 0))
        if problems:
            kept = self.workdir / "failures" / f"iter-{i}"
            shutil.copytree(self.root, kept, symlinks=True)
            s.failures.append({"iteration": i, "op": " ".join(args), "outcome": outcome,
                               "problems": problems, "store": str(kept)})
            shutil.rmtree(self.root)


def run_worker(seed: int, iterations: int, workdir: str) -> Stats:
    work = Path(workdir) / f"worker-{seed}"
    work.mkdir(parents=True, exist_ok=True)
    worker = Worker(seed, work)
    for i in range(iterations):
        worker.iterate(i)
        if (i + 1) % 100 == 0:
            print(f"worker {seed}: {i + 1}/{iterations} iterations, {worker.stats.kills} kills, "
                  f"{len(worker.stats.failures)} failures", file=sys.stderr, flush=True)
    shutil.rmtree(work / "store", ignore_errors=True)
    return worker.stats


def summary(stats: Stats, seconds: float) -> str:
    rows = [("iterations", stats.iterations), ("operations killed", stats.kills),
            ("  killed mid-operation (store changed)", stats.kills_mid_operation),
            ("  killed before any effect", stats.kills_before_effect),
            ("operations that finished first", stats.completed),
            ("recoveries killed", stats.recover_kills),
            ("total SIGKILLs", stats.kills + stats.recover_kills),
            ("invariant failures", len(stats.failures)), ("seconds", round(seconds, 1))]
    width = max(len(r[0]) for r in rows)
    lines = [f"{name:<{width}}  {value}" for name, value in rows]
    lines.append("")
    lines.append(f"{'operation':<12}  {'runs':>5}  {'killed mid-op':>13}")
    for op in sorted(stats.per_op):
        lines.append(f"{op:<12}  {stats.per_op[op]:>5}  {stats.per_op_mid[op]:>13}")
    for f in stats.failures:
        lines.append(f"FAILED iteration {f['iteration']} ({f['op']}, {f['outcome']}): store kept at {f['store']}")
        lines += [f"    {p}" for p in f["problems"][:10]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--iterations", "-n", type=int, default=100, help="iterations per worker")
    parser.add_argument("--workers", "-j", type=int, default=1)
    parser.add_argument("--seed", type=int, default=None, help="seed of the first worker (default: random)")
    parser.add_argument("--workdir", type=Path, default=None, help="where stores live (default: a temp dir)")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args(argv)
    seed = args.seed if args.seed is not None else random.randrange(1 << 30)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="apt-layer-torture-"))
    start = time.monotonic()
    total = Stats()
    with ProcessPoolExecutor(max_workers=args.workers) as pool:
        for stats in pool.map(run_worker, [seed + k for k in range(args.workers)],
                              [args.iterations] * args.workers, [str(workdir)] * args.workers):
            total.merge(stats)
    seconds = time.monotonic() - start
    if args.json:
        print(json.dumps({"seed": seed, "iterations": total.iterations, "kills": total.kills,
                          "kills_mid_operation": total.kills_mid_operation,
                          "kills_before_effect": total.kills_before_effect, "completed": total.completed,
                          "recover_kills": total.recover_kills, "failures": total.failures,
                          "per_op": dict(total.per_op), "seconds": round(seconds, 1)}, indent=2))
    else:
        print(f"seed {seed}, {args.workers} workers, workdir {workdir}")
        print(summary(total, seconds))
    if not total.failures and args.workdir is None:
        shutil.rmtree(workdir, ignore_errors=True)
    return 1 if total.failures else 0


if __name__ == "__main__":
    sys.exit(main())
