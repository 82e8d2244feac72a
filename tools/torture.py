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

``--clients N`` starts N operations at once against the store in each
iteration (two or three clients), each killed after its own random delay or
left to finish. An iteration in which every operation finished must leave
nothing for recovery to repair (issue 17: two operations interleaved, then
``tests/interleave.py``'s checks, before the usual recovery and checks).

``--mount-ns`` adds ``image mount`` and ``image unmount``, each mount made
inside a mount namespace of its own (``unshare --mount=FILE``, kept by a
bind mount of its nsfs file and, once the mount command ended, a sleeping
process in it), the unmount run inside it (``nsenter``). Such a mount is not
in the mount table of recovery's namespace, yet it uses the store's objects:
after recovery and gc every file of every namespace's mount must still read.
``--mount-ns pinned`` puts no process in the namespaces: only the bind mount
keeps them (as ``unshare --mount=FILE`` alone does). Needs root, erofs and
overlayfs.

``--layer`` adds package layering: ``install`` onto a bookworm minbase
(``deb-base``, the cached base of tests/debian_base.py, created first) and
``uninstall`` of what a layered image holds, from a local signed repository
(tests/aptrepo.py) named through ``[apt] dir`` in a configuration file. One
of those runs in two is killed at a named point instead of a random moment,
drawn from :data:`LAYER_FAULTS`: with the base mounted writable in staging
(``layer.after-mount``), after dpkg (``layer.after-apt``), or while the new
image is built, staged and committed. Needs root, bubblewrap, erofs and
overlayfs.

Example::

    tools/torture.py --iterations 200 --workers 2
    tools/torture.py --iterations 20 --seed 7 --json   # what CI runs
    tools/torture.py --iterations 200 --clients 3 --mount-ns
    tools/torture.py --iterations 40 --layer

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

from crashkit import (KILLED, check_committed_images, check_projection, check_store,  # noqa: E402
                      check_uncommitted, cli_args, cli_env, make_tree, run_cli, shared_pool)
from interleave import check_nothing_to_recover, mount_unsupported  # noqa: E402

from aptlayer.store import Store  # noqa: E402

MAX_IMAGES = 8
#: run the full-gc invariant (5) every this many iterations; it empties the garbage incremental gc works on
GC_CHECK_EVERY = 4
#: one recovery in this many is itself killed before it runs to the end
RECOVER_KILL_ODDS = 4
#: one run in this many of each operation is left to finish, to measure how long it takes
CALIBRATE_ODDS = 8
STARTUP_EVERY = 50
#: at most this many mount namespaces with a mount at a time (--mount-ns)
MAX_NAMESPACES = 3
#: operations of one iteration still running after this many seconds are a deadlock
HANG_S = 120.0
#: --layer: the base image the packages are layered on, and the packages drawn from
LAYER_BASE = "deb-base"
LAYER_PACKAGES = ("al-lib", "al-app", "al-conf", "al-scripts")
#: --layer: the named points an install or uninstall may be killed at (one run in two)
LAYER_FAULTS = ("layer.after-mount", "layer.after-apt", "create.after-objects", "create.after-stage",
                "commit.after-commit")
#: run in a namespace: whether a composefs mount is at argv[1], and which of its files do not read
_READ_MOUNT = r"""
import json, os, sys
from aptlayer.composefs.mount import is_composefs
from aptlayer.linux.mountinfo import mount_info
mp = sys.argv[1]
mounted = any(m.mount_point == mp and is_composefs(m) for m in mount_info())
bad = []
for d, _, files in os.walk(mp) if mounted else ():
    for f in files:
        p = os.path.join(d, f)
        try:
            if not os.path.islink(p):
                with open(p, "rb") as fh:
                    fh.read()
        except OSError as e:
            bad.append(f"{os.path.relpath(p, mp)}: {e.strerror}")
print(json.dumps({"mounted": mounted, "unreadable": bad}))
"""


@dataclass
class Stats:
    iterations: int = 0
    kills: int = 0
    kills_mid_operation: int = 0
    kills_before_effect: int = 0
    completed: int = 0
    recover_kills: int = 0
    #: iterations whose operations all finished, checked before any recovery
    checked_unrecovered: int = 0
    #: --mount-ns: mounts made in a namespace of their own, and how often recovery marked one lost while it lived
    ns_mounts: int = 0
    ns_marked_lost: int = 0
    failures: list[dict] = field(default_factory=list)
    per_op: Counter = field(default_factory=Counter)
    per_op_mid: Counter = field(default_factory=Counter)
    #: --layer: kills at a named point (APT_LAYER_FAULT), by point
    per_point: Counter = field(default_factory=Counter)

    def merge(self, other: Stats) -> None:
        for name in ("iterations", "kills", "kills_mid_operation", "kills_before_effect", "completed",
                     "recover_kills", "checked_unrecovered", "ns_mounts", "ns_marked_lost"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.failures += other.failures
        self.per_op.update(other.per_op)
        self.per_op_mid.update(other.per_op_mid)
        self.per_point.update(other.per_point)


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


@dataclass
class Namespace:
    """A mount namespace of its own, for one ``image mount``: pinned by a bind mount of its nsfs file."""

    file: Path
    mountpoint: Path
    image: str
    #: a process sleeping in it, started once the mount command ended: namespaces in use have processes
    holder: subprocess.Popen | None = None


@dataclass
class Planned:
    op: str
    args: list[str]
    #: the namespace a mount or unmount runs in
    ns: Namespace | None = None
    #: the named point it is killed at (APT_LAYER_FAULT) instead of after a delay
    fault: str | None = None


@dataclass(frozen=True)
class Layering:
    """--layer: the configuration file naming the test repository, and the base tree."""

    config: Path
    tree: Path


def prepare_layering(workdir: Path) -> Layering:
    """The local repository, an apt directory naming it, a configuration naming that, and the minbase."""
    from aptrepo import AptRepo, default_packages
    from debian_base import base_tree

    repo = AptRepo.build(workdir / "repo", [p for p in default_packages() if p.name in LAYER_PACKAGES])
    etc = workdir / "apt"
    (etc / "sources.list.d").mkdir(parents=True)
    (etc / "sources.list.d" / "torture.sources").write_text(
        f"Types: deb\nURIs: {repo.uri}\nSuites: stable\nComponents: main\nSigned-By: {repo.keyring}\n")
    config = workdir / "config.toml"
    config.write_text(f'[apt]\ndir = "{etc}"\n')
    return Layering(config, base_tree())


class Worker:
    def __init__(self, seed: int, workdir: Path, clients: int = 1, mount_ns: str | None = None,
                 layering: Layering | None = None):
        self.rng = random.Random(seed)
        self.workdir = workdir
        self.pool = shared_pool(self.rng)
        self.root = workdir / "store"
        self.serial = 0
        self.clients = clients
        self.mount_ns = mount_ns
        self.namespaces: list[Namespace] = []
        self.layering = layering
        #: --layer: the packages each layered image was asked to hold (by the image's name)
        self.layered: dict[str, list[str]] = {}
        self.ns_dir = workdir / "ns"
        if mount_ns:
            # a bind mount of a namespace file needs a mount with private propagation around it
            self.ns_dir.mkdir(exist_ok=True)
            subprocess.run(["mount", "--bind", str(self.ns_dir), str(self.ns_dir)], check=True)
            subprocess.run(["mount", "--make-private", str(self.ns_dir)], check=True)
        #: how long each operation took when it was left to finish (seconds)
        self.durations: dict[str, list[float]] = {}
        self.startup: float | None = None
        self.startup_at = 0
        self.stats = Stats()

    # -- choosing an operation ---------------------------------------------------------

    def choose(self) -> Planned:
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
        if self.layering:
            choices += self._layer_choices(images)
        if self.mount_ns:
            if images and len(self.namespaces) < MAX_NAMESPACES:
                choices += [("mount-ns", ["image", "mount", rng.choice(images)])] * 2
            if self.namespaces:
                choices.append(("unmount-ns", ["image", "unmount"]))
        op, args = rng.choice(choices)
        if op == "mount-ns":
            self.serial += 1
            ns = Namespace(self.ns_dir / f"ns-{self.serial}", self.workdir / "mnt" / str(self.serial), args[-1])
            ns.file.touch()
            ns.mountpoint.mkdir(parents=True)
            self.namespaces.append(ns)
            return Planned(op, [*args, str(ns.mountpoint)], ns)
        if op == "unmount-ns":
            ns = rng.choice(self.namespaces)
            return Planned(op, [*args, str(ns.mountpoint)], ns)
        if op in ("install", "uninstall"):
            return Planned(op, args, fault=rng.choice(LAYER_FAULTS) if rng.randrange(2) else None)
        return Planned(op, args)

    def _layer_choices(self, images: list[str]) -> list[tuple[str, list[str]]]:
        """--layer: make the base, install packages onto it, uninstall some from a layered image."""
        rng = self.rng
        config = ["--config", str(self.layering.config)]
        if LAYER_BASE not in images:
            create = ["image", "create", str(self.layering.tree), LAYER_BASE, "--backend", "python"]
            return [("layer-base", create)] * 3
        choices = []
        deploy = [] if rng.randrange(2) else ["--no-deploy"]
        if len(images) < MAX_IMAGES:
            self.serial += 1
            name = f"layer-{self.serial}"
            packages = rng.sample(LAYER_PACKAGES, rng.randint(1, 2))
            self.layered[name] = packages
            choices += [("install", [*config, "install", "--from", LAYER_BASE, "--name", name, *deploy,
                                     *packages])] * 6
        layered = [i for i in images if i in self.layered]
        if layered:
            image = rng.choice(layered)
            self.serial += 1
            name = f"layer-{self.serial}"
            package = rng.choice(self.layered[image])
            self.layered[name] = [p for p in self.layered[image] if p != package]
            choices += [("uninstall", [*config, "uninstall", "--from", image, "--name", name, *deploy,
                                       package])] * 3
        return choices

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

    def _kill_delay(self, op: str) -> float | None:
        """When to kill a run of ``op``: None (let it finish) for the first runs and one in CALIBRATE_ODDS.

        The delay falls between the end of the start-up and the end of a
        typical run of that operation, as measured on the runs left to finish.
        """
        runs = self.durations.setdefault(op, [])
        if len(runs) >= 2 and self.rng.randrange(CALIBRATE_ODDS):
            typical = statistics.median(runs[-20:])
            return self.rng.uniform(0.9 * min(self._startup(), typical), 1.05 * typical)
        return None

    def _argv(self, plan: Planned) -> list[str]:
        argv = cli_args(self.root, *plan.args)
        if plan.op == "mount-ns":
            return ["unshare", f"--mount={plan.ns.file}", "--propagation", "private", "--", *argv]
        if plan.op == "unmount-ns":
            return ["nsenter", f"--mount={plan.ns.file}", "--", *argv]
        return argv

    def run_killing(self, plans: list[Planned]) -> list[str]:
        """Start every plan at once, SIGKILL each after its own delay; 'killed' or 'completed' each.

        unshare and nsenter exec apt-layer in the same process, so the kill
        lands on apt-layer. Operations still running after HANG_S are killed
        and reported as 'hung'.
        """
        start = time.monotonic()
        running = [(plan, None if plan.fault else self._kill_delay(plan.op),
                    subprocess.Popen(self._argv(plan), env=cli_env(**({"APT_LAYER_FAULT": plan.fault}
                                                                       if plan.fault else {})),
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)) for plan in plans]
        outcomes: list[str | None] = [None] * len(running)
        while None in outcomes:
            elapsed = time.monotonic() - start
            for i, (plan, delay, proc) in enumerate(running):
                if outcomes[i] is not None:
                    continue
                if proc.poll() is None and (elapsed >= HANG_S or (delay is not None and elapsed >= delay)):
                    proc.kill()
                    proc.wait()
                    if elapsed >= HANG_S:
                        outcomes[i] = "hung"
                        continue
                if proc.returncode is None:
                    continue
                outcomes[i] = "killed" if proc.returncode == KILLED else "completed"
                if plan.fault and outcomes[i] == "killed":
                    self.stats.per_point[plan.fault] += 1
                if delay is None and outcomes[i] == "completed":  # a finish before its kill would bias the measure
                    self.durations.setdefault(plan.op, []).append(elapsed)
            time.sleep(0.002)
        for plan, _, proc in running:
            proc.communicate()
            if plan.op == "mount-ns" and proc.returncode == 0:
                self.stats.ns_mounts += 1
        return outcomes

    def kill_randomly(self, op: str, args: list[str]) -> str:
        return self.run_killing([Planned(op, args)])[0]

    def recover(self) -> dict:
        if self.rng.randrange(RECOVER_KILL_ODDS) == 0:
            if self.kill_randomly("recover", ["recover"]) == "killed":
                self.stats.recover_kills += 1
        proc = run_cli(self.root, "recover", "--json", check=False)
        if proc.returncode not in (0, 10):
            return {"problems": [{"problem": f"recover exited {proc.returncode}: {proc.stderr.strip()}"}]}
        return json.loads(proc.stdout)

    def iterate(self, i: int) -> None:
        plans = [self.choose() for _ in range(self.clients)]
        before = fingerprint(self.root)
        outcomes = self.run_killing(plans)
        changed = fingerprint(self.root) != before
        s = self.stats
        s.iterations += 1
        for plan, outcome in zip(plans, outcomes):
            s.per_op[plan.op] += 1
            if outcome == "killed":
                s.kills += 1
                if changed:  # with several clients: the store changed while this one ran
                    s.kills_mid_operation += 1
                    s.per_op_mid[plan.op] += 1
                else:
                    s.kills_before_effect += 1
            elif outcome == "completed":
                s.completed += 1
        self._hold_namespaces()
        problems = [f"{' '.join(p.args)} still running after {HANG_S:.0f} s: deadlock?"
                    for p, o in zip(plans, outcomes) if o == "hung"]
        if all(o == "completed" for o in outcomes):
            s.checked_unrecovered += 1
            problems += [f"before recovery: {p}" for p in self.check_unrecovered()]
        recovered = self.recover()
        alive = {str(ns.mountpoint) for ns in self.namespaces}
        for a in recovered.get("actions", []):
            if a.get("kind") == "mount.lost" and a.get("mountpoint") in alive:
                s.ns_marked_lost += 1
                problems.append(f"recover marked the mount at {a['mountpoint']} lost, but it lives in another "
                                "mount namespace: gc no longer protects its objects")
        problems += check_store(self.root, recovered, gc=(i % GC_CHECK_EVERY == 0))
        problems += self.check_namespaces()
        if problems:
            kept = self.workdir / "failures" / f"iter-{i}"
            shutil.copytree(self.root, kept, symlinks=True)
            s.failures.append({"iteration": i, "op": " & ".join(" ".join(p.args) for p in plans),
                               "outcome": "/".join(outcomes), "problems": problems, "store": str(kept)})
            self.release_namespaces()
            shutil.rmtree(self.root)
            self.layered.clear()

    def check_unrecovered(self) -> list[str]:
        """Operations that all finished leave a whole store: invariants 1-3, and nothing to recover."""
        store = Store.open(self.root)
        try:
            problems = []
            for check in (check_committed_images, check_uncommitted, check_projection):
                problems += check(store)
            alive = {str(ns.mountpoint) for ns in self.namespaces}
            for p in check_nothing_to_recover(store):
                if "'mount.lost'" in p and any(f"'{mp}'" in p for mp in alive):
                    self.stats.ns_marked_lost += 1
                problems.append(p)
            return problems
        finally:
            store.close()

    # -- mount namespaces (--mount-ns) --------------------------------------------------------

    def _hold_namespaces(self) -> None:
        """Give every namespace that holds its mount a process (unless pinned only); drop those that hold none."""
        for ns in list(self.namespaces):
            if ns.holder is None and self._in_namespace(ns) is not None and self.mount_ns == "held":
                ns.holder = subprocess.Popen(["nsenter", f"--mount={ns.file}", "--", "sleep", "infinity"])

    def _in_namespace(self, ns: Namespace) -> dict | None:
        """What the namespace shows at its mountpoint; None (and the namespace dropped) if it holds no mount."""
        proc = subprocess.run(["nsenter", f"--mount={ns.file}", "--", sys.executable, "-c", _READ_MOUNT,
                               str(ns.mountpoint)], env=cli_env(), capture_output=True, text=True)
        found = json.loads(proc.stdout) if proc.returncode == 0 else {"mounted": False}
        if not found["mounted"]:
            self._release(ns)
            return None
        return found

    def check_namespaces(self) -> list[str]:
        """After recovery (and gc): every file of every namespace's mount still reads."""
        problems = []
        for ns in list(self.namespaces):
            found = self._in_namespace(ns)
            if found and found["unreadable"]:
                problems.append(f"mount of {ns.image} at {ns.mountpoint} in another mount namespace: files "
                                f"do not read (their objects were removed): {found['unreadable'][:5]}")
        return problems

    def _release(self, ns: Namespace) -> None:
        if ns.holder is not None:
            ns.holder.kill()
            ns.holder.wait()
        subprocess.run(["umount", "-l", str(ns.file)], capture_output=True)
        ns.file.unlink(missing_ok=True)
        self.namespaces.remove(ns)

    def release_namespaces(self) -> None:
        for ns in list(self.namespaces):
            self._release(ns)


def run_worker(seed: int, iterations: int, workdir: str, clients: int = 1, mount_ns: str | None = None,
               layering: Layering | None = None) -> Stats:
    work = Path(workdir) / f"worker-{seed}"
    work.mkdir(parents=True, exist_ok=True)
    worker = Worker(seed, work, clients, mount_ns, layering)
    try:
        for i in range(iterations):
            worker.iterate(i)
            if (i + 1) % 100 == 0:
                print(f"worker {seed}: {i + 1}/{iterations} iterations, {worker.stats.kills} kills, "
                      f"{len(worker.stats.failures)} failures", file=sys.stderr, flush=True)
    finally:
        worker.release_namespaces()
        if mount_ns:
            subprocess.run(["umount", "-l", str(worker.ns_dir)], capture_output=True)
    shutil.rmtree(work / "store", ignore_errors=True)
    return worker.stats


def summary(stats: Stats, seconds: float) -> str:
    rows = [("iterations", stats.iterations), ("operations killed", stats.kills),
            ("  killed mid-operation (store changed)", stats.kills_mid_operation),
            ("  killed before any effect", stats.kills_before_effect),
            ("operations that finished first", stats.completed),
            ("recoveries killed", stats.recover_kills),
            ("total SIGKILLs", stats.kills + stats.recover_kills),
            ("iterations checked before recovery", stats.checked_unrecovered),
            ("mounts made in a namespace of their own", stats.ns_mounts),
            ("  marked lost by recovery while mounted", stats.ns_marked_lost),
            ("invariant failures", len(stats.failures)), ("seconds", round(seconds, 1))]
    width = max(len(r[0]) for r in rows)
    lines = [f"{name:<{width}}  {value}" for name, value in rows]
    lines.append("")
    lines.append(f"{'operation':<12}  {'runs':>5}  {'killed mid-op':>13}")
    for op in sorted(stats.per_op):
        lines.append(f"{op:<12}  {stats.per_op[op]:>5}  {stats.per_op_mid[op]:>13}")
    for point in sorted(stats.per_point):
        lines.append(f"killed at {point}: {stats.per_point[point]}")
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
    parser.add_argument("--clients", "-c", type=int, default=1, choices=(1, 2, 3),
                        help="operations started at once against the store in each iteration")
    parser.add_argument("--layer", action="store_true",
                        help="add package layering (install, uninstall) on a bookworm minbase, killed at random "
                             "moments or at the layering's fault points")
    parser.add_argument("--mount-ns", nargs="?", const="held", choices=("held", "pinned"),
                        help="add mounts, each in a mount namespace of its own (held by a process in it, "
                             "or pinned by a bind mount only), and unmounts")
    args = parser.parse_args(argv)
    if args.mount_ns and mount_unsupported():
        parser.error(f"--mount-ns: {mount_unsupported()}")
    seed = args.seed if args.seed is not None else random.randrange(1 << 30)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="apt-layer-torture-"))
    start = time.monotonic()
    total = Stats()
    layering = prepare_layering(workdir) if args.layer else None
    with ProcessPoolExecutor(max_workers=args.workers) as pool:
        for stats in pool.map(run_worker, [seed + k for k in range(args.workers)],
                              [args.iterations] * args.workers, [str(workdir)] * args.workers,
                              [args.clients] * args.workers, [args.mount_ns] * args.workers,
                              [layering] * args.workers):
            total.merge(stats)
    seconds = time.monotonic() - start
    if args.json:
        print(json.dumps({"seed": seed, "iterations": total.iterations, "kills": total.kills,
                          "kills_mid_operation": total.kills_mid_operation,
                          "kills_before_effect": total.kills_before_effect, "completed": total.completed,
                          "recover_kills": total.recover_kills, "checked_unrecovered": total.checked_unrecovered,
                          "ns_mounts": total.ns_mounts, "ns_marked_lost": total.ns_marked_lost,
                          "killed_at_points": dict(total.per_point), "failures": total.failures,
                          "per_op": dict(total.per_op), "seconds": round(seconds, 1)}, indent=2))
    else:
        print(f"seed {seed}, {args.workers} workers, {args.clients} clients each"
              f"{', mounts in namespaces' if args.mount_ns else ''}{', layering' if args.layer else ''}, "
              f"workdir {workdir}")
        print(summary(total, seconds))
    if not total.failures and args.workdir is None:
        shutil.rmtree(workdir, ignore_errors=True)
    return 1 if total.failures else 0


if __name__ == "__main__":
    sys.exit(main())
