"""Rule 4 of docs/security.md: hostile images and mounts.

``image mount`` gives nosuid,nodev mounts unless asked otherwise, the boot
mount of the deployment keeps set-id bits, and an image whose overlay
redirects reach outside the object directories is refused before anything
is mounted.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from aptlayer.composefs import mount as cfsmount
from aptlayer.composefs.dumpfile import parse_dump
from aptlayer.composefs.imageview import ImageFormatError
from aptlayer.composefs.reader import check_redirects
from aptlayer.composefs.writer import build_image
from aptlayer.linux.mountinfo import is_mounted, mount_info

from crashkit import cli_env, run_cli

pytestmark = pytest.mark.root


def options_at(path: Path) -> set[str]:
    """The per-mount options (nosuid, nodev, ro...) of the topmost mount at ``path``."""
    with open("/proc/self/mountinfo") as f:
        found = [line.split()[5] for line in f if line.split()[4] == str(path)]
    assert found, f"{path} is not mounted"
    return set(found[-1].split(","))


@pytest.fixture
def cleanup(tmp_path: Path):
    yield
    for m in sorted((m.mount_point for m in mount_info() if m.mount_point.startswith(str(tmp_path))),
                    key=len, reverse=True):
        subprocess.run(["umount", "-l", m], check=False)


def make_tree(path: Path) -> Path:
    (path / "usr" / "bin").mkdir(parents=True)
    tool = path / "usr" / "bin" / "tool"
    tool.write_bytes(b"#!/bin/sh\necho hi\n" * 300)
    tool.chmod(0o4755)
    return path


def test_image_mount_is_nosuid_nodev_unless_allow_suid(tmp_path: Path, kernel, cleanup) -> None:
    root = tmp_path / "store"
    run_cli(root, "image", "create", str(make_tree(tmp_path / "src")), "img")
    plain, allowed = tmp_path / "plain", tmp_path / "allowed"
    plain.mkdir()
    allowed.mkdir()
    run_cli(root, "image", "mount", "img", str(plain))
    assert {"nosuid", "nodev"} <= options_at(plain)
    assert (plain / "usr" / "bin" / "tool").stat().st_mode & 0o4000  # the bit is there, the kernel ignores it
    run_cli(root, "image", "mount", "--allow-suid", "img", str(allowed))
    assert not {"nosuid", "nodev"} & options_at(allowed)


def test_the_boot_mount_of_the_deployment_honours_set_id_bits(tmp_path: Path, kernel, cleanup) -> None:
    root, boot = tmp_path / "store", tmp_path / "boot"
    config = tmp_path / "config.toml"
    config.write_text(f'root = "{root}"\nbackend = "python"\n[deploy]\nmount = "{boot}"\n')
    run_cli(root, "image", "create", str(make_tree(tmp_path / "src")), "img")
    run_cli(root, "deploy", "img")
    proc = subprocess.run([sys.executable, "-m", "aptlayer", "--config",
                           str(config), "recover", "--boot", "--json"], env=cli_env(), capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["boot"]["mounted"] == "img"
    assert not {"nosuid", "nodev"} & options_at(boot)


def hostile_image(path: Path, payload: bytes) -> Path:
    dump = b"/ 0 40755 2 0 0 0 0.0 - - -\n/shadow 5 100644 1 0 0 0 0.0 " + payload + b" - -\n"
    path.write_bytes(build_image(parse_dump(dump)))
    return path


@pytest.mark.parametrize("payload", [b"../../etc/shadow", b"/../../etc/shadow", b"ab/../../../etc/shadow"])
def test_a_redirect_outside_the_object_directories_is_refused_before_any_mount(tmp_path: Path, kernel, cleanup,
                                                                                payload: bytes) -> None:
    image = hostile_image(tmp_path / "hostile.cfs", payload)
    basedir, target = tmp_path / "objects", tmp_path / "mnt"
    basedir.mkdir()
    target.mkdir()
    with pytest.raises(ImageFormatError, match="does not name a path below the object directories"):
        check_redirects(str(image))
    with pytest.raises(cfsmount.MountError, match="is refused: inode .* overlay redirect"):
        cfsmount.mount(str(image), str(target), [str(basedir)])
    assert not is_mounted(str(target))
    # the drop-in mount.composefs says so too, and mounts nothing
    proc = subprocess.run([sys.executable, "-m", "aptlayer", "composefs", "mount", "-o",
                           f"basedir={basedir}", str(image), str(target)], env=cli_env(), capture_output=True,
                          text=True)
    assert proc.returncode != 0 and "overlay redirect" in proc.stderr
    assert not is_mounted(str(target))


def test_redirects_of_ordinary_images_pass(tmp_path: Path) -> None:
    image = hostile_image(tmp_path / "ok.cfs", b"ab/" + b"c" * 62)
    assert check_redirects(str(image)) == 1
