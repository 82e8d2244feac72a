#!/usr/bin/env python3
"""Make the compatibility fixture: a store written by this apt-layer, as test data.

Drives the CLI of the checkout it lives in (as real processes, some killed
with ``APT_LAYER_FAULT``) so that the journal holds an event of every kind
apt-layer records: creates (directory, ``--from-file``, patched, reused),
explicit transactions committed, rolled back and left open, deletes,
deploys, a rollback, a mount and unmount, mounts lost (in this boot and in
an earlier one), gc with and without ``--grace`` sparing objects, the
``recover.*`` actions and the ``drift.*`` reports of ``watch``. Two boots are
played by fixing the boot id of each command (``COMPAT_BOOT_ID``).

The tarball holds the store (``store/``) and ``expected.json``: every event's
hash, the projection's tables, the dump of every live image. Later code must
verify, rebuild and recover that store unchanged (tests/test_compat_store.py).
Run it as root (mounts) from the checkout whose format the fixture pins:

    tools/make_compat_store.py tests/data/store-v0.1.tar.gz
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import sqlite3
import subprocess
import sys
import tarfile
import tempfile
import time
from contextlib import closing
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BOOT_A = "a" * 32
BOOT_B = "b" * 32

#: runs the CLI with the boot id of COMPAT_BOOT_ID, as if the machine had booted again
_CLI = """
import os, sys
from aptlayer import names
from aptlayer.composefs import objectstore
boot = os.environ["COMPAT_BOOT_ID"]
names.boot_id = lambda: boot
objectstore.BOOT_TAG = boot[:8]
sys.argv[0] = "apt-layer"
from aptlayer.cli import main
sys.exit(main())
"""


class Cli:
    def __init__(self, root: Path):
        self.root = root
        self.boot = BOOT_A

    def env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("APT_LAYER_FAULT")}
        env["PYTHONPATH"] = str(REPO)
        env["COMPAT_BOOT_ID"] = self.boot
        env.update(extra)
        return env

    def args(self, *args: str) -> list[str]:
        return [sys.executable, "-c", _CLI, "--root", str(self.root), "-q", *args]

    def __call__(self, *args: str, codes: tuple[int, ...] = (0,)) -> str:
        proc = subprocess.run(self.args(*args), env=self.env(), capture_output=True, text=True)
        if proc.returncode not in codes:
            raise SystemExit(f"apt-layer {' '.join(args)} -> {proc.returncode}\n{proc.stdout}{proc.stderr}")
        return proc.stdout

    def json(self, *args: str) -> dict:
        return json.loads(self(*args, "--json"))

    def killed(self, point: str, *args: str) -> None:
        proc = subprocess.run(self.args(*args), env=self.env(APT_LAYER_FAULT=point), capture_output=True, text=True)
        if proc.returncode != -9:
            raise SystemExit(f"apt-layer {' '.join(args)} not killed at {point}: {proc.returncode} {proc.stderr}")

    def spawn(self, *args: str) -> subprocess.Popen:
        return subprocess.Popen(self.args(*args), env=self.env(), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)


def tree(path: Path, seed: int, files: int = 4) -> Path:
    """A tiny tree: a few files, an inline one, a symlink, an empty folder."""
    rng = random.Random(seed)
    if path.exists():
        shutil.rmtree(path)
    (path / "etc").mkdir(parents=True)
    (path / "usr" / "lib").mkdir(parents=True)
    (path / "var").mkdir()
    for i in range(files):
        (path / ("etc" if i % 2 else "usr/lib") / f"f{i}").write_bytes(rng.randbytes(rng.randint(100, 1500)))
    (path / "etc" / "small").write_text(f"inline {seed}\n")
    (path / "link").symlink_to("etc/small")
    for p in [path, *path.rglob("*")]:
        os.utime(p, (1_700_000_000 + seed, 1_700_000_000 + seed), follow_symlinks=False)
    return path


def wait_for(cli: Cli, kind: str, count: int) -> None:
    """Until the journal holds ``count`` events of ``kind`` (watch reports asynchronously)."""
    for _ in range(300):
        with closing(sqlite3.connect(cli.root / "journal.db")) as db:
            if db.execute("SELECT count(*) FROM events WHERE kind = ?", (kind,)).fetchone()[0] >= count:
                return
        time.sleep(0.1)
    raise SystemExit(f"watch recorded no {kind}")


def drift(cli: Cli, src: Path) -> None:
    """Change the store behind apt-layer's back while ``watch`` runs, then put every byte back."""
    root = cli.root
    watch = cli.spawn("watch", "--duration", "120")
    time.sleep(3)  # its first scan and inotify watches
    try:
        image = root / "images" / "v2.composefs"
        saved = image.read_bytes()
        image.write_bytes(saved[:-1] + bytes([saved[-1] ^ 1]))
        wait_for(cli, "drift.image-modified", 1)
        image.write_bytes(saved)

        os.rename(image, root / "v2.aside")
        wait_for(cli, "drift.image-deleted", 1)
        os.rename(root / "v2.aside", image)

        unknown = root / "images" / "stranger.composefs"
        unknown.write_bytes(b"not an image")
        wait_for(cli, "drift.image-unknown", 1)
        unknown.unlink()

        link = root / "deploy" / "previous"
        was = os.readlink(link)
        link.unlink()
        link.symlink_to("../images/nowhere.composefs")
        wait_for(cli, "drift.deploy-changed", 1)
        link.unlink()
        link.symlink_to(was)

        with closing(sqlite3.connect(root / "journal.db")) as db:
            held = db.execute("SELECT min(object) FROM object_refs WHERE refcount > 0").fetchone()[0]
        victim = root / "images" / "objects" / held
        content = victim.read_bytes()
        victim.write_bytes(content + b"!")
        wait_for(cli, "drift.object-modified", 1)
        victim.unlink()
        wait_for(cli, "drift.object-deleted", 1)
        victim.write_bytes(content)
        time.sleep(2)  # let watch see the restored files before it stops
    finally:
        watch.terminate()
        watch.wait(30)


