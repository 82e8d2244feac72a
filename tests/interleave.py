"""Two apt-layer operations interleaved at a fault point, then checked (issue 17).

The crash tests kill one process at a time. Here two run against one store,
in a known order: the first runs with ``APT_LAYER_PAUSE=POINT:N`` and stops
itself (SIGSTOP) at the Nth hit of a fault point, holding whatever it holds
there (the store lock, an SQLite write transaction); the second is started
and runs until it ends or waits (asleep, using no CPU) for a lock the first
holds; then the first is resumed and both must finish. Neither finishing is
a deadlock. The points of the first operation are discovered
from its fault log on an identical store, as ``crashkit.fault_points`` does.

No recovery runs in between: two operations that both ran to their end must
leave a whole store by themselves. :meth:`Harness.check` wants

- exit codes: 0, or, where the two touch the same image, transaction,
  mountpoint or deployment, also a refusal (3 not found, 4 conflict);
- crashkit's invariants 1-3: every live image's file is there with the
  journal's digest and all its objects, no image file the journal does not
  explain, ``deploy/current`` and ``deploy/previous`` as the journal's
  deployments say, staging holds only open transactions' work, projection ==
  rebuild, the hash chain verifies;
- no object referenced by a live, deployed, staged or mounted image is gone;
- the kernel's composefs mounts of the store and the journal's agree;
- ``recover`` finds nothing to repair or report: nothing was left half-done;
- ``gc --full`` removes exactly the unreferenced objects (invariant 5), and
  every file of every mount still reads afterwards;
- nothing outside the store changed: the case folder holds, beside the
  store, decoys named like the store's own entries (``images/``,
  ``deploy/``, ``staging/``, ``lock``, a symlink) and the source trees are
  compared too.

``tests/test_interleave.py`` runs a sample of the cases, ``tools/interleave.py``
all of them.
"""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import signal
import subprocess
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from crashkit import (check_committed_images, check_gc, check_projection, check_uncommitted, cli_env,
                      disk_objects, kill_at, make_tree, populate, run_cli, shared_pool, spawn_cli)

from aptlayer.composefs.mount import is_composefs
from aptlayer.linux.mountinfo import MountInfo, mount_info
from aptlayer.recovery import recover
from aptlayer.store import Store

#: the operations of the matrix, in its order
OPS = ("create", "delete", "deploy", "rollback", "tx-commit", "tx-rollback", "gc", "gc-full", "recover",
       "mount", "unmount")
MOUNT_OPS = frozenset({"mount", "unmount"})
#: the second operation counts as waiting for the paused first once it has run this long and its
#: processes have all been asleep, using no CPU, for IDLE seconds (slow to start under load is not waiting)
BLOCK_WAIT = 0.5
IDLE = 0.3
#: how long both may take once the first is resumed; past it, a deadlock
FINISH_WAIT = 60.0
#: exit codes of a refusal that a racing operation can legitimately cause
REFUSED = frozenset({3, 4})

#: the image each naming operation works on, unless its partner says otherwise
_DEFAULT_TARGET = {"create": "img-new", "delete": "img-x", "deploy": "img-x", "mount": "img-x"}
#: what a naming operation aims at when it runs second to a transaction's commit or rollback
_AFTER_TX = {"tx-commit": {"create": "img-e", "delete": "img-c", "deploy": "img-e", "mount": "img-c"},
             "tx-rollback": {"create": "img-e", "delete": "img-c", "mount": "img-c"}}
#: ... and second to an unmount of img-m
_AFTER_UNMOUNT = {"delete": "img-m", "mount": "img-m"}


@dataclass(frozen=True)
class Op:
    """One command of a pair: its arguments and what it works on (for the exit codes it may have)."""

    kind: str
    args: tuple[str, ...]
    touches: frozenset[str] = frozenset()


@dataclass(frozen=True)
class Case:
    first: str
    second: str
    point: str
    nth: int

    @property
    def pair(self) -> str:
        return f"{self.first}+{self.second}"

    @property
    def id(self) -> str:
        return f"{self.pair}@{self.point}:{self.nth}"


@dataclass
class Result:
    case: Case
    #: ok, FAIL, deadlock or unreached (the first ended without reaching its point)
    outcome: str
    codes: tuple[int | None, int | None]
    #: the second did not finish while the first was paused
    waited: bool
    seconds: float
    problems: list[str] = field(default_factory=list)


