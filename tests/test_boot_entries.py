"""Boot loader entries (aptlayer.boot.entries and /etc/grub.d/15_apt-layer):
each kept deployment's own kernel and initramfs copied to BOOT/apt-layer/,
a Boot Loader Specification entry per slot, what no slot needs removed; the
grub.d script turns the entries into menu entries that grub-script-check
accepts. BOOT is a directory of the test's."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from aptlayer.boot import entries
from aptlayer.store import Store

REPO = Path(__file__).resolve().parent.parent
GRUB_D = REPO / "aptlayer" / "data" / "grub.d" / "15_apt-layer"


def kernel_bytes(release: str, what: str) -> bytes:
    return hashlib.sha256(f"{what} {release}".encode()).digest() * 300  # big enough for the object store


def image(store: Store, tmp_path: Path, name: str, releases: list[str]) -> None:
    tree = tmp_path / "trees" / name
    (tree / "boot").mkdir(parents=True)
    for release in releases:
        (tree / "boot" / f"vmlinuz-{release}").write_bytes(kernel_bytes(release, "kernel"))
        (tree / "boot" / f"initrd.img-{release}").write_bytes(kernel_bytes(release, "initrd"))
    os.symlink("boot/vmlinuz-x", tree / "vmlinuz")
    store.create(str(tree), name)


@pytest.fixture
def machine(store: Store, tmp_path: Path):
    image(store, tmp_path, "one", ["6.12.1-amd64"])
    image(store, tmp_path, "two", ["6.12.1-amd64", "6.12.9-amd64"])
    image(store, tmp_path, "bare", [])
    store.deploy("one")
    store.deploy("two")
    boot = tmp_path / "boot"
    boot.mkdir()
    return store, boot


def sync(store: Store, boot: Path) -> dict:
    return entries.sync(store, boot, options="root=/dev/vda ro", prefix="/boot")


def folder(store: Store, name: str) -> str:
    return store.journal.image(name).digest[:32]


def test_each_slot_gets_its_images_newest_kernel_and_an_entry(machine) -> None:
    store, boot = machine
    assert sync(store, boot) == {"written": ["current", "previous"], "removed": [], "without_kernel": []}
    two, one = folder(store, "two"), folder(store, "one")
    assert (boot / "apt-layer" / two / "vmlinuz").read_bytes() == kernel_bytes("6.12.9-amd64", "kernel")
    assert (boot / "apt-layer" / two / "initrd.img").read_bytes() == kernel_bytes("6.12.9-amd64", "initrd")
    assert (boot / "apt-layer" / one / "vmlinuz").read_bytes() == kernel_bytes("6.12.1-amd64", "kernel")
    assert (boot / "loader/entries/apt-layer-current.conf").read_text() == (
        "title Debian, apt-layer current: two\nversion 6.12.9-amd64\n"
        f"linux /boot/apt-layer/{two}/vmlinuz\ninitrd /boot/apt-layer/{two}/initrd.img\n"
        "options root=/dev/vda ro apt-layer.deploy=current\n")
    assert "apt-layer previous: one" in (boot / "loader/entries/apt-layer-previous.conf").read_text()
    assert sync(store, boot) == {"written": [], "removed": [], "without_kernel": []}  # nothing to do


def test_rollback_swaps_the_entries_and_unneeded_kernels_go(machine) -> None:
    store, boot = machine
    sync(store, boot)
    store.rollback()
    assert sync(store, boot)["written"] == ["current", "previous"]
    assert "current: one" in (boot / "loader/entries/apt-layer-current.conf").read_text()
    # A deployment without a kernel has no entry; one's kernel is no longer needed.
    one = folder(store, "one")
    store.deploy("bare")  # current bare, previous one
    store.deploy("two")  # current two, previous bare
    assert sync(store, boot) == {"written": ["current"], "removed": [one], "without_kernel": ["bare"]}
    assert not (boot / "loader/entries/apt-layer-previous.conf").exists()
    assert sorted(os.listdir(boot / "apt-layer")) == [folder(store, "two")]


def test_only_kernel_folders_apt_layer_names_are_removed(machine) -> None:
    store, boot = machine
    (boot / "apt-layer" / "notes").mkdir(parents=True)
    sync(store, boot)
    assert (boot / "apt-layer" / "notes").is_dir()


def test_root_options_come_from_the_running_kernel() -> None:
    assert entries.root_options("BOOT_IMAGE=/vmlinuz root=UUID=abc rootflags=x quiet ro") == "root=UUID=abc rootflags=x ro"


def test_the_grub_script_makes_menu_entries_grub_script_check_accepts(machine, tmp_path: Path) -> None:
    lib = Path("/usr/share/grub/grub-mkconfig_lib")
    if not lib.exists() or shutil.which("grub-script-check") is None:
        pytest.skip("grub-common is not installed (tools/setup.sh installs it)")
    store, boot = machine
    sync(store, boot)
    env = {"PATH": os.environ["PATH"], "APT_LAYER_BOOT": str(boot)}
    r = subprocess.run(["sh", str(GRUB_D)], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    two = folder(store, "two")
    assert "menuentry 'Debian, apt-layer current: two' --class debian --class gnu-linux --class os " \
           "--id 'apt-layer-current' {" in r.stdout
    assert f"\tlinux\t{boot}/apt-layer/{two}/vmlinuz root=/dev/vda ro apt-layer.deploy=current\n" in r.stdout
    assert r.stdout.count("menuentry ") == 2
    out = tmp_path / "grub.cfg"
    out.write_text(r.stdout)
    check = subprocess.run(["grub-script-check", str(out)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    # No entries, no menu entries (and still a valid script).
    shutil.rmtree(boot / "loader")
    assert subprocess.run(["sh", str(GRUB_D)], capture_output=True, text=True, env=env).stdout == ""


# --- systemd-boot: the entries on a mounted EFI system partition ---------------------------------

@pytest.fixture
def mounted(as_root, tmp_path: Path):
    """A tmpfs mounted at tmp_path/efi (a mount point, as an ESP is), unmounted after."""
    mnt = tmp_path / "efi"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "esp", str(mnt)], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def test_the_entries_go_to_the_first_mounted_esp_with_systemd_boots_loader_folder(mounted, tmp_path) -> None:
    boot, plain = tmp_path / "boot", tmp_path / "not-mounted"
    (plain / "loader").mkdir(parents=True)
    assert entries.boot_dir(boot, (tmp_path / "absent", plain, mounted)) == boot  # no loader/ on the mount
    (mounted / "loader").mkdir()
    assert entries.boot_dir(boot, (tmp_path / "absent", plain, mounted)) == mounted
    assert entries.boot_dir(boot, (tmp_path / "absent", plain)) == boot  # not a mount point: not an ESP


@pytest.fixture
def fat_esp(as_root, tmp_path: Path):
    """A FAT file system mounted as Debian mounts an ESP (umask=0077), with systemd-boot's loader/."""
    if shutil.which("mkfs.vfat") is None:
        pytest.skip("mkfs.vfat is not installed (tools/setup.sh installs dosfstools)")
    image, mnt = tmp_path / "esp.img", tmp_path / "efi"
    subprocess.run(["mkfs.vfat", "-C", str(image), str(64 * 1024)], check=True, capture_output=True)
    mnt.mkdir()
    r = subprocess.run(["mount", "-o", "loop,umask=0077", str(image), str(mnt)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a FAT image: {r.stderr.strip().splitlines()[0]}")
    try:
        (mnt / "loader").mkdir()
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def test_the_entries_and_kernels_are_written_on_a_fat_esp(machine, fat_esp) -> None:
    store, _ = machine
    # Written as on any file system (FAT ignores the modes it cannot hold under umask=0077).
    assert entries.sync(store, fat_esp, options="root=/dev/vda ro") == {
        "written": ["current", "previous"], "removed": [], "without_kernel": []}
    two = folder(store, "two")
    text = (fat_esp / "loader/entries/apt-layer-current.conf").read_text()
    assert f"linux /apt-layer/{two}/vmlinuz\n" in text  # paths from the ESP's root, as systemd-boot reads them
    assert (fat_esp / "apt-layer" / two / "vmlinuz").read_bytes() == kernel_bytes("6.12.9-amd64", "kernel")
    store.deploy("one")
    assert entries.sync(store, fat_esp, options="root=/dev/vda ro")["written"] == ["current", "previous"]


# --- update-grub on a booted deployment: in the physical root ------------------------------------

def test_update_grub_on_a_booted_deployment_runs_chrooted_in_the_physical_root(debian_root, tmp_path) -> None:
    sysroot = debian_root
    if not os.path.ismount(sysroot):
        pytest.skip("the test's root is a copy here, not a mount point as /sysroot is")
    booted = tmp_path / "booted"
    booted.write_text("deploy=current\nimage=two\nstore=/var/lib/apt-layer\n")
    tool = sysroot / "usr/sbin/update-grub"
    tool.write_text("#!/bin/sh\n"
                    "{ cat /etc/debian_version; test -e /dev/null && echo dev\n"
                    "  test -e /proc/self/mountinfo && echo proc; test -d /sys/kernel && echo sys\n"
                    "  findmnt -no TARGET /boot; } > /var/update-grub-ran\n"
                    "test -e /var/fail || exit 0\n"
                    'echo "grub-mkconfig: first" >&2; echo "grub-probe: error: last" >&2; exit 1\n')
    tool.chmod(0o755)
    assert entries.update_grub(sysroot, booted) is None
    ran = (sysroot / "var/update-grub-ran").read_text().split()
    assert ran[0] == (sysroot / "etc/debian_version").read_text().strip()  # the physical root's files
    assert ran[1:] == ["dev", "proc", "sys", "/boot"]  # with the running system's /dev, /proc, /sys, /boot
    (sysroot / "var/fail").touch()
    assert entries.update_grub(sysroot, booted) == "grub-probe: error: last"


def test_the_entries_paths_are_those_on_the_partition_the_loader_reads() -> None:
    from aptlayer.linux.mountinfo import MountInfo

    def mounts(*lines: str) -> list[MountInfo]:
        return [MountInfo.parse(line.encode()) for line in lines]

    physical = "1 0 254:16 / / rw,relatime - ext4 /dev/vdb rw"
    assert entries.path_on_its_file_system(Path("/boot"), mounts(physical)) == "/boot"
    # A booted deployment: / is the overlay, /boot a bind mount of the physical root's /boot.
    deployment = mounts("20 1 0:40 / / ro - overlay composefs ro",
                        "21 20 254:16 /boot /boot rw,relatime - ext4 /dev/vdb rw",
                        "22 21 254:0 / /boot/efi rw - vfat /dev/vda rw,fmask=0077",
                        "23 20 254:16 / /sysroot rw - ext4 /dev/vdb rw")
    assert entries.path_on_its_file_system(Path("/boot"), deployment) == "/boot"  # was "": a mount point
    assert entries.path_on_its_file_system(Path("/boot/efi"), deployment) == ""
    assert entries.path_on_its_file_system(Path("/sysroot/boot"), deployment) == "/boot"
    separate = mounts(physical, "2 1 254:17 / /boot rw - ext4 /dev/vdc rw")
    assert entries.path_on_its_file_system(Path("/boot"), separate) == ""
    spaced = mounts(physical, "3 1 254:18 /a\\040b /mnt/x\\040y rw - ext4 /dev/vdd rw")
    assert entries.path_on_its_file_system(Path("/mnt/x y/boot"), spaced) == "/a b/boot"
