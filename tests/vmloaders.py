"""Real boot loaders for the ``vm`` tests: GRUB and systemd-boot under UEFI (OVMF).

The guest of tests/vmguest.py boots here through firmware, not qemu's
direct kernel boot. Its disk is unchanged (a bare ext4, label
``apt-layer-vm``); a second disk is an EFI system partition made on the
host without a mount (mkfs.vfat, mtools), which OVMF boots:

- ``grub_esp``: a GRUB EFI binary made by ``grub-mkstandalone`` whose
  embedded configuration only finds the ext4 file system by its label and
  reads its ``/boot/grub/grub.cfg``, as the configuration stub that
  Debian's grub-install puts on an ESP does. The menu itself is what
  ``update-grub`` made in the guest;
- ``sd_esp``: systemd-boot as ``\\EFI\\BOOT\\BOOTX64.EFI``, with an empty
  ``loader/entries/`` and a ``loader.conf`` naming the default entry, as
  ``bootctl install`` leaves it; ``apt-layer boot entries`` in the guest
  fills it.

:func:`machine` prepares the guest's disk once (cached beside the guest):
one direct kernel boot of the *physical root* runs the README's set-up
steps for both loaders (``apt-layer boot entries`` for /boot and for the
ESP, the machine's /etc/default/grub, ``update-grub``). The tests then
boot only through the loaders.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import textwrap
from dataclasses import dataclass
from pathlib import Path

import vmguest

OVMF_CODE = Path("/usr/share/OVMF/OVMF_CODE_4M.fd")
OVMF_VARS = Path("/usr/share/OVMF/OVMF_VARS_4M.fd")
SYSTEMD_BOOT = Path("/usr/lib/systemd/boot/efi/systemd-bootx64.efi")
GRUB_EFI_MODULES = Path("/usr/lib/grub/x86_64-efi")
ROOT_LABEL = "apt-layer-vm"
ESP_LABEL = "ESP"
ESP_MIB = 512
#: systemd-boot's vendor GUID for its EFI variables (LoaderEntrySelected, LoaderEntryOneShot)
LOADER_GUID = "4a67b082-0a4c-41cf-b6c7-440b29bb8c4f"
#: GRUB's own modules, loaded before it reads the guest's grub.cfg (its prefix then has none)
GRUB_MODULES = ("part_gpt part_msdos fat ext2 search search_label search_fs_uuid search_fs_file configfile "
                "normal linux echo test loadenv gzio all_video efi_gop sleep font gfxterm")
#: GRUB's embedded configuration: the ext4 root by label, its prefix (grubenv) and grub.cfg
GRUB_STUB = textwrap.dedent(f"""\
    search --no-floppy --label {ROOT_LABEL} --set=root
    set prefix=($root)/boot/grub
    configfile $prefix/grub.cfg
    """)

#: the set-up of a machine booted from its physical root (the README's steps 2 and 3, for both loaders)
PREPARE = textwrap.dedent(f"""\
    say() {{ echo "VMTEST $1=$2"; }}
    (
    set -e
    mkdir -p /boot/efi /boot/grub
    # The ESP, for the physical root and for the deployments (their /etc layer), as on a UEFI machine.
    echo 'LABEL={ESP_LABEL} /boot/efi vfat umask=0077,nofail 0 0' >> /etc/fstab
    mkdir -p /var/lib/apt-layer/etc/upper
    grep -Ev '^[^#[:space:]]+[[:space:]]+/[[:space:]]' /etc/fstab > /var/lib/apt-layer/etc/upper/fstab
    mount /boot/efi
    # GRUB: entries in /boot, the menu from update-grub (which runs /etc/grub.d/15_apt-layer).
    mkdir /boot/apt-layer
    apt-layer --quiet boot entries --boot-dir /boot
    # (grub-efi-amd64's postinst makes /etc/default/grub from this template; the guest has only grub2-common)
    [ -f /etc/default/grub ] || cp /usr/share/grub/default/grub /etc/default/grub
    sed -i 's/^GRUB_DEFAULT=.*/GRUB_DEFAULT=apt-layer-current/; s/^GRUB_TIMEOUT=.*/GRUB_TIMEOUT=0/' /etc/default/grub
    update-grub
    # systemd-boot: the mounted ESP has its loader/ folder, so the entries and kernels go there.
    apt-layer --quiet boot entries
    say esp_entries "$(ls /boot/efi/loader/entries | tr '\\n' ' ')"
    umount /boot/efi
    ) && say prepared yes
    sync
    systemctl poweroff
    """)


def missing() -> str | None:
    """Why the loaders cannot be booted here (the skip reason), or None."""
    for tool, package in (("mkfs.vfat", "dosfstools"), ("mcopy", "mtools"), ("grub-mkstandalone", "grub-common")):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (tools/setup.sh installs {package})"
    for path, package in ((OVMF_CODE, "ovmf"), (OVMF_VARS, "ovmf"), (SYSTEMD_BOOT, "systemd-boot-efi"),
                          (GRUB_EFI_MODULES, "grub-efi-amd64-bin")):
        if not path.exists():
            return f"{path} is missing (tools/setup.sh installs {package})"
    return None


def _run(argv: list[str]) -> str:
    r = subprocess.run(argv, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({r.returncode}): {r.stderr.strip()}")
    return r.stdout


def esp(image: Path, files: dict[str, Path | str | None]) -> Path:
    """A FAT EFI system partition image (whole disk, label ESP) holding ``files`` (ESP path: file, text or
    None for a folder)."""
    image.unlink(missing_ok=True)
    _run(["mkfs.vfat", "-C", "-n", ESP_LABEL, str(image), str(ESP_MIB * 1024)])
    made = set()
    for dest, source in sorted(files.items()):
        parts = dest.split("/")
        for i in range(1, len(parts) + (source is None)):
            folder = "/".join(parts[:i])
            if folder not in made:
                _run(["mmd", "-i", str(image), f"::/{folder}"])
                made.add(folder)
        if source is None:
            continue
        if isinstance(source, str):
            text = image.with_name(image.name + ".file")
            text.write_text(source)
            source = text
        _run(["mcopy", "-i", str(image), str(source), f"::/{dest}"])
    image.with_name(image.name + ".file").unlink(missing_ok=True)
    return image


def grub_esp(image: Path) -> Path:
    """An ESP whose \\EFI\\BOOT\\BOOTX64.EFI is GRUB, reading the guest's /boot/grub/grub.cfg."""
    stub = image.with_name("grub-stub.cfg")
    stub.write_text(GRUB_STUB)
    binary = image.with_name("grubx64.efi")
    _run(["grub-mkstandalone", "-O", "x86_64-efi", "-o", str(binary), f"--modules={GRUB_MODULES}",
          "--locales=", "--fonts=", "--themes=", f"boot/grub/grub.cfg={stub}"])
    return esp(image, {"EFI/BOOT/BOOTX64.EFI": binary})


