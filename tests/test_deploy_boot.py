"""Deployments that boot: `recover --boot` mounts what `deploy`/`rollback` chose,
and `image mount` works through both backends (root and a kernel with erofs
and overlayfs needed; skipped otherwise)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO

from aptlayer.linux.mountinfo import is_mounted, mount_info

pytestmark = pytest.mark.root


def _kernel_ok() -> bool:
    text = Path("/proc/filesystems").read_text()
    return "erofs" in text and "overlay" in text


@pytest.fixture
def env(tmp_path, as_root):
    if not _kernel_ok():
        pytest.skip("kernel lacks erofs or overlayfs")
    root = tmp_path / "store"
    config = tmp_path / "config.toml"
    boot = tmp_path / "boot"
    config.write_text(f'root = "{root}"\nbackend = "python"\n[deploy]\nmount = "{boot}"\n')
    trees = {}
    for version in ("1", "2"):
        t = tmp_path / f"tree{version}"
        (t / "etc").mkdir(parents=True)
        (t / "etc" / "release").write_text(f"release {version}\n")
        (t / "usr" / "lib").mkdir(parents=True)
        (t / "usr" / "lib" / "big.bin").write_bytes(hashlib.sha256(version.encode()).digest() * 1000)
        trees[version] = t
    yield {"root": root, "config": config, "boot": boot, "trees": trees, "tmp": tmp_path}
    for m in sorted((m.mount_point for m in mount_info() if m.mount_point.startswith(str(tmp_path))),
                    key=len, reverse=True):
        subprocess.run(["umount", "-l", m], check=False)


def cli(env, *args: str, check: bool = True, fault: str | None = None) -> subprocess.CompletedProcess:
    """Run apt-layer with the test's config; ``fault`` kills it at that point (APT_LAYER_FAULT)."""
    extra = {"APT_LAYER_FAULT": fault} if fault else {}
    r = subprocess.run([sys.executable, "-m", "aptlayer", "--config", str(env["config"]), *args],
                       capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO), **extra})
    if check:
        assert r.returncode == 0, r.stderr
    return r


def test_recover_boot_mounts_the_current_deployment_and_rollback_changes_it(env):
    cli(env, "image", "create", str(env["trees"]["1"]), "one")
    cli(env, "image", "create", str(env["trees"]["2"]), "two")
    cli(env, "deploy", "one")
    cli(env, "deploy", "two")
    report = json.loads(cli(env, "recover", "--boot", "--json").stdout)
    assert report["boot"]["mounted"] == "two"
    boot = env["boot"]
    assert (boot / "etc" / "release").read_text() == "release 2\n"
    assert (boot / "usr" / "lib" / "big.bin").read_bytes() == hashlib.sha256(b"2").digest() * 1000
    status = json.loads(cli(env, "status", "--json").stdout)
    assert [(m["mountpoint"], m["image"], m["state"]) for m in status["mounts"]] == [(str(boot), "two", "mounted")]
    # Already mounted: a second boot-time recovery changes nothing.
    again = json.loads(cli(env, "recover", "--boot", "--json").stdout)
    assert again["actions"] == [] and again["boot"]["mounted"] is None
    cli(env, "image", "unmount", str(boot))
    assert not is_mounted(boot)
    # Roll back, and the next boot mounts the previous image.
    cli(env, "rollback")
    assert os.readlink(env["root"] / "deploy" / "current") == "../images/one.composefs"
    report = json.loads(cli(env, "recover", "--boot", "--json").stdout)
    assert report["boot"]["mounted"] == "one"
    assert (boot / "etc" / "release").read_text() == "release 1\n"
    cli(env, "image", "unmount", str(boot))


def test_boot_mount_lost_at_reboot_is_recorded(env):
    cli(env, "image", "create", str(env["trees"]["1"]), "one")
    cli(env, "deploy", "one")
    cli(env, "recover", "--boot")
    # The kernel loses the mount (as at a reboot) without apt-layer being told.
    subprocess.run(["umount", str(env["boot"])], check=True)
    report = json.loads(cli(env, "recover", "--json").stdout)
    assert {"kind": "mount.lost", "subject": "one", "mountpoint": str(env["boot"])} in report["actions"]
    assert json.loads(cli(env, "status", "--json").stdout)["mounts"][0]["state"] == "lost"


