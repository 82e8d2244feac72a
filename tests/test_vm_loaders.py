"""Real boot loaders boot the deployments: GRUB and systemd-boot under UEFI (OVMF).

The guest of tests/vmguest.py, prepared once by tests/vmloaders.py (a boot
of its physical root that runs the README's set-up: ``apt-layer boot
entries``, the machine's /etc/default/grub, ``update-grub``), boots through
OVMF and a boot loader on an EFI system partition, never through qemu's
direct kernel boot. Per loader, two boots:

1. the default entry boots the current deployment; there ``apt-layer
   deploy three`` makes ``apt-layer-boot-entries.path`` update the
   entries (and, for GRUB, the menu through update-grub), and the
   administrator's tool picks the previous entry for the next boot only
   (``grub-reboot``, ``bootctl set-oneshot``);
2. that boot runs the previous deployment, two, where the default would
   now boot three.

Each boot's console is kept in the test's tmp_path.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

import vmguest
import vmloaders
from test_vm import booted_events, digest_of

pytestmark = pytest.mark.vm

#: printf, not echo: dash's echo reads the backslashes of systemd-boot's initrd= path as escapes
REPORT = r"""
say() { printf 'VMTEST %s=%s\n' "$1" "$2"; }
say release "$(cat /usr/share/apt-layer-vmtest/release)"
say root "$(findmnt -no FSTYPE,SOURCE /)"
say cmdline "$(cat /proc/cmdline)"
say efi "$(test -d /sys/firmware/efi && echo yes || echo no)"
say esp "$(findmnt -no FSTYPE /boot/efi)"
say status "$(apt-layer status --json | python3 -c 'import json, sys; print(json.dumps(json.load(sys.stdin)))')"
# systemd-boot's EFI variables: 4 bytes of attributes, then UTF-16 text
loader_var() {
    f=/sys/firmware/efi/efivars/$1-4a67b082-0a4c-41cf-b6c7-440b29bb8c4f
    [ -f "$f" ] && cat "$f" | tail -c +5 | tr -d '\0'
}
say loader_selected "$(loader_var LoaderEntrySelected)"
"""
#: deploy three in the booted system; wait for the path unit's service to update the entries
DEPLOY_THREE = r"""
apt-layer deploy three
sleep 3
while [ "$(systemctl show -P ActiveState apt-layer-boot-entries.service)" = activating ]; do sleep 1; done
unit() { systemctl show -P "$1" apt-layer-boot-entries.service; }
say entries_service "$(unit Result) $(unit ExecMainStatus) $(unit NRestarts)"
say entries_ran "$(unit ExecMainStartTimestampMonotonic)"
journalctl -b -u apt-layer-boot-entries.service --no-pager | tail -n 15
"""
POWEROFF = "\nsync\nsystemctl poweroff\n"


@pytest.fixture(scope="module")
def guest() -> vmguest.Guest:
    if shutil.which("qemu-system-x86_64") is None:
        pytest.skip("qemu-system-x86_64 is not installed (tools/setup.sh installs qemu-system-x86)")
    reason = vmloaders.missing()
    if reason is not None:
        pytest.skip(reason)
    from test_debian_package import _wheelhouse

    try:
        return vmguest.guest(_wheelhouse)
    except vmguest.Unavailable as exc:
        pytest.skip(str(exc))


@pytest.fixture(scope="module")
def prepared(guest) -> vmloaders.Machine:
    return vmloaders.machine(guest)


class Loader:
    """A copy of the prepared disk, booted through OVMF from ``esp`` (variables kept across its boots)."""

    def __init__(self, guest: vmguest.Guest, prepared: vmloaders.Machine, esp: Path, tmp: Path):
        self.guest, self.esp, self.tmp, self.boots = guest, esp, tmp, 0
        self.disk = tmp / "disk.raw"
        subprocess.run(["cp", "--sparse=always", str(prepared.disk), str(self.disk)], check=True)
        self.nvram = tmp / "OVMF_VARS.fd"
        shutil.copy(vmloaders.OVMF_VARS, self.nvram)

    def report(self, script: str = "") -> dict[str, str]:
        self.boots += 1
        log = self.tmp / f"boot{self.boots}.log"
        found = vmguest.boot(self.disk, self.guest, REPORT + script + POWEROFF, log,
                             firmware=vmloaders.firmware(self.esp, self.nvram)).found
        assert "release" in found, f"the guest's script did not run: see {log}"
        return found

    def journal(self):
        return vmguest.journal(self.disk, self.tmp / f"journal{self.boots}")


def _booted(found: dict[str, str]) -> dict:
    return json.loads(found["status"])["booted"]


def test_grub_boots_the_current_entry_and_the_previous_one_chosen_with_grub_reboot(guest, prepared, tmp_path):
    esp = vmloaders.grub_esp(tmp_path / "esp.raw")
    m = Loader(guest, prepared, esp, tmp_path)
    conn = vmguest.journal(prepared.disk, tmp_path / "before")
    two, three = digest_of(conn, "two")[:32], digest_of(conn, "three")[:32]
    # 1. GRUB's default (GRUB_DEFAULT=apt-layer-current) boots the current deployment, two.
    found = m.report(DEPLOY_THREE + r"""