def sd_esp(image: Path) -> Path:
    """An ESP with systemd-boot as \\EFI\\BOOT\\BOOTX64.EFI, its loader.conf and no entry yet."""
    return esp(image, {"EFI/BOOT/BOOTX64.EFI": SYSTEMD_BOOT,
                       "loader/loader.conf": "default apt-layer-current.conf\ntimeout 0\n",
                       "loader/entries": None})


def read_esp(image: Path, path: str) -> str | None:
    """A text file of an ESP image (mtools), or None if absent."""
    r = subprocess.run(["mtype", "-i", str(image), f"::/{path}"], capture_output=True, text=True)
    return r.stdout if r.returncode == 0 else None


def list_esp(image: Path, folder: str) -> list[str]:
    """The names in an ESP image's folder (mtools), without . and .."""
    r = subprocess.run(["mdir", "-b", "-i", str(image), f"::/{folder}"], capture_output=True, text=True)
    return sorted(line.rstrip("/").rsplit("/", 1)[-1] for line in r.stdout.splitlines()
                  if line.strip() and not line.rstrip("/").endswith(("/.", "/..")))


def firmware(esp_image: Path, nvram: Path) -> list[str]:
    """qemu arguments: OVMF (its variables in ``nvram``, kept across boots) and the ESP as the first disk."""
    return ["-drive", f"if=pflash,format=raw,readonly=on,file={OVMF_CODE}",
            "-drive", f"if=pflash,format=raw,file={nvram}",
            "-drive", f"file={esp_image},format=raw,if=virtio,cache=unsafe"]


@dataclass(frozen=True)
class Machine:
    """The guest's disk after the set-up boot, and the systemd-boot ESP that boot filled."""

    disk: Path
    sd_esp: Path


def machine(guest: vmguest.Guest) -> Machine:
    """The prepared disk for ``guest``, made once (one direct kernel boot of the physical root) and cached."""
    key = hashlib.sha256(guest.disk.parent.name.encode() + Path(__file__).read_bytes()).hexdigest()[:16]
    final = vmguest.CACHE / f"vm-loaders-{key}"
    with vmguest._locked("vm-loaders"):
        if not (final / "disk.raw").exists():
            work = final.with_name(final.name + ".part")
            shutil.rmtree(work, ignore_errors=True)
            work.mkdir()
            disk = vmguest.copy_disk(guest, work / "disk.raw")
            sd = sd_esp(work / "sd-esp.raw")
            direct = [*firmware_less(guest), "-drive", f"file={sd},format=raw,if=virtio,cache=unsafe"]
            done = vmguest.boot(disk, guest, PREPARE, work / "prepare.log", firmware=direct)
            if done.found.get("prepared") != "yes":
                raise RuntimeError(f"the set-up boot failed; console in {work / 'prepare.log'}")
            work.rename(final)
            for old in vmguest.CACHE.glob("vm-loaders-*"):
                if old != final and old.is_dir():
                    shutil.rmtree(old)
    return Machine(final / "disk.raw", final / "sd-esp.raw")


def firmware_less(guest: vmguest.Guest) -> list[str]:
    """qemu's direct kernel boot of the physical root (no apt-layer.deploy=), read-write as a Debian root
    with its fstab line would be, found by its label."""
    return ["-kernel", str(guest.kernel), "-initrd", str(guest.initrd),
            "-append", f"console=ttyS0 root=LABEL={ROOT_LABEL} rw panic=-1 systemd.firstboot=off"]