def _listing(top: Path) -> list[tuple]:
    out = []
    for dirpath, dirnames, filenames in os.walk(top):
        dirnames.sort()
        for name in sorted(dirnames + filenames):
            p = Path(dirpath) / name
            st = p.lstat()
            data = p.read_bytes() if p.is_file() and not p.is_symlink() else None
            out.append((str(p.relative_to(top)), st.st_mode, st.st_uid, st.st_size, st.st_mtime_ns,
                        hashlib.sha256(data).hexdigest() if data is not None else None))
    return out


def test_native_and_upstream_mounts_show_the_same_tree(env, mount_composefs):
    cli(env, "image", "create", str(env["trees"]["1"]), "one")
    a, b = env["tmp"] / "a", env["tmp"] / "b"
    a.mkdir()
    b.mkdir()
    cli(env, "image", "mount", "one", str(a), "--backend", "python")
    cli(env, "image", "mount", "one", str(b), "--backend", "upstream")
    try:
        assert _listing(a) == _listing(b) != []
        names = json.loads(cli(env, "status", "--json").stdout)["mounts"]
        assert sorted(m["mountpoint"] for m in names) == [str(a), str(b)]
    finally:
        cli(env, "image", "unmount", str(a))
        cli(env, "image", "unmount", str(b))
    assert not any(m.mount_point.startswith(str(env["tmp"])) for m in mount_info())


def test_mount_warns_about_missing_objects_and_reading_them_fails(env):
    cli(env, "image", "create", str(env["trees"]["1"]), "one")
    objects = cli(env, "image", "objects", "one").stdout.split()
    for obj in objects:
        (env["root"] / "images" / "objects" / obj).unlink()
    target = env["tmp"] / "m"
    target.mkdir()
    r = cli(env, "image", "mount", "one", str(target))
    try:
        n = f"{len(objects)} object{'s' if len(objects) != 1 else ''}"
        assert r.stderr == (f"apt-layer: warning: {n} of image 'one' missing from the store; reading those files "
                            "will fail (see `apt-layer image missing-objects one`)\n")
        assert (target / "etc" / "release").read_text() == "release 1\n"  # inline: still readable
        with pytest.raises(FileNotFoundError):
            (target / "usr" / "lib" / "big.bin").read_bytes()
    finally:
        cli(env, "image", "unmount", str(target))


def test_mountpoint_in_use_is_a_conflict_and_leaves_nothing(env):
    cli(env, "image", "create", str(env["trees"]["1"]), "one")
    target = env["tmp"] / "m"
    target.mkdir()
    cli(env, "image", "mount", "one", str(target))
    try:
        before = [m for m in mount_info() if m.mount_point == str(target)]
        r = cli(env, "image", "mount", "one", str(target), check=False)
        assert r.returncode == 4, r.stderr
        assert "Traceback" not in r.stderr
        assert [m for m in mount_info() if m.mount_point == str(target)] == before
    finally:
        cli(env, "image", "unmount", str(target))


def test_mount_killed_before_the_kernel_call_is_marked_lost(env):
    cli(env, "image", "create", str(env["trees"]["1"]), "one")
    target = env["tmp"] / "m"
    target.mkdir()
    r = cli(env, "image", "mount", "one", str(target), check=False, fault="mount.after-event")
    assert r.returncode == -9
    assert not is_mounted(target)
    report = json.loads(cli(env, "recover", "--json").stdout)
    assert {"kind": "mount.lost", "subject": "one", "mountpoint": str(target)} in report["actions"]
    cli(env, "image", "delete", "one")  # nothing holds it any more


def test_mount_killed_after_the_kernel_call_still_protects_its_objects(env):
    cli(env, "image", "create", str(env["trees"]["1"]), "one")
    objects = cli(env, "image", "objects", "one").stdout.split()
    target = env["tmp"] / "m"
    target.mkdir()
    r = cli(env, "image", "mount", "one", str(target), check=False, fault="mount.after-kernel")
    assert r.returncode == -9
    try:
        assert is_mounted(target)
        assert json.loads(cli(env, "recover", "--json").stdout)["actions"] == []
        assert cli(env, "image", "delete", "one", check=False).returncode == 4
        cli(env, "gc", "--full")
        assert all((env["root"] / "images" / "objects" / o).is_file() for o in objects)
        assert (target / "usr" / "lib" / "big.bin").read_bytes() == hashlib.sha256(b"1").digest() * 1000
    finally:
        cli(env, "image", "unmount", str(target))
