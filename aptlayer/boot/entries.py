"""Boot loader entries for the kept deployments, with kernels taken from the images.

For each deployment slot (current, previous) whose image carries a kernel
(``/boot/vmlinuz-RELEASE`` and ``/boot/initrd.img-RELEASE``), :func:`sync`
copies both to ``BOOT/apt-layer/DIGEST/`` (DIGEST: the image's, cut to 32
hex digits; the copy is made once) and writes a Boot Loader Specification
entry ``BOOT/loader/entries/apt-layer-SLOT.conf`` that boots them with
``apt-layer.deploy=SLOT``. Entries of empty slots and kernel folders no
slot needs are removed. GRUB reads the same entries through
``/etc/grub.d/15_apt-layer``; systemd-boot reads them as they are.

Every file is written to a temporary name, fsynced and renamed, so a boot
loader never reads half an entry or half a kernel; an entry is written only
after its kernel is in place. ``apt-layer-boot-entries.path`` runs
``apt-layer boot entries --update-grub`` when ``deploy/`` changes.

systemd-boot reads only the FAT EFI system partition it started from, so
when one is mounted at ``/efi`` or ``/boot/efi`` (where bootctl and
kernel-install look) and holds systemd-boot's ``loader/`` folder,
:func:`boot_dir` puts the entries and kernels there instead of in ``/boot``.
"""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path

from ..composefs.reader import read_path
from ..composefs.tree import Node
from ..layout import SLOTS
from ..linux import fsops
from ..linux.mountinfo import MountInfo, mount_info
from ..store import Store
from ..bootable import version
from .booted import BOOTED_FILE, SYSROOT

KERNELS = "apt-layer"
ENTRIES = "loader/entries"
#: mount points of an EFI system partition, in the order bootctl and kernel-install try them
ESP_MOUNTS = (Path("/efi"), Path("/boot/efi"))
_KERNEL_DIR = re.compile(r"[0-9a-f]{32}")
_ENTRY = re.compile(r"apt-layer-(" + "|".join(SLOTS) + r")\.conf")


def image_kernel(store: Store, image: str) -> tuple[str, Node, Node] | None:
    """(release, kernel, initramfs) of the newest kernel in ``image``'s /boot, or None."""
    boot = read_path(store.image_file(image), b"/boot", follow_symlinks=False)
    if boot is None or not stat.S_ISDIR(boot.mode):
        return None
    found = []
    for name, node in boot.children.items():
        text = os.fsdecode(name)
        if not text.startswith("vmlinuz-") or not stat.S_ISREG(node.mode):
            continue
        release = text.removeprefix("vmlinuz-")
        initrd = boot.children.get(os.fsencode(f"initrd.img-{release}"))
        if initrd is not None and stat.S_ISREG(initrd.mode) and version(release):
            found.append((version(release), release, node, initrd))
    if not found:
        return None
    _, release, kernel, initrd = max(found, key=lambda f: (f[0], f[1]))
    return release, kernel, initrd


def _content(store: Store, node: Node) -> bytes:
    while node.link is not None:
        node = node.link
    if node.content is not None or node.payload is None:
        return node.content or b""
    return (store.layout.objects / os.fsdecode(node.payload)).read_bytes()


def boot_dir(boot: Path = Path("/boot"), esp_mounts: tuple[Path, ...] = ESP_MOUNTS) -> Path:
    """Where the entries go: the first mounted ESP with a ``loader/`` folder (systemd-boot's), else ``boot``."""
    for esp in esp_mounts:
        if os.path.ismount(esp) and (esp / "loader").is_dir():
            return esp
    return boot


def path_on_its_file_system(path: Path, mounts: list[MountInfo] | None = None) -> str:
    """``path`` as a boot loader sees it on its partition: ``""`` at the root of a file system.

    From the mount that holds it and that mount's root: ``/boot`` on the
    root file system, or bind-mounted from there (a booted deployment's
    /boot), is ``/boot``; a /boot partition or an ESP is ``""``.
    """
    target = os.path.realpath(path)
    holder = None
    for m in mount_info() if mounts is None else mounts:
        point = m.mount_point
        if (target == point or target.startswith(point.rstrip("/") + "/")) and \
                (holder is None or len(point) >= len(holder.mount_point)):
            holder = m  # the deepest mount point; the later of two at one point is on top
    if holder is None:
        return target
    rest = target[len(holder.mount_point):]
    full = "/" + "/".join(part for part in (holder.root.strip("/"), rest.strip("/")) if part)
    return "" if full == "/" else full


