"""The ``apt-layer`` command line: exact output, JSON, exit codes, and bad input.

Most commands run in-process through ``aptlayer.cli.main`` (the real entry
point, with its error-to-exit-code mapping) inside click's CliRunner
isolation; a few run as real processes (``python3 -m aptlayer``) to check
the installed entry point, other users and a full disk. After every refused
command the store is checked: ``journal verify`` passes and no live image
misses an object.
"""

from __future__ import annotations

import gc
import json
import os
import pwd
import shutil
import sqlite3
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest
from click.testing import CliRunner

from aptlayer.cli import main
from aptlayer.composefs import build, fsverity
from aptlayer.journal.projection import TABLES
from aptlayer.store import Store

REPO = Path(__file__).resolve().parent.parent
EPOCH = 1_700_000_000
FILES = {"etc/os-release": b"ID=debian\n", "usr/bin/tool": b"T" * 300, "usr/lib/lib.so": b"L" * 5000,
         "usr/share/doc/readme": b"R" * 100}


@dataclass
class Run:
    rc: int
    out: str
    err: str
    raw: bytes

    def json(self):
        assert self.rc == 0, self.err
        return json.loads(self.out)


def run(root: Path, *args: str) -> Run:
    """``apt-layer --root ROOT ARGS...`` in-process, as ``main()`` runs it."""
    with CliRunner().isolation() as (out, err, _):
        try:
            rc = main(["--root", str(root), *args])
        except SystemExit as e:  # the composefs drop-ins exit like the upstream tools
            rc = e.code
    raw = out.getvalue()
    return Run(rc, raw.decode("utf-8", "replace"), err.getvalue().decode(), raw)


