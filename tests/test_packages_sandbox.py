"""The sandbox around a new root: what a maintainer script can and cannot reach."""

from __future__ import annotations

import os
import shutil
import socket
from pathlib import Path

import pytest

from aptlayer.packages import sandbox
from aptlayer.packages.sandbox import Bind, exists_in_root

needs_bwrap = pytest.mark.skipif(os.geteuid() != 0 or shutil.which("bwrap") is None,
                                 reason="needs root and bubblewrap (apt-get install bubblewrap)")


def sh(root: Path, script: str, **kw) -> tuple[int, str]:
    result = sandbox.run(root, ["/bin/sh", "-c", script], **kw)
    return result.returncode, sandbox.output_text(result)


def test_exists_in_root_resolves_symlinks_inside_the_root(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "usr/sbin").mkdir(parents=True)
    (root / "usr/sbin/tool").write_text("")
    (root / "sbin").symlink_to("usr/sbin")
    (root / "abs").symlink_to("/usr")
    (root / "up").symlink_to("../../../../../../usr")
    (root / "loop").symlink_to("loop")
    outside = tmp_path / "only-on-the-host"
    outside.write_text("")
    (root / "escape").symlink_to(outside)
    assert exists_in_root(root, "/sbin/tool")
    assert exists_in_root(root, "/abs/sbin/tool")
    assert exists_in_root(root, "/up/sbin/tool")  # .. stops at the root, as in a chroot
    assert not exists_in_root(root, "/sbin/other")
    assert not exists_in_root(root, "/loop/x")
    assert not exists_in_root(root, "/escape")  # the host path it names is not in the root


@needs_bwrap
def test_commands_see_the_root_as_slash_and_write_only_into_it(debian_root: Path, tmp_path: Path) -> None:
    marker = tmp_path / "host-only-marker"
    marker.write_text("host")
    rc, out = sh(debian_root, f"test -e {marker} && echo visible; echo made > /made-inside; "
                              "echo scratch > /tmp/scratch; cat /etc/debian_version")
    assert rc == 0
    assert "visible" not in out
    assert (debian_root / "made-inside").read_text() == "made\n"
    assert not (debian_root / "tmp/scratch").exists()  # /tmp is a tmpfs of the sandbox
    assert out.split()[0] == (debian_root / "etc/debian_version").read_text().strip()


@needs_bwrap
def test_the_host_root_and_the_store_are_not_there(debian_root: Path) -> None:
    rc, out = sh(debian_root, "ls /work /var/lib/apt-layer 2>&1; cat /proc/1/comm; ls /proc | grep -c '^[0-9]'")
    assert "ls: cannot access '/work': No such file or directory" in out
    assert "ls: cannot access '/var/lib/apt-layer': No such file or directory" in out
    # its own PID namespace: bubblewrap is process 1, and only the sandbox's processes are there
    assert out.split()[-2] == "bwrap"
    assert int(out.split()[-1]) < 10


@needs_bwrap
def test_no_network(debian_root: Path) -> None:
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    port = listener.getsockname()[1]
    try:
        rc, out = sh(debian_root, f"echo hi > /dev/tcp/127.0.0.1/{port} && echo connected; "
                                  "grep -c : /proc/net/dev")
    finally:
        listener.close()
    # dash has no /dev/tcp; bash has: run through bash when the root has it
    if (debian_root / "bin/bash").exists() or (debian_root / "usr/bin/bash").exists():
        rc, out = sh(debian_root, f"bash -c 'echo hi > /dev/tcp/127.0.0.1/{port}' 2>&1 && echo connected")
        assert "connected" not in out
        assert "Network is unreachable" in out or "Connection refused" in out
    rc, out = sh(debian_root, "grep : /proc/net/dev")
    assert [line.split(":")[0].strip() for line in out.splitlines()] == ["lo"]


@needs_bwrap
def test_services_are_refused_and_policy_rc_d_leaves_nothing(debian_root: Path) -> None:
    rc, out = sh(debian_root, "/usr/sbin/policy-rc.d cron start; echo rc=$?; echo $SYSTEMD_OFFLINE; "
                              "test -d /run/systemd/system && echo systemd-running")
    assert "rc=101" in out and "systemd-running" not in out
    assert out.split()[1] == "1"
    assert not os.path.lexists(debian_root / "usr/sbin/policy-rc.d")


@needs_bwrap
def test_a_roots_own_policy_rc_d_is_covered_not_changed(debian_root: Path) -> None:
    own = debian_root / "usr/sbin/policy-rc.d"
    own.write_text("#!/bin/sh\nexit 0\n")
    own.chmod(0o755)
    rc, out = sh(debian_root, "/usr/sbin/policy-rc.d cron start; echo rc=$?")
    assert "rc=101" in out
    assert own.read_text() == "#!/bin/sh\nexit 0\n"


@needs_bwrap
def test_no_device_nodes_no_mounts(debian_root: Path) -> None:
    rc, out = sh(debian_root, "mknod /dev/sda-copy b 8 0 2>&1; echo mknod=$?; "
                              "mount -t tmpfs none /mnt 2>&1; echo mount=$?; ls /dev")
    assert "mknod=1" in out and "mount=" in out and "mount=0" not in out
    assert "sda" not in out.split("mount=")[1]  # no disks in its /dev


@needs_bwrap
def test_binds_are_read_only_unless_asked(debian_root: Path, tmp_path: Path) -> None:
    ro, rw = tmp_path / "ro", tmp_path / "rw"
    ro.mkdir()
    rw.mkdir()
    (ro / "f").write_text("ro\n")
    rc, out = sh(debian_root, "cat /mnt/ro/f; touch /mnt/ro/new 2>&1; touch /mnt/rw/new && echo wrote",
                 binds=(Bind(ro, "/mnt/ro"), Bind(rw, "/mnt/rw", writable=True)))
    assert "ro\n" in out and "Read-only file system" in out and "wrote" in out
    assert not (ro / "new").exists() and (rw / "new").exists()


def test_a_directory_without_a_shell_is_not_a_root(tmp_path: Path) -> None:
    from aptlayer.errors import InvalidInput

    with pytest.raises(InvalidInput, match="is not a root file system"):
        sandbox.run(tmp_path, ["true"])