def root_options(cmdline: str | None = None) -> str:
    """The running kernel's ``root=``, ``rootflags=`` and ``rootfstype=``, then ``ro``."""
    if cmdline is None:
        with open("/proc/cmdline") as f:
            cmdline = f.read()
    kept = [arg for arg in cmdline.split() if arg.startswith(("root=", "rootflags=", "rootfstype="))]
    return " ".join([*kept, "ro"])


def sync(store: Store, boot: Path = Path("/boot"), options: str | None = None, prefix: str | None = None) -> dict:
    """Make ``boot``'s apt-layer entries and kernels match the deployments; returns what changed.

    ``prefix`` is the path of ``boot`` on the partition the boot loader
    reads (``""`` when it is a partition of its own, else ``/boot``; by
    default found from the mounts, see :func:`path_on_its_file_system`);
    ``options`` the kernel command line before ``apt-layer.deploy=``.
    """
    if prefix is None:
        prefix = path_on_its_file_system(boot)
    options = root_options() if options is None else options
    kernels, entries = boot / KERNELS, boot / ENTRIES
    for d in (kernels, entries):
        d.mkdir(parents=True, exist_ok=True)
    wanted_dirs, written, missing = set(), [], []
    deps = store.journal.deployments()
    for slot in SLOTS:
        dep = deps.get(slot)
        found = image_kernel(store, dep.image) if dep is not None else None
        entry = entries / f"apt-layer-{slot}.conf"
        if found is None:
            if dep is not None:
                missing.append(dep.image)
            if entry.exists():
                fsops.unlink(entry)
                fsops.fsync_dir(entries)
            continue
        release, kernel, initrd = found
        folder = dep.digest[:32]
        wanted_dirs.add(folder)
        target = kernels / folder
        if not target.is_dir():
            target.mkdir()
            fsops.fsync_dir(kernels)
        for name, node in (("vmlinuz", kernel), ("initrd.img", initrd)):
            if not (target / name).exists():
                fsops.write_file_atomic(target / name, _content(store, node))
        text = (f"title Debian, apt-layer {slot}: {dep.image}\n"
                f"version {release}\n"
                f"linux {prefix}/{KERNELS}/{folder}/vmlinuz\n"
                f"initrd {prefix}/{KERNELS}/{folder}/initrd.img\n"
                f"options {options} apt-layer.deploy={slot}\n")
        if not entry.exists() or entry.read_text() != text:
            fsops.write_file_atomic(entry, text.encode())
            written.append(slot)
    removed = []
    with os.scandir(kernels) as it:
        stale = sorted(e.name for e in it if _KERNEL_DIR.fullmatch(e.name) and e.name not in wanted_dirs
                       and e.is_dir(follow_symlinks=False))
    for name in stale:  # only folders named as sync names them: apt-layer made them
        fsops.remove_tree(str(kernels / name))
        removed.append(name)
    if removed:
        fsops.fsync_dir(kernels)
    return {"written": written, "removed": removed, "without_kernel": missing}


def update_grub(sysroot: Path = SYSROOT, booted: Path = BOOTED_FILE) -> str | None:
    """Run ``update-grub`` when installed (it runs /etc/grub.d/15_apt-layer); its error, or None.

    On a booted deployment ``/`` is an overlay, which grub-probe cannot map
    to a disk (grub-mkconfig stops there), and the boot menu is the
    machine's: so there update-grub runs in the physical root at ``sysroot``
    (its GRUB, its /etc/default/grub), chrooted in a private mount namespace
    with /dev, /proc, /sys, /run and the running system's /boot bound in.
    """
    import shutil
    import subprocess

    in_deployment = booted.exists() and os.path.ismount(sysroot)
    root = str(sysroot) if in_deployment else ""
    tool = shutil.which("update-grub", path=os.pathsep.join(f"{root}{d}" for d in ("/usr/sbin", "/usr/bin", "/sbin")))
    if tool is None:
        return None
    argv = [tool]
    if in_deployment:
        bind = 'for d in dev proc sys run boot; do mount --rbind "/$d" "$1/$d"; done; exec chroot "$1" update-grub'
        argv = ["unshare", "--mount", "--propagation", "private", "sh", "-ec", bind, "sh", root]
    r = subprocess.run(argv, capture_output=True, text=True)
    return None if r.returncode == 0 else (r.stderr.strip().splitlines() or ["update-grub failed"])[-1]