def sh(root: Path, *args: str, **kw) -> subprocess.CompletedProcess:
    """``python3 -m aptlayer --root ROOT ARGS...`` as a real process."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "aptlayer", "--root", str(root), *args],
                          capture_output=True, text=True, env=env, **kw)


def make_tree(root: Path, files: dict[str, bytes] = FILES) -> Path:
    """A tree with fixed mtimes, so its image digest is known in advance."""
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    for path in sorted(root.rglob("*"), reverse=True) + [root]:
        os.utime(path, (EPOCH, EPOCH), follow_symlinks=False)
    return root


def digest_of(src: Path, **options) -> str:
    return build.make_image(str(src), **options).digest.hex()


def obj(data: bytes) -> str:
    return fsverity.object_path(fsverity.digest_bytes(data))


def projection(root: Path) -> dict[str, list]:
    with sqlite3.connect(root / "journal.db") as conn:
        tables = {t: conn.execute(f"SELECT * FROM {t} ORDER BY 1, 2").fetchall() for t in TABLES}
    conn.close()
    return tables


def assert_consistent(root: Path) -> None:
    """The chain verifies and every live image has all its objects."""
    verify = run(root, "journal", "verify")
    assert verify.rc == 0, verify.err
    for image in run(root, "image", "list", "--json").json():
        missing = run(root, "image", "missing-objects", image["name"])
        assert (missing.rc, missing.out) == (0, ""), image["name"]


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return tmp_path / "store"


@pytest.fixture
def src(tmp_path: Path) -> Path:
    return make_tree(tmp_path / "src")


@pytest.fixture
def base(root: Path, src: Path) -> dict:
    """A store with image 'base' built from ``src``."""
    return run(root, "image", "create", "--backend", "python", str(src), "base", "--json").json()


# --- image create / list / info / delete --------------------------------------------------------------------


def test_create_prints_name_digest_size_objects(root: Path, src: Path) -> None:
    r = run(root, "image", "create", "--backend", "python", str(src), "base")
    size = (root / "images/base.composefs").stat().st_size
    assert (r.rc, r.err) == (0, "")
    assert r.out == f"base  {digest_of(src)}  {size / 1024:.1f} KiB, 3 objects\n"


def test_create_json(root: Path, src: Path, base: dict) -> None:
    assert base == {"name": "base", "digest": digest_of(src), "size": (root / "images/base.composefs").stat().st_size,
                    "objects": 3, "objects_missing": 0, "tx": base["tx"], "staged": False, "files": 4, "bytes": 5410,
                    "objects_created": 3, "objects_deduped": 0, "reused": None, "patched": None}
    again = run(root, "image", "create", "--backend", "python", str(src), "again", "--json").json()
    assert (again["objects_created"], again["objects_deduped"]) == (0, 3)


def test_create_from_a_dump_file(root: Path, src: Path, tmp_path: Path, base: dict) -> None:
    dump = tmp_path / "base.dump"
    dump.write_bytes(run(root, "image", "dump", "base").raw)
    r = run(root, "image", "create", "--from-file", "--backend", "python", str(dump), "copy", "--json")
    assert r.json()["digest"] == base["digest"]
    assert (root / "images/copy.composefs").read_bytes() == (root / "images/base.composefs").read_bytes()


@pytest.mark.parametrize("flags, options", [
    (["--use-epoch"], dict(use_epoch=True)),
    (["--skip-xattrs"], dict(skip_xattrs=True)),
    (["--user-xattrs"], dict(user_xattrs=True)),
    (["--skip-devices"], dict(skip_devices=True)),
    (["--min-version", "1"], dict(min_version=1)),
    (["--max-version", "0"], dict(max_version=0)),
    (["--threads", "1"], dict(threads=1)),
])
def test_create_options_are_mkcomposefs_options(root: Path, src: Path, flags: list[str], options: dict) -> None:
    r = run(root, "image", "create", "--backend", "python", *flags, str(src), "img", "--json")
    assert r.json()["digest"] == digest_of(src, **options)


def test_python_and_upstream_backends_give_the_same_digest(root: Path, src: Path, mkcomposefs: str) -> None:
    ours = run(root, "image", "create", "--backend", "python", str(src), "ours", "--json").json()
    theirs = run(root, "image", "create", "--backend", "upstream", str(src), "theirs", "--json").json()
    assert theirs["digest"] == ours["digest"] == digest_of(src)
    assert run(root, "image", "objects", "theirs").out == run(root, "image", "objects", "ours").out
    assert_consistent(root)


def test_list(root: Path, src: Path, base: dict) -> None:
    run(root, "deploy", "base")
    listed = run(root, "image", "list", "--json").json()
    assert listed == [{"name": "base", "digest": base["digest"], "size": base["size"], "objects": 3,
                       "content_bytes": 5400, "deployed": ["current"], "created_at": listed[0]["created_at"],
                       "tx": base["tx"]}]
    size = f"{base['size'] / 1024:.1f} KiB"
    assert run(root, "image", "list").out == (
        f"NAME  DIGEST            SIZE{' ' * (len(size) - 4)}  OBJECTS  CONTENT  DEPLOYED  CREATED\n"
        f"base  {base['digest'][:16]}  {size}  3        5.3 KiB  current   {listed[0]['created_at'][:19]}\n")


def test_list_of_an_empty_store(root: Path) -> None:
    Store.open(root).close()
    assert run(root, "image", "list").out == "NAME  DIGEST  SIZE  OBJECTS  CONTENT  DEPLOYED  CREATED\n"
    assert run(root, "image", "list", "--json").out == "[]\n"


def test_info(root: Path, src: Path, base: dict) -> None:
    info = run(root, "image", "info", "base", "--json").json()
    user = pwd.getpwuid(os.getuid()).pw_name
    assert info == {"name": "base", "digest": base["digest"], "size": base["size"], "path": str(
        root.absolute() / "images/base.composefs"), "objects": 3, "content_bytes": 5400, "deployed": [],
        "mounts": [], "created_seq": 2, "created_at": info["created_at"], "tx": base["tx"], "source": str(src),
        "created_by": {"user": user, "uid": os.getuid(), "host": os.uname().nodename,
                       "pid": info["created_by"]["pid"]}}
    text = run(root, "image", "info", "base").out.splitlines()
    assert text[:5] == [f"name:           base", f"digest:         {base['digest']}",
                        f"path:           {root.absolute()}/images/base.composefs",
                        f"size:           {base['size']}", "objects:        3"]
    assert text[-2:] == ["deployed:       -", "mounts:         -"]


def test_delete(root: Path, base: dict) -> None:
    r = run(root, "image", "delete", "base")
    assert (r.rc, r.out) == (0, "deleted base\n")
    assert not (root / "images/base.composefs").exists()
    assert run(root, "image", "list", "--json").out == "[]\n"
    status = run(root, "status", "--json").json()["store"]
    assert (status["reclaimable_objects"], status["reclaimable_bytes"]) == (3, 5400)


def test_delete_json(root: Path, base: dict) -> None:
    out = run(root, "image", "delete", "base", "--json").json()
    assert out == {"name": "base", "digest": base["digest"], "tx": out["tx"], "staged": False}


# --- listings: byte-identical to composefs-info -------------------------------------------------------------


@pytest.mark.parametrize("what", ["ls", "dump", "objects"])
def test_listings_match_composefs_info(root: Path, base: dict, what: str) -> None:
    ours = run(root, "image", what, "base")
    compat = run(root, "composefs", "info", what, str(root / "images/base.composefs"))
    assert ours.rc == compat.rc == 0
    assert ours.raw == compat.raw and ours.raw


@pytest.mark.parametrize("what", ["ls", "dump", "objects"])
def test_listings_match_upstream_composefs_info(root: Path, base: dict, what: str, composefs_info: str) -> None:
    upstream = subprocess.run([composefs_info, what, str(root / "images/base.composefs")],
                              capture_output=True, check=True).stdout
    assert run(root, "image", what, "base").raw == upstream


def test_filtered_listing_matches_upstream(root: Path, base: dict, composefs_info: str) -> None:
    upstream = subprocess.run([composefs_info, "--filter=usr", "ls", str(root / "images/base.composefs")],
                              capture_output=True, check=True).stdout
    assert run(root, "image", "ls", "base", "--filter", "usr").raw == upstream
    assert b"os-release" not in upstream


def test_objects_lists_the_manifest(root: Path, base: dict) -> None:
    assert run(root, "image", "objects", "base").out == "".join(
        f"{o}\n" for o in sorted(obj(FILES[f]) for f in ("usr/bin/tool", "usr/lib/lib.so", "usr/share/doc/readme")))


def test_missing_objects(root: Path, base: dict, tmp_path: Path) -> None:
    r = run(root, "image", "missing-objects", "base")
    assert (r.rc, r.out, r.err) == (0, "", "")
    assert run(root, "image", "missing-objects", "base", "--json").out == "[]\n"
    dump = tmp_path / "ref.dump"
    ref = "ab/" + "cd" * 31
    dump.write_text(f"/ 0 40755 2 0 0 0 0.0 - - -\n/f 4096 100644 1 0 0 0 0.0 {ref} - -\n")
    assert run(root, "image", "create", "--from-file", str(dump), "ref").rc == 0
    r = run(root, "image", "missing-objects", "ref")
    assert (r.rc, r.out) == (10, f"{ref}\n")
    r = run(root, "image", "missing-objects", "ref", "--json")
    assert (r.rc, json.loads(r.out)) == (10, [ref])


def test_damage_is_reported_not_hidden(root: Path, base: dict) -> None:
    lost = obj(FILES["usr/bin/tool"])
    (root / "images/objects" / lost).unlink()
    r = run(root, "image", "missing-objects", "base")
    assert (r.rc, r.out, r.err) == (10, f"{lost}\n", "")
    (root / "images/base.composefs").unlink()
    for what in ("ls", "dump", "objects"):
        r = run(root, "image", what, "base")
        assert (r.rc, r.out) == (6, "")
        assert r.err == (f"apt-layer: image 'base': file {root.absolute()}/images/base.composefs is missing "
                         "(run apt-layer recover)\n")


# --- deploy, rollback, status -------------------------------------------------------------------------------


def test_deploy_rollback_status(root: Path, src: Path, base: dict) -> None:
    run(root, "image", "create", str(src), "next")
    assert run(root, "deploy", "base").out == "deployed base (previous: -)\n"
    assert run(root, "deploy", "next").out == "deployed next (previous: base)\n"
    assert run(root, "rollback").out == "rolled back to base (previous: next)\n"
    rolled = run(root, "rollback", "--json").json()
    assert rolled == {"current": "next", "digest": base["digest"], "previous": "base", "tx": rolled["tx"],
                      "staged": False}
    status = run(root, "status", "--json").json()
    created = {i["name"]: i["created_at"] for i in run(root, "image", "list", "--json").json()}
    user = pwd.getpwuid(os.getuid()).pw_name
    by = {"user": user, "uid": os.getuid(), "host": os.uname().nodename}
    assert [{k: v for k, v in d["created_by"].items() if k != "pid"}
            for d in status["deployments"].values()] == [by, by]
    assert status["deployments"] == {
        "current": {"image": "next", "digest": base["digest"], "created_at": created["next"],
                    "created_by": status["deployments"]["current"]["created_by"]},
        "previous": {"image": "base", "digest": base["digest"], "created_at": created["base"],
                     "created_by": status["deployments"]["previous"]["created_by"]}}
    assert (status["next_boot"], status["transactions"], status["mounts"]) == ("next", [], [])
    assert status["store"] == {"images": 2, "image_bytes": 2 * base["size"], "objects": 3, "object_bytes": 5400,
                               "reclaimable_objects": 0, "reclaimable_bytes": 0}
    size = f"{2 * base['size'] / 1024:.1f} KiB"
    assert run(root, "status").out == (
        f"Store: {root.absolute()}\n"
        f"● current: next\n      Digest: {base['digest']}\n"
        f"     Created: {created['next'][:19].replace('T', ' ')} UTC by {user}\n"
        f"  previous: base\n      Digest: {base['digest']}\n"
        f"     Created: {created['base'][:19].replace('T', ' ')} UTC by {user}\n"
        "Next boot mounts: next\nOpen transactions: none\nMounts: none\n"
        f"Images: 2 ({size}), objects: 3 (5.3 KiB), reclaimable by gc: 0 objects (0 B)\n"
        f"Journal: {status['journal']['events']} events\n")


def test_status_of_an_empty_store(root: Path) -> None:
    Store.open(root).close()
    assert run(root, "status").out == (
        f"Store: {root.absolute()}\n● current: none\n  previous: none\nNext boot mounts: nothing\n"
        "Open transactions: none\nMounts: none\n"
        "Images: 0 (0 B), objects: 0 (0 B), reclaimable by gc: 0 objects (0 B)\nJournal: 0 events\n")


def test_deploy_json(root: Path, base: dict) -> None:
    out = run(root, "deploy", "base", "--json").json()
    assert out == {"current": "base", "digest": base["digest"], "previous": None, "tx": out["tx"], "staged": False}
    assert os.readlink(root / "deploy/current") == "../images/base.composefs"


def test_mounted_image_cannot_be_deleted(root: Path, base: dict, tmp_path: Path, as_root: None) -> None:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    mounted = run(root, "image", "mount", "base", str(mnt), "--json")
    if mounted.rc in (7, 9):
        pytest.skip(f"cannot mount here: {mounted.err.strip()}")
    try:
        assert mounted.json() == {"image": "base", "mountpoint": str(mnt), "digest": base["digest"],
                                  "missing_objects": []}
        r = run(root, "image", "delete", "base")
        assert (r.rc, r.err) == (4, f"apt-layer: image 'base' is mounted at {mnt}; unmount it first\n")
        assert run(root, "gc", "--full").out == "removed 0 objects (0 B), 3 in use\n"
        assert (mnt / "usr/lib/lib.so").read_bytes() == FILES["usr/lib/lib.so"]
        assert f"  {mnt}: base (mounted)\n" in run(root, "status").out
    finally:
        assert run(root, "image", "unmount", str(mnt)).out == f"unmounted {mnt}\n"
    assert run(root, "image", "delete", "base").rc == 0
    assert_consistent(root)


# --- transactions -------------------------------------------------------------------------------------------


def test_tx_commit_makes_everything_effective_at_once(root: Path, src: Path, base: dict, tmp_path: Path) -> None:
    run(root, "deploy", "base")
    nxt = make_tree(tmp_path / "next", {**FILES, "usr/bin/new": b"N" * 1000})
    tx = run(root, "tx", "begin").out.strip()
    assert len(tx) == 16
    assert run(root, "image", "create", "--tx", tx, str(nxt), "next").out.endswith(
        f", 4 objects (staged in transaction {tx})\n")
    assert run(root, "deploy", "--tx", tx, "next").out == f"deployment of next staged in transaction {tx}\n"
    assert [i["name"] for i in run(root, "image", "list", "--json").json()] == ["base"]
    assert run(root, "status", "--json").json()["next_boot"] == "base"
    assert run(root, "tx", "list", "--state", "open", "--json").json()[0]["tx"] == tx
    show = run(root, "tx", "show", tx, "--json").json()
    assert [(o["op"], o["name"], o["effective_seq"]) for o in show["ops"]] == [("create", "next", None),
                                                                                ("deploy", "next", None)]
    assert run(root, "tx", "commit", tx).out == f"committed {tx}: image.created next, deployed next\n"
    assert [i["name"] for i in run(root, "image", "list", "--json").json()] == ["base", "next"]
    assert run(root, "status", "--json").json()["deployments"]["previous"]["image"] == "base"
    assert os.readlink(root / "deploy/current") == "../images/next.composefs"
    assert list((root / "staging").iterdir()) == []
    text = run(root, "tx", "show", tx).out.splitlines()
    assert text[0] == f"tx {tx}: committed (explicit)"
    assert text[1].startswith("  create  next  ") and text[1].endswith("  effective")
    assert [line.split()[2] for line in text[3:]] == ["tx.begun", "image.staged", "deploy.staged",
                                                       "image.created", "deployed", "tx.committed"]
    assert_consistent(root)


def test_tx_rollback_leaves_nothing_behind(root: Path, src: Path) -> None:
    tx = run(root, "tx", "begin", "--json").json()["tx"]
    run(root, "image", "create", "--tx", tx, str(src), "ghost")
    assert run(root, "tx", "rollback", tx).out == f"rolled back {tx}\n"
    assert list((root / "staging").iterdir()) == []
    assert run(root, "image", "list", "--json").out == "[]\n"
    assert not (root / "images/ghost.composefs").exists()
    dry = run(root, "gc", "--dry-run", "--json").json()
    assert (dry["candidates"], dry["candidate_bytes"]) == (3, 5400)
    assert run(root, "gc").out == "removed 3 objects (5.3 KiB), 0 in use\n"
    assert list((root / "images/objects").glob("??/*")) == []
    rows = run(root, "tx", "list", "--json").json()
    assert [(r["tx"], r["state"], r["explicit"]) for r in rows] == [(tx, "aborted", True)]
    assert_consistent(root)


def test_tx_list_text(root: Path) -> None:
    tx = run(root, "tx", "begin").out.strip()
    row = run(root, "tx", "list", "--json").json()[0]
    assert run(root, "tx", "list").out == (
        "TX                STATE  KIND      BEGUN                ENDED\n"
        f"{tx}  open   explicit  {row['begun_at'][:19]}\n")


# --- gc -----------------------------------------------------------------------------------------------------


def test_gc_outputs(root: Path, src: Path, base: dict, tmp_path: Path) -> None:
    other = make_tree(tmp_path / "other", {"a": b"A" * 100, "b": b"B" * 2000, "usr/bin/tool": b"T" * 300})
    run(root, "image", "create", str(other), "other")
    run(root, "image", "delete", "other")
    gone = sorted([(obj(b"A" * 100), 100), (obj(b"B" * 2000), 2000)])
    assert run(root, "gc", "--dry-run").out == "would remove 2 objects (2.1 KiB)\n"
    assert run(root, "gc", "--dry-run", "-v").out == (
        "would remove 2 objects (2.1 KiB)\n" + "".join(f"{o}  {n}\n" for o, n in gone))
    assert run(root, "gc", "--dry-run", "--json").json()["objects"] == [{"object": o, "size": n} for o, n in gone]
    assert run(root, "gc").out == "removed 2 objects (2.1 KiB), 3 in use\n"
    assert run(root, "gc", "--json").json() == {
        "full": False, "dry_run": False, "marked": 3, "candidates": 0, "candidate_bytes": 0,
        "spared_by_grace": 0, "temp_files": 0, "refused": [], "removed": 0, "bytes_freed": 0}


def test_gc_outputs_say_how_many_objects_the_grace_period_spared(root: Path, base: dict, tmp_path: Path) -> None:
    other = make_tree(tmp_path / "other", {"a": b"A" * 100, "b": b"B" * 2000})
    run(root, "image", "create", str(other), "other")
    run(root, "image", "delete", "other")
    os.utime(root / "images/objects" / obj(b"A" * 100), (EPOCH, EPOCH))
    assert run(root, "gc", "--grace", "600", "--dry-run", "-v").out == (
        f"would remove 1 object (100 B), 1 spared by the grace period\n{obj(b'A' * 100)}  100\n")
    assert run(root, "gc", "--dry-run", "--grace", "600", "--json").json()["spared_by_grace"] == 1
    assert run(root, "gc", "--grace", "600").out == (
        "removed 1 object (100 B), 3 in use, 1 spared by the grace period\n")
    assert "reclaimable by gc: 1 object (2.0 KiB)" in run(root, "status").out
    assert run(root, "gc", "--grace", "600", "--json").json()["spared_by_grace"] == 1
    assert run(root, "gc").out == "removed 1 object (2.0 KiB), 3 in use\n"
    assert run(root, "gc", "--grace", "600").out == "removed 0 objects (0 B), 3 in use\n"
    assert_consistent(root)


def test_gc_full_finds_an_object_dropped_in_by_hand(root: Path, base: dict) -> None:
    stray = root / "images/objects" / obj(b"stray" * 40)
    stray.parent.mkdir(exist_ok=True)
    stray.write_bytes(b"stray" * 40)
    assert run(root, "gc").out == "removed 0 objects (0 B), 3 in use\n"
    assert stray.exists()
    assert run(root, "gc", "--full").out == "removed 1 object (200 B), 3 in use\n"
    assert not stray.exists()
    log = run(root, "log", "--kind", "gc.swept", "--json").json()
    assert [e["data"] for e in log] == [{"removed": 1, "bytes": 200, "temp_files": 0},
                                        {"removed": 0, "bytes": 0, "temp_files": 0}]
    assert_consistent(root)


@pytest.mark.parametrize("backend", ["python", "upstream"])
def test_a_dump_naming_paths_outside_the_store_is_refused_and_gc_spares_them(
        root: Path, base: dict, tmp_path: Path, backend: str) -> None:
    if backend == "upstream" and not (shutil.which("mkcomposefs") or os.environ.get("APT_LAYER_COMPOSEFS_BIN")):
        pytest.skip("upstream mkcomposefs not installed")
    victim = tmp_path / "victims/victim"
    victim.parent.mkdir()
    victim.write_bytes(b"precious")
    victim2 = tmp_path / "x/victim2"  # ROOT/images/objects/../../../x/victim2
    (victim2 / "sub").mkdir(parents=True)
    (victim2 / "sub/file").write_bytes(b"also precious")
    dump = tmp_path / "evil.dump"
    dump.write_text("/ 0 40755 2 0 0 0 0.0 - - -\n"
                    f"/a 4096 100644 1 0 0 0 0.0 {victim} - -\n"
                    "/b 4096 100644 1 0 0 0 0.0 ../../../x/victim2 - -\n")
    before = projection(root)
    create = run(root, "image", "create", "--from-file", "--backend", backend, str(dump), "evil")
    run(root, "image", "delete", "evil")
    run(root, "gc")
    run(root, "gc", "--full")
    assert victim.read_bytes() == b"precious"
    assert (victim2 / "sub/file").read_bytes() == b"also precious"
    assert (create.rc, create.out) == (2, "")
    assert create.err == (f"apt-layer: /a: backing path '{victim}' is not in the digest store (an object path "
                          "is 2 lowercase hex digits, '/', then 62 lowercase hex digits)\n")
    after = projection(root)
    assert [img[0] for img in after["images"]] == ["base"]
    assert after["object_refs"] == before["object_refs"]
    assert list(root.joinpath("staging").iterdir()) == []
    assert_consistent(root)


# --- log, audit, journal ------------------------------------------------------------------------------------


@pytest.fixture
def history(root: Path, src: Path, base: dict) -> list[dict]:
    """base created, deployed; 'other' created and deleted: the log, oldest first."""
    run(root, "deploy", "base")
    run(root, "image", "create", str(src), "other")
    run(root, "image", "delete", "other")
    return list(reversed(run(root, "log", "--json").json()))


def test_log_is_newest_first_with_every_column(root: Path, history: list[dict]) -> None:
    assert [(e["seq"], e["kind"], e["subject"]) for e in history] == [
        (1, "tx.begun", history[0]["tx"]), (2, "image.created", "base"), (3, "tx.committed", history[0]["tx"]),
        (4, "tx.begun", history[3]["tx"]), (5, "deployed", "base"), (6, "tx.committed", history[3]["tx"]),
        (7, "tx.begun", history[6]["tx"]), (8, "image.created", "other"), (9, "tx.committed", history[6]["tx"]),
        (10, "tx.begun", history[9]["tx"]), (11, "image.deleted", "other"), (12, "tx.committed", history[9]["tx"])]
    actor = history[1]["actor"]
    assert {"uid", "user", "pid", "argv", "host", "boot_id"} <= set(actor)
    user = actor["user"]
    lines = run(root, "log", "-n", "2").out.splitlines()
    e12, e11 = history[11], history[10]
    assert lines == [
        "SEQ  AT (UTC)             KIND           SUBJECT           USER  TX                DETAIL",
        f"12   {e12['at'][:19].replace('T', ' ')}  tx.committed   {e12['subject']}  {user}  {e12['tx']}  -",
        f"11   {e11['at'][:19].replace('T', ' ')}  image.deleted  other             {user}  {e11['tx']}  -"]


def test_log_filters(root: Path, history: list[dict]) -> None:
    def seqs(*args: str) -> list[int]:
        return [e["seq"] for e in run(root, "log", "--json", *args).json()]

    assert seqs("--image", "other") == [11, 8]
    assert seqs("--kind", "image.created") == [8, 2]
    assert seqs("--kind", "tx.*", "-n", "3") == [12, 10, 9]
    assert seqs("--tx", history[4]["tx"]) == [6, 5, 4]
    assert seqs("--image", "base", "--kind", "deployed") == [5]
    assert seqs("--since", history[7]["at"]) == [12, 11, 10, 9, 8]
    assert seqs("--until", history[2]["at"]) == [3, 2, 1]
    assert seqs("--since", history[4]["at"], "--until", history[5]["at"]) == [6, 5]
    assert seqs("--since", "2999-01-01") == []
    assert seqs("--until", history[0]["at"][:4]) == list(range(12, 0, -1))


def test_audit_formats(root: Path, history: list[dict]) -> None:
    sql = "SELECT seq, kind, subject FROM v_events WHERE subject IN ('base', 'other') ORDER BY seq"
    assert run(root, "audit", sql).out == (
        "SEQ  KIND           SUBJECT\n2    image.created  base\n5    deployed       base\n"
        "8    image.created  other\n11   image.deleted  other\n")
    assert run(root, "audit", "--format", "csv", sql).out == (
        "seq,kind,subject\n2,image.created,base\n5,deployed,base\n8,image.created,other\n11,image.deleted,other\n")
    assert json.loads(run(root, "audit", "--format", "json", sql).out) == [
        {"seq": 2, "kind": "image.created", "subject": "base"}, {"seq": 5, "kind": "deployed", "subject": "base"},
        {"seq": 8, "kind": "image.created", "subject": "other"},
        {"seq": 11, "kind": "image.deleted", "subject": "other"}]
    assert run(root, "audit", "SELECT name, deployed FROM v_images").out == "NAME  DEPLOYED\nbase  current\n"


def test_audit_takes_json_like_the_other_commands(root: Path, history: list[dict]) -> None:
    sql = "SELECT seq, kind FROM v_events WHERE subject = 'base' ORDER BY seq"
    assert run(root, "audit", "--json", sql).out == run(root, "audit", "--format", "json", sql).out
    assert run(root, "audit", "--json", sql).json() == [{"seq": 2, "kind": "image.created"},
                                                        {"seq": 5, "kind": "deployed"}]
    r = run(root, "audit", "--json", "--format", "csv", sql)
    assert (r.rc, json.loads(r.out)) == (2, {"error": "--json and --format csv disagree", "exit": 2})
    assert "--json and --format csv disagree" in r.err


@pytest.mark.parametrize("sql, refused", [
    ("INSERT INTO events (seq) VALUES (99)", "insert events"),
    ("UPDATE events SET kind = 'x'", "update events"),
    ("DELETE FROM events", "delete events"),
    ("DELETE FROM images", "delete images"),
    ("ATTACH DATABASE '/tmp/x.db' AS x", "attach /tmp/x.db"),
    ("PRAGMA user_version = 7", "pragma user_version"),
    ("PRAGMA journal_mode = DELETE", "pragma journal_mode"),
    ("CREATE TABLE t (x)", "insert sqlite_master"),
    ("DROP VIEW v_events", "delete sqlite_master"),
])
def test_audit_refuses_writes(root: Path, history: list[dict], sql: str, refused: str) -> None:
    before = (root / "journal.db").read_bytes()
    r = run(root, "audit", sql)
    assert (r.rc, r.out) == (2, "")
    assert r.err == f"apt-layer: audit is read-only: {refused} refused\n"
    assert run(root, "audit", "SELECT count(*) AS n FROM events").out == "N\n12\n"
    assert (root / "journal.db").read_bytes() == before
    assert_consistent(root)


@pytest.mark.parametrize("sql, message", [
    ("SELEC 1", 'near "SELEC": syntax error'),
    ("SELECT * FROM nosuch", "no such table: nosuch"),
    ("SELECT nosuch FROM events", "no such column: nosuch"),
])
def test_audit_bad_query_is_invalid_input(root: Path, base: dict, sql: str, message: str) -> None:
    r = run(root, "audit", sql)
    assert (r.rc, r.out, r.err) == (2, "", f"apt-layer: audit: {message}\n")


def test_journal_verify_names_the_edited_event(root: Path, history: list[dict]) -> None:
    assert run(root, "journal", "verify").out == "journal ok: 12 events\n"
    assert run(root, "journal", "verify", "--json").json() == {"events": 12, "ok": True}
    with sqlite3.connect(root / "journal.db") as conn:
        conn.execute("UPDATE events SET data = replace(data, '\"objects\":3', '\"objects\":4') WHERE seq = 8")
    conn.close()
    r = run(root, "journal", "verify")
    assert (r.rc, r.out) == (10, "")
    assert r.err == ("apt-layer: journal chain broken at seq 8: hash does not match: "
                     "event edited, reordered or inserted\n")


def test_journal_rebuild_gives_the_same_projection(root: Path, history: list[dict]) -> None:
    tx = run(root, "tx", "begin").out.strip()
    run(root, "image", "create", "--tx", tx, str(root.parent / "src"), "pending")
    before = projection(root)
    assert run(root, "journal", "rebuild").out == "rebuilt from 14 events\n"
    assert projection(root) == before
    assert run(root, "journal", "rebuild", "--json").json() == {"events": 14, "problems": [], "chain_broken": None}


def test_journal_rebuild_refuses_a_broken_chain_unless_forced(root: Path, history: list[dict]) -> None:
    with sqlite3.connect(root / "journal.db") as conn:  # 'other' was deleted, says seq 11 no more
        conn.execute("UPDATE events SET kind = 'recover.note' WHERE seq = 11")
    conn.close()
    before = projection(root)
    broken = "journal chain broken at seq 11: hash does not match: event edited, reordered or inserted"
    r = run(root, "journal", "rebuild")
    assert (r.rc, r.out) == (10, "")
    assert r.err == (f"apt-layer: {broken}; refusing to rebuild from a damaged journal "
                     "(`journal rebuild --force` rebuilds anyway)\n")
    assert run(root, "journal", "rebuild", "--json").rc == 10
    assert projection(root) == before
    r = run(root, "journal", "rebuild", "--force")
    assert (r.rc, r.out) == (0, "rebuilt from 12 events\n")
    assert r.err == ("apt-layer: WARNING: the journal's hash chain is broken at seq 11 (hash does not match: "
                     "event edited, reordered or inserted); the projection was rebuilt from it anyway (--force) "
                     "and may show edited or forged state as real\n")
    assert [i["name"] for i in run(root, "image", "list", "--json").json()] == ["base", "other"]
    assert not (root / "images/other.composefs").exists()
    assert run(root, "journal", "rebuild", "--force", "--json").json() == {
        "events": 12, "problems": [], "chain_broken": {"seq": 11, "reason": broken.split(": ", 1)[1]}}
    r = run(root, "journal", "verify")
    assert (r.rc, r.err) == (10, f"apt-layer: {broken}\n")
    assert run(root, "log", "--json").json()[0]["seq"] == 12


# --- bad input: one line, its exit code, nothing changed ----------------------------------------------------


@pytest.mark.parametrize("args, rc, message", [
    (["image", "create", "{src}", ""], 2, "invalid image name: empty"),
    (["image", "create", "{src}", "/"], 2, "invalid image name '/': contains '/' or NUL"),
    (["image", "create", "{src}", ".."], 2, "invalid image name '..': must not start with '.' or '-'"),
    (["image", "create", "{src}", "x" * 256], 2, "invalid image name: longer than 245 bytes"),
    (["image", "create", "{src}", "base"], 4, "an image named 'base' exists"),
    (["image", "create", "{tmp}/nosuch", "new"], 3, "source {tmp}/nosuch: no such directory"),
    (["image", "create", "--from-file", "{tmp}/nosuch.dump", "new"], 3, "source {tmp}/nosuch.dump: no such file"),
    (["image", "delete", "nosuch"], 3, "no image named 'nosuch'"),
    (["image", "delete", "base"], 4, "image 'base' is the current deployment; deploy another image first"),
    (["image", "info", "nosuch"], 3, "no image named 'nosuch'"),
    (["image", "ls", "nosuch"], 3, "no image named 'nosuch'"),
    (["deploy", "nosuch"], 3, "no image named 'nosuch'"),
    (["deploy", "base"], 4, "image 'base' is already the current deployment"),
    (["rollback"], 4, "no previous deployment to roll back to"),
    (["tx", "commit", "feedface"], 3, "no transaction 'feedface'"),
    (["tx", "show", "feedface"], 3, "no transaction 'feedface'"),
    (["image", "create", "--tx", "feedface", "{src}", "new"], 3, "no transaction 'feedface'"),
    (["tx", "commit", "{aborted}"], 4, "transaction {aborted} is aborted"),
    (["tx", "rollback", "{aborted}"], 4, "transaction {aborted} is aborted"),
    (["image", "create", "--backend", "upstream", "{src}", "new"], None, None),
])
def test_bad_input_is_one_line_and_changes_nothing(root: Path, src: Path, base: dict, tmp_path: Path,
                                                   args: list[str], rc: int | None, message: str | None) -> None:
    run(root, "deploy", "base")
    aborted = run(root, "tx", "begin").out.strip()
    run(root, "tx", "rollback", aborted)
    if rc is None:
        if shutil.which("mkcomposefs") or os.environ.get("APT_LAYER_COMPOSEFS_BIN"):
            pytest.skip("upstream tools installed: --backend upstream works")
        rc, message = 3, ("--backend upstream: mkcomposefs is not installed (install Debian's composefs package, "
                          "or use --backend python)")
    values = {"src": str(src), "tmp": str(tmp_path), "aborted": aborted}
    before = projection(root)
    r = run(root, *[a.format(**values) for a in args])
    assert (r.rc, r.out) == (rc, "")
    assert r.err == f"apt-layer: {message.format(**values)}\n"
    after = projection(root)
    assert {k: v for k, v in after.items() if k not in ("meta", "transactions", "object_refs")} == \
        {k: v for k, v in before.items() if k not in ("meta", "transactions", "object_refs")}
    assert [r for r in after["object_refs"] if r[1]] == [r for r in before["object_refs"] if r[1]]
    assert list((root / "staging").iterdir()) == []
    assert_consistent(root)


@pytest.mark.parametrize("args", [
    ["image", "create"], ["image", "create", "--min-version", "5", "a", "b"], ["nosuch"],
    ["image", "create", "--skip-xattrs", "--user-xattrs", "a", "b"], ["gc", "--grace", "-1"],
    ["audit", "--format", "xml", "SELECT 1"], ["image", "mount", "base", "/mnt", "--upperdir", "/u"],
])
def test_usage_errors_exit_2(root: Path, args: list[str]) -> None:
    r = run(root, *args)
    assert (r.rc, r.out) == (2, "")
    assert r.err.splitlines()[-1].startswith("Error: ")
    assert "Traceback" not in r.err


def test_newer_journal_exits_5(root: Path, base: dict) -> None:
    with sqlite3.connect(root / "journal.db") as conn:
        conn.execute("PRAGMA user_version = 42")
    conn.close()
    for args in (["image", "list"], ["journal", "verify"], ["audit", "SELECT 1"]):
        r = run(root, *args)
        assert (r.rc, r.out) == (5, "")
        assert r.err == (f"apt-layer: {root.absolute()}/journal.db: journal written by a newer apt-layer "
                         "(version 42, this apt-layer supports up to 3)\n")


def test_unknown_required_feature_exits_5(root: Path, base: dict) -> None:
    with sqlite3.connect(root / "journal.db") as conn:
        conn.execute("INSERT INTO features VALUES ('quantum-refcounts', 1, '9999-future')")
    conn.close()
    r = run(root, "status")
    assert r.rc == 5 and r.err.endswith("unknown required features: quantum-refcounts)\n")


def test_corrupt_journal_exits_6(root: Path, base: dict) -> None:
    gc.collect()  # close the in-process journals: the last close folds the WAL into journal.db
    db = root / "journal.db"
    assert not (root / "journal.db-wal").exists()
    db.write_bytes(os.urandom(db.stat().st_size))
    for args in (["image", "list"], ["journal", "verify"], ["image", "create", str(root), "x"]):
        r = run(root, *args)
        assert (r.rc, r.out) == (6, "")
        assert r.err == f"apt-layer: {root.absolute()}/journal.db: damaged SQLite database: file is not a database\n"


# --- real processes: the entry point, another user, a full disk ---------------------------------------------


def test_entry_point_and_environment(root: Path, src: Path) -> None:
    created = sh(root, "image", "create", "--backend", "python", str(src), "base", "--json")
    assert created.returncode == 0 and json.loads(created.stdout)["digest"] == digest_of(src)
    env = {**os.environ, "PYTHONPATH": str(REPO), "APT_LAYER_ROOT": str(root)}
    listed = subprocess.run([sys.executable, "-m", "aptlayer", "image", "list", "--json"], capture_output=True,
                            text=True, env=env)
    assert [i["name"] for i in json.loads(listed.stdout)] == ["base"]
    bad = sh(root, "image", "delete", "nosuch")
    assert (bad.returncode, bad.stdout, bad.stderr) == (3, "", "apt-layer: no image named 'nosuch'\n")


def _as_nobody(argv: list[str]) -> tuple[int, str]:
    """Run ``main(argv)`` in a child process that became ``nobody``; (exit code, stderr).

    A fork rather than ``setpriv ... python3``: the interpreter and its
    packages may live where nobody cannot read (e.g. under /root).
    """
    import encodings.ascii  # noqa: F401  (imported before the fork: nobody may not read it)

    from aptlayer import recovery  # noqa: F401
    from aptlayer.cli import deploy, images, maint, tx  # noqa: F401
    from aptlayer.composefs import dumpfile, listing, objectstore, reader, scan, upstream  # noqa: F401

    nobody = pwd.getpwnam("nobody")
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(read_fd)
            sys.stderr = os.fdopen(write_fd, "w")
            os.setgroups([])
            os.setgid(nobody.pw_gid)
            os.setuid(nobody.pw_uid)
            code = main(argv)
            sys.stderr.flush()
        finally:
            os._exit(locals().get("code", 70))
    os.close(write_fd)
    with os.fdopen(read_fd) as f:
        err = f.read()
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), err


@pytest.fixture
def public(as_root: None):
    """A store and a source tree that ``nobody`` can reach and read, but not write."""
    top = Path(tempfile.mkdtemp(prefix="apt-layer-test-"))
    os.chmod(top, 0o755)
    src = make_tree(top / "src")
    base = run(top / "store", "image", "create", str(src), "base", "--json").json()
    yield top / "store", src, base
    gc.collect()
    shutil.rmtree(top)


@pytest.mark.parametrize("args", [
    ["image", "create", "{src}", "mine"], ["image", "delete", "base"], ["deploy", "base"], ["gc"],
    ["tx", "begin"],
])
def test_non_root_user_gets_exit_7(public, args: list[str]) -> None:
    root, src, _ = public
    before = projection(root)
    rc, err = _as_nobody(["--root", str(root), *[a.format(src=src) for a in args]])
    command = " ".join(a for a in args if a not in ("{src}", "mine", "base"))
    assert (rc, err) == (7, f"apt-layer: `apt-layer {command}` changes the store: run it as root "
                            "(uid 65534 may run only the read-only commands)\n")
    assert projection(root) == before
    assert_consistent(root)


def test_non_root_user_on_a_shared_writable_journal_still_cannot_lock(public) -> None:
    root, _, _ = public
    os.chmod(root, 0o777)
    for name in ("journal.db", "journal.db-wal", "journal.db-shm"):
        if (root / name).exists():
            os.chmod(root / name, 0o666)
    rc, err = _as_nobody(["--root", str(root), "image", "delete", "base"])
    assert rc == 7 and "`apt-layer image delete` changes the store: run it as root" in err
    assert_consistent(root)


@pytest.fixture
def small_fs(tmp_path: Path, as_root: None):
    """An 8 MiB ext4 file system, loop-mounted."""
    image, mnt = tmp_path / "fs.img", tmp_path / "fs"
    mnt.mkdir()
    with open(image, "wb") as f:
        f.truncate(8 << 20)
    subprocess.run(["mkfs.ext4", "-q", str(image)], check=True)
    if subprocess.run(["mount", "-o", "loop", str(image), str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot loop-mount here")
    yield mnt
    gc.collect()  # close the journals the in-process commands opened there
    subprocess.run(["umount", "--lazy", str(mnt)], check=True)


@pytest.mark.parametrize("backend", ["python", "upstream"])
def test_full_disk_during_create_exits_8(small_fs: Path, tmp_path: Path, backend: str) -> None:
    if backend == "upstream" and not (shutil.which("mkcomposefs") or os.environ.get("APT_LAYER_COMPOSEFS_BIN")):
        pytest.skip("mkcomposefs not installed")
    root = small_fs / "store"
    small = make_tree(tmp_path / "small", {"a": b"a" * 1000})
    assert run(root, "image", "create", "--backend", backend, str(small), "small").rc == 0
    big = make_tree(tmp_path / "big", {f"f{i}": os.urandom(400_000) for i in range(30)})
    r = run(root, "image", "create", "--backend", backend, str(big), "big")
    assert (r.rc, r.out, r.err) == (8, "", "apt-layer: creating image 'big': no space left on device\n")
    assert list((root / "staging").iterdir()) == []
    assert [i["name"] for i in run(root, "image", "list", "--json").json()] == ["small"]
    assert run(root, "tx", "list", "--state", "open", "--json").out == "[]\n"
    assert_consistent(root)
    # Whatever the failed create left (strays of batches already placed, or
    # nothing: a failed batch removes its own temp files), gc --full takes
    # it all back: no object on disk that no image needs, no temp file.
    run(root, "gc", "--full")
    leftover = run(root, "gc", "--full", "--dry-run", "--json").json()
    assert (leftover["candidates"], leftover["temp_files"]) == (0, 0)
    on_disk = sorted(str(p.relative_to(root / "images" / "objects"))
                     for p in (root / "images" / "objects").glob("*/*"))
    assert on_disk == run(root, "image", "objects", "small").out.split()
    assert run(root, "image", "create", "--backend", backend, str(small), "again").rc == 0
    assert_consistent(root)