def mount_unsupported() -> str | None:
    """Why mounts cannot be made here, or None."""
    if os.geteuid() != 0:
        return "needs root"
    with open("/proc/filesystems") as f:
        have = {line.split()[-1] for line in f if line.strip()}
    missing = [fs for fs in ("erofs", "overlay") if fs not in have]
    return f"kernel lacks {', '.join(missing)} (not in /proc/filesystems)" if missing else None


def needs_mounts(first: str, second: str) -> bool:
    return bool({first, second} & MOUNT_OPS)


class Harness:
    """Templates, discovery of points and the cases of pairs, under ``base``.

    The clean template: images ``img-a`` (previous) and ``img-b`` (current
    deployment), ``img-x`` (free: deleted, deployed, mounted by the pairs),
    ``img-c``, ``img-m`` (mounted at ``mnt`` in cases with an unmount),
    ``img-z``; ``img-d`` deleted (garbage) and strays of a killed create; an
    open explicit transaction ``tx`` replacing ``img-c``, creating ``img-e``
    and deploying it (``crashkit.populate``). Pairs with ``recover`` start
    from a crashed copy that gives recovery something to do at each of its
    points: a create killed after its commit, a delete after its commit, a
    rollback between its links, a create before its commit.
    """

    def __init__(self, base: Path, seed: int = 17):
        self.base = Path(os.path.realpath(base))
        rng = random.Random(seed)
        pool = shared_pool(rng)
        self.src = self.base / "src"
        self.trees = {n: make_tree(self.src / n, rng, pool) for n in "abcdegmnrsxz"}
        self.trees["new"] = make_tree(self.src / "new", rng, pool)
        self.tx = ""
        self._templates: dict[bool, Path] = {}
        self._points: dict[tuple, Counter] = {}

    # --- stores -------------------------------------------------------------------------

    def template(self, crashed: bool) -> Path:
        if crashed not in self._templates:
            if crashed:
                root = self.base / "template-crashed"
                shutil.copytree(self.template(False), root, symlinks=True)
                kill_at(root, "create.after-commit", 1, "image", "create", str(self.trees["n"]), "img-r",
                        "--backend", "python")
                kill_at(root, "delete.after-commit", 1, "image", "delete", "img-z")
                kill_at(root, "links.after-temp", 1, "rollback")
                kill_at(root, "create.after-objects", 1, "image", "create", str(self.trees["s"]), "img-s",
                        "--backend", "python")
            else:
                root = self.base / "template"
                self.tx = populate(root, self.trees, self.trees["g"])
                for n in "mz":
                    run_cli(root, "image", "create", str(self.trees[n]), f"img-{n}", "--backend", "python")
            self._templates[crashed] = root
        return self._templates[crashed]

    def prepare(self, where: Path, first: str, second: str) -> Path:
        """A fresh case folder for the pair: the store, mountpoints, decoys; returns the store root."""
        clear(where)
        root = where / "store"
        shutil.copytree(self.template("recover" in (first, second)), root, symlinks=True)
        (where / "mnt").mkdir()
        (where / "mnt2").mkdir()
        _decoys(where)
        if "unmount" in (first, second):
            run_cli(root, "image", "mount", "img-m", str(where / "mnt"))
        return root

    # --- operations -------------------------------------------------------------------------

    def ops(self, first: str, second: str, where: Path) -> tuple[Op, Op]:
        """The two commands of a pair, the second aimed at what the first works on."""
        a = self._op(first, None, where)
        return a, self._op(second, a, where)

    def _op(self, kind: str, first: Op | None, where: Path) -> Op:
        mnt, mnt2 = str(where / "mnt"), str(where / "mnt2")
        name = _DEFAULT_TARGET.get(kind)
        if first is not None and name is not None:
            if first.kind in _DEFAULT_TARGET:
                name = _target(first)
            name = _AFTER_TX.get(first.kind, {}).get(kind, name)
            if first.kind == "unmount":
                name = _AFTER_UNMOUNT.get(kind, name)
            if kind == first.kind == "deploy":
                name = "img-a"  # two deploys of different images: which one the links show
        tx_images = frozenset({"image:img-c", "image:img-e"})
        if kind == "create":
            return Op(kind, ("image", "create", str(self.trees["new"]), name, "--backend", "python"),
                      frozenset({f"image:{name}"}))
        if kind == "delete":
            return Op(kind, ("image", "delete", name), frozenset({f"image:{name}"}))
        if kind == "deploy":
            return Op(kind, ("deploy", name), frozenset({f"image:{name}", "deploy"}))
        if kind == "rollback":
            return Op(kind, ("rollback",), frozenset({"deploy"}))
        if kind == "tx-commit":
            return Op(kind, ("tx", "commit", self.tx), tx_images | {"tx", "deploy"})
        if kind == "tx-rollback":
            return Op(kind, ("tx", "rollback", self.tx), tx_images | {"tx"})
        if kind == "mount":
            where_to = mnt if first is not None and first.kind == "unmount" else mnt2
            return Op(kind, ("image", "mount", name, where_to), frozenset({f"image:{name}", f"mount:{where_to}"}))
        if kind == "unmount":
            where_from = mnt2 if first is not None and first.kind == "mount" else mnt
            image = "img-x" if where_from == mnt2 else "img-m"
            return Op(kind, ("image", "unmount", where_from), frozenset({f"mount:{where_from}", f"image:{image}"}))
        return Op(kind, {"gc": ("gc",), "gc-full": ("gc", "--full"), "recover": ("recover",)}[kind])

    # --- cases --------------------------------------------------------------------------------

    def points(self, first: str, second: str) -> Counter:
        """How often the first operation of the pair passes each fault point, run alone."""
        key = (first, "recover" in (first, second), "unmount" in (first, second))
        if key not in self._points:
            probe = self.base / "probe"
            root = self.prepare(probe, first, second)
            log = self.base / "fault.log"
            log.unlink(missing_ok=True)
            run_cli(root, *self.ops(first, second, probe)[0].args, env=cli_env(APT_LAYER_FAULT_LOG=str(log)))
            self._points[key] = Counter(log.read_text().split()) if log.exists() else Counter()
            clear(probe)
        return self._points[key]

    def cases(self, first: str, second: str) -> list[Case]:
        """One case per point of the first operation and hit: the first hit, and the last."""
        return [Case(first, second, point, n) for point, count in sorted(self.points(first, second).items())
                for n in sorted({1, count})]

    def run(self, case: Case, keep: Path | None = None) -> Result:
        """Run one case and check the store; ``keep``: where to copy the store of a failed case."""
        start = time.monotonic()
        where = self.base / "case"
        root = self.prepare(where, case.first, case.second)
        outside = _snapshot(where, skip={"store", "mnt", "mnt2"}) | _snapshot(self.src)
        first, second = self.ops(case.first, case.second, where)
        p1 = spawn_cli(root, *first.args, env=cli_env(APT_LAYER_PAUSE=f"{case.point}:{case.nth}"))
        if not _stopped(p1, FINISH_WAIT):
            _, err = _finish(p1, FINISH_WAIT)
            clear(where)
            return Result(case, "unreached", (p1.returncode, None), False, time.monotonic() - start,
                          [f"{case.first} ended (exit {p1.returncode}) before {case.point}:{case.nth}: {err}"])
        p2 = spawn_cli(root, *second.args)
        waited = not _ends_or_waits(p2, FINISH_WAIT)
        if not waited:
            out2 = p2.communicate()
        os.kill(p1.pid, signal.SIGCONT)
        out1 = _finish(p1, FINISH_WAIT)
        if waited:
            out2 = _finish(p2, FINISH_WAIT)
        codes = (p1.returncode, p2.returncode)
        if out1 is None or out2 is None:
            problems = [f"deadlock: {'neither' if out1 is None and out2 is None else 'not both'} finished "
                        f"within {FINISH_WAIT:.0f} s of the resume (exits {codes})"]
            outcome = "deadlock"
        else:
            problems = _exit_problems(first, second, codes, out1[1], out2[1])
            problems += self.check(root, where)
            problems += [f"outside the store: {p}" for p in
                         _compare(outside, _snapshot(where, skip={"store", "mnt", "mnt2"}) | _snapshot(self.src))]
            outcome = "FAIL" if problems else "ok"
        if problems and keep is not None:
            shutil.copytree(root, keep / case.id.replace("/", "_"), symlinks=True, dirs_exist_ok=True)
        clear(where)
        return Result(case, outcome, codes, waited, time.monotonic() - start, problems)

    # --- checks ---------------------------------------------------------------------------------

    def check(self, root: Path, where: Path) -> list[str]:
        """The invariants of the module docstring on a store two operations left; what is violated."""
        problems = []
        store = Store.open(root)
        try:
            for check in (check_committed_images, check_uncommitted, check_projection,
                          check_referenced_objects):
                problems += check(store)
            problems += check_mounts_recorded(store, where)
            problems += check_nothing_to_recover(store)
            problems += check_gc(store)
            problems += [f"after gc: {p}" for p in check_committed_images(store)]
            problems += check_mounts_read(where)
        finally:
            store.close()
        return problems