def build(root: Path, work: Path) -> None:
    cli = Cli(root)
    src = work / "src"
    mnt = work / "mnt"
    mnt.mkdir()
    # --- boot A --------------------------------------------------------------
    tree(src / "one", 1)
    time.sleep(2.5)  # settled (ctime), so the build cache may remember the tree and reuse its image
    cli("image", "create", "--backend", "python", str(src / "one"), "base")
    reused = cli.json("image", "create", "--backend", "python", str(src / "one"), "base-again")
    assert reused["reused"] == "base", reused
    changed = src / "one" / "etc" / "f1"
    # same size and times: the layout allows a patch
    times = (changed.stat().st_atime, changed.stat().st_mtime)
    changed.write_bytes(bytes(b ^ 0xFF for b in changed.read_bytes()))
    os.utime(changed, times)
    patched = cli.json("image", "create", "--backend", "python", str(src / "one"), "patched")
    assert patched["patched"], patched
    dump = cli("image", "dump", "patched")
    dump = re.sub(r"^(/ \S+ \S+ \S+ \S+ \S+ \S+ )(\d+)", lambda m: m.group(1) + "1600000000", dump, count=1)
    (work / "fromdump.dump").write_text(dump)
    cli("image", "create", "--backend", "python", "--from-file", str(work / "fromdump.dump"), "fromdump")

    t1 = cli("tx", "begin").strip()
    cli("image", "create", "--backend", "python", "--tx", t1, str(tree(src / "two", 2)), "v2")
    cli("image", "delete", "--tx", t1, "base-again")
    cli("deploy", "--tx", t1, "v2")
    cli("tx", "commit", t1)

    t2 = cli("tx", "begin").strip()
    cli("image", "create", "--backend", "python", "--tx", t2, str(tree(src / "three", 3)), "never")
    cli("tx", "rollback", t2)

    cli("deploy", "base")
    cli("deploy", "patched")
    cli("rollback")

    cli("image", "mount", "patched", str(mnt))
    cli("image", "unmount", str(mnt))

    cli("image", "create", "--backend", "python", str(tree(src / "four", 4)), "scratch")
    cli("image", "delete", "scratch")
    assert cli.json("gc")["removed"] > 0
    cli("image", "create", "--backend", "python", str(tree(src / "five", 5)), "scratch2")
    cli("image", "delete", "scratch2")
    assert cli.json("gc", "--grace", "86400")["spared_by_grace"] > 0

    # crashes, then a recovery redoing or undoing what they left
    cli.killed("create.after-commit", "image", "create", "--backend", "python", str(tree(src / "six", 6)), "crashed")
    cli("image", "create", "--backend", "python", str(tree(src / "seven", 7)), "victim")
    cli.killed("delete.after-commit", "image", "delete", "victim")
    cli.killed("links.after-temp", "deploy", "fromdump")
    cli.killed("create.after-image", "image", "create", "--backend", "python", str(tree(src / "eight", 8)), "interrupted")
    cli.killed("mount.after-event", "image", "mount", "base", str(mnt))
    cli("recover")

    # left for the next boot: a mount record, an explicit transaction
    cli.killed("mount.after-event", "image", "mount", "v2", str(mnt))
    t3 = cli("tx", "begin").strip()
    cli("image", "create", "--backend", "python", "--tx", t3, str(tree(src / "nine", 9)), "pending")

    # --- boot B --------------------------------------------------------------
    cli.boot = BOOT_B
    seq, digest = (root / "verified").read_text().split()
    (root / "verified").write_text(f"{int(seq) + 1000} {digest}\n")  # as if verified events were lost
    cli("recover", codes=(10,))  # exit 10: it reports the lost events as a problem
    drift(cli, src)
    t4 = cli("tx", "begin").strip()
    cli("image", "create", "--backend", "python", "--tx", t4, str(tree(src / "ten", 10)), "left-open")
    cli("deploy", "--tx", t4, "left-open")
    assert cli.json("recover") == {"actions": [], "problems": []}


