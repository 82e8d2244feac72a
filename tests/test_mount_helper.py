"""``mount -t composefs`` through util-linux's mount(8), which runs
``/sbin/mount.composefs IMAGE DIR [-sfnv] -o OPTIONS``: apt-layer under that
name must take what mount(8) gives it (``rw``/``ro`` first, fstab options
such as ``nofail``, ``-v``).

The helper is put in place in a private mount namespace (an overlay on
/usr/sbin that only the test sees), so the host's /sbin stays as it is.
Needs root, erofs, overlayfs and unshare(1); skips with the reason otherwise.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from conftest import REPO, VECTORS

pytestmark = pytest.mark.root

WALK = ("import hashlib, os, sys\n"
        "for d, dirs, files in sorted(os.walk(sys.argv[1])):\n"
        "    for n in sorted(dirs + files):\n"
        "        p = os.path.join(d, n); st = os.lstat(p)\n"
        "        data = open(p, 'rb').read() if os.path.isfile(p) and not os.path.islink(p) else b''\n"
        "        print(os.path.relpath(p, sys.argv[1]), oct(st.st_mode), st.st_uid, st.st_mtime_ns, len(data), hashlib.sha256(data).hexdigest())\n")


@pytest.fixture
def namespace_with_helper(tmp_path: Path, kernel) -> Path:
    if shutil.which("unshare") is None:
        pytest.skip("unshare(1) is not installed")
    helper = tmp_path / "sbin-upper" / "mount.composefs"
    helper.parent.mkdir()
    helper.write_text(f"#!{sys.executable}\nimport sys\nsys.path.insert(0, {str(REPO)!r})\n"
                      "from aptlayer.cli import main\nsys.exit(main())\n")
    helper.chmod(0o755)
    (tmp_path / "sbin-work").mkdir()
    return tmp_path


def in_namespace(tmp_path: Path, script: str) -> subprocess.CompletedProcess:
    setup = (f"mount -t overlay overlay -o lowerdir=/usr/sbin,upperdir={tmp_path}/sbin-upper,"
             f"workdir={tmp_path}/sbin-work /usr/sbin\n")
    return subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-ec",
                           setup + textwrap.dedent(script)], capture_output=True, text=True,
                          env={**os.environ, "WALK": WALK})


def test_mount_t_composefs_runs_apt_layer_as_the_helper(vectors, namespace_with_helper):
    tmp = namespace_with_helper
    image, objects = VECTORS / "sizes" / "image.cfs", VECTORS / "objects"
    (tmp / "mnt").mkdir()
    (tmp / "empty").mkdir()
    # The same image mounted by apt-layer directly, and by mount(8) through the helper.
    r = in_namespace(tmp, f"""
        {sys.executable} -m aptlayer composefs mount -o basedir={objects} {image} {tmp}/mnt
        {sys.executable} -c "$WALK" {tmp}/mnt > {tmp}/direct.list
        umount {tmp}/mnt
        mount -v -t composefs -o basedir={tmp}/empty:{objects} {image} {tmp}/mnt > {tmp}/verbose.out
        {sys.executable} -c "$WALK" {tmp}/mnt > {tmp}/mount8.list
        umount {tmp}/mnt
        mount -r -t composefs -o basedir={objects} {image} {tmp}/mnt
        grep " {tmp}/mnt " /proc/self/mountinfo > {tmp}/ro.info
        umount {tmp}/mnt
        echo "{image} {tmp}/mnt composefs basedir={objects},nofail,_netdev,noauto 0 0" > {tmp}/fstab
        mount -T {tmp}/fstab {tmp}/mnt
        {sys.executable} -c "$WALK" {tmp}/mnt > {tmp}/fstab.list
        umount {tmp}/mnt
    """)
    assert r.returncode == 0, r.stderr
    direct = (tmp / "direct.list").read_text()
    assert len(direct.splitlines()) > 3
    assert (tmp / "mount8.list").read_text() == direct
    assert (tmp / "fstab.list").read_text() == direct
    assert (tmp / "verbose.out").read_text() == f"mount.composefs: {image} mounted on {tmp}/mnt\n"
    assert " ro," in (tmp / "ro.info").read_text() or " ro " in (tmp / "ro.info").read_text()


def test_mount8_reports_the_helpers_error(vectors, namespace_with_helper):
    tmp = namespace_with_helper
    (tmp / "mnt").mkdir()
    r = in_namespace(tmp, f"mount -t composefs -o basedir={VECTORS / 'objects'},nodev "
                          f"{VECTORS / 'sizes' / 'image.cfs'} {tmp}/mnt")
    assert r.returncode != 0
    assert "mount.composefs: Unsupported option nodev" in r.stderr


def test_dash_n_mounts_in_the_given_namespace(vectors, tmp_path, kernel):
    """``-N PID`` (or a namespace path), as ``mount -N`` passes it: the mount appears there only."""
    holder = subprocess.Popen(["unshare", "--mount", "--propagation", "private", "sleep", "600"])
    try:
        while os.readlink(f"/proc/{holder.pid}/ns/mnt") == os.readlink("/proc/self/ns/mnt"):
            time.sleep(0.01)
        (tmp_path / "mnt").mkdir()
        # Relative paths are taken from here, not from the namespace's root.
        r = subprocess.run([sys.executable, "-m", "aptlayer", "composefs", "mount", "-N", str(holder.pid),
                            "-o", f"basedir={VECTORS / 'objects'}", str(VECTORS / "sizes" / "image.cfs"),
                            "mnt"], capture_output=True, text=True, cwd=tmp_path,
                           env={**os.environ, "PYTHONPATH": str(REPO)})
        assert r.returncode == 0, r.stderr
        theirs = Path(f"/proc/{holder.pid}/mountinfo").read_text()
        assert f" {tmp_path}/mnt " in theirs
        assert f" {tmp_path}/mnt " not in Path("/proc/self/mountinfo").read_text()
    finally:
        holder.kill()  # the namespace, and the mount with it, goes with its last process
        holder.wait()