say grub_cfg "$(grep -E "^menuentry|linux[[:space:]]" /boot/grub/grub.cfg | tr '\n\t' '| ')"
grub-reboot apt-layer-previous
say grubenv "$(grub-editenv /boot/grub/grubenv list | tr '\n' ' ')"
""")
    assert found["efi"] == "yes" and found["root"] == "overlay composefs"
    assert found["release"] == "two"
    cmdline = found["cmdline"].split()
    assert f"BOOT_IMAGE=/boot/apt-layer/{two}/vmlinuz" in cmdline  # GRUB's linux command, the entry's kernel
    assert "apt-layer.deploy=current" in cmdline
    assert _booted(found)["image"] == "two" and _booted(found)["deploy"] == "current"
    # The deploy updated the menu, through update-grub run in the physical root.
    assert found["entries_service"] == "success 0 0" and found["entries_ran"] not in ("", "0")
    assert "menuentry 'Debian, apt-layer current: three'" in found["grub_cfg"]
    assert "menuentry 'Debian, apt-layer previous: two'" in found["grub_cfg"]
    assert f"/boot/apt-layer/{three}/vmlinuz root=LABEL=apt-layer-vm ro apt-layer.deploy=current" \
        in found["grub_cfg"]
    assert "next_entry=apt-layer-previous" in found["grubenv"]
    entry = vmguest.read_file(m.disk, "boot/loader/entries/apt-layer-current.conf").decode()
    assert f"linux /boot/apt-layer/{three}/vmlinuz\n" in entry  # /boot's path on the root file system
    cfg = vmguest.read_file(m.disk, "boot/grub/grub.cfg").decode()
    assert "### BEGIN /etc/grub.d/15_apt-layer ###" in cfg and 'set default="apt-layer-current"' in cfg
    # 2. grub-reboot's choice: the previous entry boots two, where the default now boots three.
    found = m.report()
    assert found["release"] == "two"
    cmdline = found["cmdline"].split()
    assert f"BOOT_IMAGE=/boot/apt-layer/{two}/vmlinuz" in cmdline and "apt-layer.deploy=previous" in cmdline
    booted = _booted(found)
    assert (booted["image"], booted["deploy"]) == ("two", "previous")
    assert json.loads(found["status"])["deployments"]["current"]["image"] == "three"
    assert [(image, data["deploy"]) for image, data in booted_events(m.journal())] == [
        ("two", "current"), ("two", "previous")]
    # GRUB cleared the one-shot choice: the next boot is the default again.
    assert b"next_entry=\n" in vmguest.read_file(m.disk, "boot/grub/grubenv")


def test_systemd_boot_boots_the_default_entry_and_the_one_shot_previous_one(guest, prepared, tmp_path):
    esp = tmp_path / "esp.raw"
    shutil.copy(prepared.sd_esp, esp)
    m = Loader(guest, prepared, esp, tmp_path)
    conn = vmguest.journal(prepared.disk, tmp_path / "before")
    one, two, three = (digest_of(conn, name)[:32] for name in ("one", "two", "three"))
    # What the set-up boot wrote on the ESP: both entries and their kernels.
    assert vmloaders.list_esp(esp, "apt-layer") == sorted([one, two])
    # 1. loader.conf's default, apt-layer-current.conf, boots the current deployment, two.
    found = m.report(DEPLOY_THREE + r"""
say esp_entries "$(ls /boot/efi/loader/entries | tr '\n' ' ')"
bootctl set-oneshot apt-layer-previous.conf
say oneshot "$(loader_var LoaderEntryOneShot)"
""")
    assert found["efi"] == "yes" and found["root"] == "overlay composefs" and found["esp"] == "vfat"
    assert found["release"] == "two"
    assert found["loader_selected"] == "apt-layer-current.conf"
    cmdline = found["cmdline"].split()
    assert f"initrd=\\apt-layer\\{two}\\initrd.img" in cmdline  # systemd-boot loaded the entry's files
    assert "apt-layer.deploy=current" in cmdline
    assert _booted(found)["image"] == "two" and _booted(found)["deploy"] == "current"
    assert found["entries_service"] == "success 0 0" and found["entries_ran"] not in ("", "0")
    assert found["oneshot"] == "apt-layer-previous.conf"
    # The deploy rewrote the entries on the ESP: three's kernel in, one's out.
    assert vmloaders.list_esp(esp, "apt-layer") == sorted([two, three])
    current = vmloaders.read_esp(esp, "loader/entries/apt-layer-current.conf")
    previous = vmloaders.read_esp(esp, "loader/entries/apt-layer-previous.conf")
    assert current.startswith("title Debian, apt-layer current: three\n")
    assert f"linux /apt-layer/{three}/vmlinuz\n" in current
    assert previous.startswith("title Debian, apt-layer previous: two\n")
    assert f"linux /apt-layer/{two}/vmlinuz\n" in previous
    assert "options root=LABEL=apt-layer-vm ro apt-layer.deploy=previous\n" in previous
    # 2. The one-shot entry boots the previous deployment, two (the default now boots three).
    found = m.report()
    assert found["release"] == "two"
    assert found["loader_selected"] == "apt-layer-previous.conf"
    cmdline = found["cmdline"].split()
    assert f"initrd=\\apt-layer\\{two}\\initrd.img" in cmdline and "apt-layer.deploy=previous" in cmdline
    booted = _booted(found)
    assert (booted["image"], booted["deploy"]) == ("two", "previous")
    assert json.loads(found["status"])["deployments"]["current"]["image"] == "three"
    assert [(image, data["deploy"]) for image, data in booted_events(m.journal())] == [
        ("two", "current"), ("two", "previous")]