def expected(root: Path, cli: Cli) -> dict:
    """What later code must find in the store: hashes, projection, image dumps."""
    sys.path.insert(0, str(REPO))
    from aptlayer.journal.projection import TABLES

    with closing(sqlite3.connect(root / "journal.db")) as db:
        hashes = [h for (h,) in db.execute("SELECT hash FROM events ORDER BY seq")]
        kinds = sorted({k for (k,) in db.execute("SELECT kind FROM events")})
        tables = {t: db.execute(f"SELECT * FROM {t}").fetchall() for t in TABLES}
        names = [n for (n,) in db.execute("SELECT name FROM images ORDER BY name")]
    return {"hashes": hashes, "kinds": kinds, "projection": tables,
            "dumps": {name: cli("image", "dump", name) for name in names}}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output", type=Path, help="the tarball to write (.tar.gz)")
    args = parser.parse_args()
    if os.geteuid() != 0:
        parser.error("run as root: the fixture holds a real mount and unmount")
    with tempfile.TemporaryDirectory(prefix="compat-") as tmp:
        work = Path(tmp)
        root = work / "store"
        build(root, work)
        facts = expected(root, Cli(root))
        leftovers = [p.name for p in root.iterdir() if p.name.endswith(("-wal", "-shm"))]
        if leftovers:
            raise SystemExit(f"journal not checkpointed: {leftovers}")
        (work / "expected.json").write_text(json.dumps(facts, indent=1, sort_keys=True) + "\n")
        args.output.parent.mkdir(parents=True, exist_ok=True)
        with tarfile.open(args.output, "w:gz") as tar:
            for path in (root, work / "expected.json"):
                tar.add(path, arcname=path.name, filter=_normalize)
    print(f"{args.output}: {args.output.stat().st_size} bytes, {len(facts['hashes'])} events, "
          f"kinds: {' '.join(facts['kinds'])}")
    return 0


def _normalize(info: tarfile.TarInfo) -> tarfile.TarInfo:
    info.uid = info.gid = 0
    info.uname = info.gname = "root"
    return info


if __name__ == "__main__":
    sys.exit(main())