def _target(op: Op) -> str:
    return next(t.split(":", 1)[1] for t in sorted(op.touches) if t.startswith("image:"))


def _exit_problems(first: Op, second: Op, codes, err1: str, err2: str) -> list[str]:
    """Exit 0, or a refusal where the two work on the same thing."""
    allowed = {0} | (REFUSED if first.touches & second.touches else set())
    return [f"{op.kind} ({' '.join(op.args)}) exited {code}, not in {sorted(allowed)}: {err.strip()}"
            for op, code, err in ((first, codes[0], err1), (second, codes[1], err2)) if code not in allowed]


# --- processes ---------------------------------------------------------------------------------


def _state(pid: int) -> str:
    """The process state letter of /proc/PID/stat (``T``: stopped)."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        return f.read().rsplit(b")", 1)[1].split()[0].decode()


def _stopped(proc: subprocess.Popen, timeout: float) -> bool:
    """Wait until ``proc`` stops itself (True) or ends (False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        try:
            if _state(proc.pid) == "T":
                return True
        except FileNotFoundError:
            pass
        time.sleep(0.005)
    raise TimeoutError(f"{proc.args} neither stopped nor ended within {timeout} s")


def _tree_activity(pid: int) -> tuple[int, bool]:
    """CPU ticks used so far by ``pid`` and its descendants, and whether one of them is running or in I/O."""
    stats = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat", "rb") as f:
                    fields = f.read().rsplit(b")", 1)[1].split()
            except OSError:
                continue
            # after the name: state, ppid, ..., utime and stime (the 12th and 13th)
            stats[int(entry)] = (fields[0], int(fields[1]), int(fields[11]) + int(fields[12]))
    tree, changed = {pid}, True
    while changed:
        changed = False
        for p, (_, ppid, _) in stats.items():
            if ppid in tree and p not in tree:
                tree.add(p)
                changed = True
    members = [stats[p] for p in tree if p in stats]
    return sum(used for _, _, used in members), any(state in (b"R", b"D") for state, _, _ in members)


def _ends_or_waits(proc: subprocess.Popen, timeout: float) -> bool:
    """True once ``proc`` ends; False once it waits: asleep, with no CPU used for IDLE seconds."""
    start = time.monotonic()
    last, idle_since = None, start
    while time.monotonic() - start < timeout:
        if proc.poll() is not None:
            return True
        ticks, busy = _tree_activity(proc.pid)
        now = time.monotonic()
        if busy or ticks != last:
            last, idle_since = ticks, now
        elif now - start >= BLOCK_WAIT and now - idle_since >= IDLE:
            return False
        time.sleep(0.02)
    return False


def _finish(proc: subprocess.Popen, timeout: float) -> tuple[str, str] | None:
    """Its output once it ends; None (and it is killed) if it does not end in time."""
    try:
        return proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        return None


# --- the store's checks beyond crashkit's ------------------------------------------------------


def check_referenced_objects(store) -> list[str]:
    """No object of a live, deployed, mounted or staged image is missing from the digest store."""
    on_disk = disk_objects(store)
    holders = store.journal.conn.execute(
        "SELECT 'live image ' || name, digest FROM images "
        "UNION ALL SELECT 'deploy/' || slot || ' (' || image || ')', digest FROM deployments "
        "UNION ALL SELECT 'mount of ' || image || ' at ' || mountpoint, digest FROM mounts WHERE state = 'mounted' "
        "UNION ALL SELECT 'staged image ' || o.name, o.digest FROM tx_ops o JOIN transactions t ON t.id = o.tx "
        "WHERE o.op = 'create' AND o.effective_seq IS NULL AND t.state = 'open'").fetchall()
    problems = []
    for holder, digest in holders:
        missing = sorted(obj for obj, _ in store.journal.manifest(digest) if obj not in on_disk)
        if missing:
            problems.append(f"objects of the {holder} are gone: {missing}")
    return problems


def _kernel_mounts(where: Path) -> dict[str, MountInfo]:
    prefix = str(where) + "/"
    return {m.mount_point: m for m in mount_info() if is_composefs(m) and m.mount_point.startswith(prefix)}


def check_mounts_recorded(store, where: Path) -> list[str]:
    """The kernel's composefs mounts under ``where`` are the journal's mounted records."""
    kernel = set(_kernel_mounts(where))
    journal = dict(store.journal.conn.execute("SELECT mountpoint, image FROM mounts WHERE state = 'mounted'"))
    problems = [f"{mp} is mounted in the kernel but the journal records no mount there: gc does not "
                "protect its objects" for mp in sorted(kernel - set(journal))]
    problems += [f"the journal records {journal[mp]} mounted at {mp}, the kernel has no mount there"
                 for mp in sorted(set(journal) - kernel)]
    return problems


def check_nothing_to_recover(store) -> list[str]:
    """Two operations that ended leave recovery nothing to repair and nothing to report."""
    seq = store.journal.last_seq()
    report = recover(store)
    problems = [f"recover had to repair: {a}" for a in report["actions"]]
    problems += [f"recover reports: {p}" for p in report["problems"]]
    if store.journal.last_seq() != seq and not report["actions"]:
        problems.append(f"recover journaled {store.journal.last_seq() - seq} events")
    return problems


def check_mounts_read(where: Path) -> list[str]:
    """Every file of every composefs mount under ``where`` reads (its object is still there)."""
    problems = []
    for mp in sorted(_kernel_mounts(where)):
        for dirpath, _, filenames in os.walk(mp):
            for name in filenames:
                path = os.path.join(dirpath, name)
                if os.path.islink(path):
                    continue
                try:
                    with open(path, "rb") as f:
                        f.read()
                except OSError as e:
                    problems.append(f"mount {mp}: {os.path.relpath(path, mp)} does not read: {e.strerror}")
    return problems


# --- the case folder ---------------------------------------------------------------------------


def clear(where: Path) -> None:
    """Unmount whatever is mounted under ``where`` (deepest first), then remove it."""
    prefix = str(where) + "/"
    for m in sorted((m for m in mount_info() if m.mount_point.startswith(prefix)),
                    key=lambda m: -len(m.mount_point)):
        subprocess.run(["umount", "-l", m.mount_point], check=False, capture_output=True)
    shutil.rmtree(where, ignore_errors=True)


def _decoys(where: Path) -> None:
    """Files beside the store named like its own, where a path resolved from the wrong folder lands."""
    (where / "images" / "objects" / "ab").mkdir(parents=True)
    (where / "images" / "img-x.composefs").write_bytes(b"decoy image\n")
    (where / "images" / "objects" / "ab" / "cdef").write_bytes(b"decoy object\n")
    (where / "staging" / "leftover").mkdir(parents=True)
    (where / "staging" / "leftover" / "file").write_bytes(b"decoy staging\n")
    (where / "deploy").mkdir()
    (where / "deploy" / "current").symlink_to("../images/img-x.composefs")
    (where / "trash").mkdir()
    (where / "lock").write_bytes(b"")
    (where / "outside").mkdir()
    (where / "outside" / "data").write_bytes(b"keep me\n")
    (where / "outside" / "to-store").symlink_to("../store/images")


def _snapshot(top: Path, skip: set[str] = frozenset()) -> dict[str, tuple]:
    """Every path under ``top`` (not into ``skip`` at its top) with its type, mode, mtime and content."""
    found = {}
    for dirpath, dirnames, filenames in os.walk(top):
        if dirpath == str(top):
            dirnames[:] = [d for d in dirnames if d not in skip]
            filenames = [f for f in filenames if f not in skip]
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            if os.path.islink(path):
                what = ("link", os.readlink(path))
            elif os.path.isdir(path):
                what = ("dir", st.st_mode, st.st_mtime_ns)
            else:
                with open(path, "rb") as f:
                    what = ("file", st.st_mode, st.st_mtime_ns, hashlib.sha256(f.read()).hexdigest())
            found[path] = what
    return found


def _compare(before: dict, after: dict) -> list[str]:
    return ([f"{p} removed" for p in sorted(before.keys() - after.keys())]
            + [f"{p} created" for p in sorted(after.keys() - before.keys())]
            + [f"{p} changed" for p in sorted(before.keys() & after.keys()) if before[p] != after[p]])
