"""A Debian 13 virtual machine boots apt-layer deployments (issue 14's scenarios).

qemu (software emulation: KVM does not work on these machines) boots the
guest of tests/vmguest.py from a copy of its disk, with the kernel and
initramfs taken from the guest. Each boot runs a script (passed through
fw_cfg) after multi-user.target that prints ``VMTEST key=value`` lines on
the serial console and powers off; after the boots the store on the disk
image is read with debugfs (no mount). Skips when qemu or the guest's
ingredients are missing; the first run builds the guest (a few minutes).
"""

from __future__ import annotations

import json
import random
import shutil
import time
from pathlib import Path

import pytest

import vmguest

pytestmark = pytest.mark.vm

#: what every boot reports: the mounts, the image that runs, what apt-layer says
SAY = 'say() { echo "VMTEST $1=$2"; }\n'
REPORT = SAY + r"""
say root "$(findmnt -no FSTYPE,SOURCE /)"
say root_options "$(findmnt -no OPTIONS /)"
say image_mount "$(findmnt -no FSTYPE /run/apt-layer/image)"
say sysroot "$(findmnt -no FSTYPE /sysroot)"
say etc "$(findmnt -no FSTYPE,SOURCE /etc)"
say var "$(findmnt -no FSTYPE /var)"
say boot "$(findmnt -no FSTYPE /boot)"
say release "$(cat /usr/share/apt-layer-vmtest/release)"
say status "$(apt-layer status --json | python3 -c 'import json, sys; print(json.dumps(json.load(sys.stdin)))')"
say dpkg_hello "$(dpkg-query -W -f '${Status}' hello 2>/dev/null || echo absent)"
"""
#: what status prints of the deployments, on one line
STATUS_TEXT = """say status_text "$(apt-layer status | grep -E '(current|previous):' | tr '\\n' '|')"\n"""
#: the end of a boot: stopping every unit in order costs seconds under emulation and proves
#: nothing here; --force still kills the processes, unmounts (or remounts read-only) and syncs
POWEROFF = "\nsync\nsystemctl poweroff --force\n"


@pytest.fixture(scope="module")
def guest() -> vmguest.Guest:
    if shutil.which("qemu-system-x86_64") is None:
        pytest.skip("qemu-system-x86_64 is not installed (tools/setup.sh installs qemu-system-x86)")
    from test_debian_package import _wheelhouse

    try:
        return vmguest.guest(_wheelhouse)
    except vmguest.Unavailable as exc:
        pytest.skip(str(exc))


@pytest.fixture
def disk(guest, tmp_path) -> Path:
    return vmguest.copy_disk(guest, tmp_path / "disk.raw")


class Machine:
    """One disk, booted as many times as a scenario needs; each console kept in tmp_path."""

    def __init__(self, guest: vmguest.Guest, disk: Path, tmp: Path):
        self.guest, self.disk, self.tmp, self.boots = guest, disk, tmp, 0

    def boot(self, script: str, append: str = "apt-layer.deploy=current", **kw) -> vmguest.Boot:
        self.boots += 1
        return vmguest.boot(self.disk, self.guest, script, self.tmp / f"boot{self.boots}.log", append=append, **kw)

    def run(self, script: str, **kw) -> vmguest.Boot:
        """Boot, run ``script`` (with ``say``), power off."""
        return self.boot(SAY + script + POWEROFF, **kw)

    def report(self, script: str = "", **kw) -> dict[str, str]:
        """Boot, report (then run ``script``), power off; what the guest found."""
        found = self.boot(REPORT + script + POWEROFF, **kw).found
        assert "release" in found, f"the guest's script did not run: see {self.tmp}/boot{self.boots}.log"
        return found

    def journal(self):
        return vmguest.journal(self.disk, self.tmp / f"journal{self.boots}")

    def file(self, path: str) -> bytes | None:
        return vmguest.read_file(self.disk, f"{vmguest.STORE}/{path}")


@pytest.fixture
def vm(guest, disk, tmp_path) -> Machine:
    return Machine(guest, disk, tmp_path)


def booted_events(conn) -> list[tuple[str, dict]]:
    return [(row["subject"], json.loads(row["data"]))
            for row in conn.execute("SELECT subject, data FROM events WHERE kind = 'booted' ORDER BY seq")]


def digest_of(conn, image: str) -> str:
    return conn.execute("SELECT digest FROM images WHERE name = ?", (image,)).fetchone()[0]


def deployments(conn) -> dict[str, str]:
    return {row["slot"]: row["image"] for row in conn.execute("SELECT slot, image FROM deployments")}


# --- 1. the current deployment boots; 2. /etc and /var across a reboot, a deploy and a rollback --

WRITE_LOCAL = """
say usr_write "$(touch /usr/apt-layer-vmtest 2>/dev/null && echo allowed || echo refused)"
echo local > /etc/apt-layer-vmtest-local
echo edited by the administrator > /etc/apt-layer-vmtest/admin-edits
echo kept > /var/lib/apt-layer-vmtest-local
"""
READ_LOCAL = """
say etc_local "$(cat /etc/apt-layer-vmtest-local)"
say etc_edited "$(cat /etc/apt-layer-vmtest/admin-edits)"
say etc_from_image "$(cat /etc/apt-layer-vmtest/from-image)"
say var_local "$(cat /var/lib/apt-layer-vmtest-local)"
"""
LOCAL = {"etc_local": "local", "etc_edited": "edited by the administrator", "var_local": "kept"}


def _local(found: dict[str, str]) -> dict[str, str]:
    return {key: found.get(key) for key in LOCAL}


#: apt on the booted system: install stops before apt runs, naming apt-layer (docs/boot.md); reading works
APT = r"""
status_before=$(md5sum < /var/lib/dpkg/status)
apt_out=$(apt-get install -y hello 2>&1); say apt_install_rc "$?"
say apt_install "$(echo "$apt_out" | tr '\n' '|')"
say apt_status_unchanged "$([ "$(md5sum < /var/lib/dpkg/status)" = "$status_before" ] && echo yes || echo no)"
say apt_downloaded "$(find /var/cache/apt/archives -name '*.deb' | wc -l)"
say apt_remove "$(apt remove -y apt 2>&1 | tr '\n' '|')"
say apt_show "$(apt show apt 2>/dev/null | grep -c '^Package: apt$')"
"""


def test_boots_the_current_deployment_and_keeps_etc_and_var_across_deploy_and_rollback(vm: Machine) -> None:
    # 1. The current deployment, two, is the root: overlay over erofs, read-only.
    found = vm.report(STATUS_TEXT + WRITE_LOCAL + APT + "apt-layer deploy three\n")
    assert found["root"] == "overlay composefs"
    assert "lowerdir=/run/apt-layer/image::/root/var/lib/apt-layer/images/objects" in found["root_options"]
    assert "ro" in found["root_options"].split(",")
    assert found["image_mount"] == "erofs"
    assert (found["sysroot"], found["var"], found["boot"]) == ("ext4", "ext4", "ext4")
    assert found["etc"] == "overlay apt-layer-etc"
    assert found["release"] == "two"
    assert found["usr_write"] == "refused"
    assert found["dpkg_hello"] == "absent"  # the image's dpkg database, not the physical root's
    # apt-get install stops before apt runs (no lock error, nothing fetched, dpkg untouched) and
    # names apt-layer install; apt remove names apt-layer uninstall; apt show still answers.
    assert found["apt_install_rc"] == "100"
    assert "Use 'apt-layer install PACKAGE...' instead" in found["apt_install"], found["apt_install"]
    assert "lock" not in found["apt_install"]
    assert (found["apt_status_unchanged"], found["apt_downloaded"]) == ("yes", "0")
    assert "Use 'apt-layer uninstall PACKAGE...' instead" in found["apt_remove"]
    assert found["apt_show"] == "1"
    status = json.loads(found["status"])
    assert status["booted"]["image"] == "two" and status["booted"]["deploy"] == "current"
    assert status["deployments"]["current"]["image"] == "two"
    assert found["status_text"] == "● current: two (booted)|  previous: one|"
    conn = vm.journal()
    ((image, data),) = booted_events(conn)
    assert image == "two" and data["digest"] == digest_of(conn, "two") and data["deploy"] == "current"
    assert data["kernel"] == vm.guest.kernel_release and len(data["boot_id"]) == 32
    assert vm.file("boot/good") == b"two\n"  # the boot completed: no more counting
    assert vm.file("boot/attempts") is None
    # 2. After a reboot into a new deployment, the local changes are there; a
    # file only the image changed shows the new image's version.
    found = vm.report(READ_LOCAL + "apt-layer rollback\n")
    assert found["release"] == "three" and _local(found) == LOCAL
    assert found["etc_from_image"] == "three"
    # ... and after a rollback; `etc diff` lists them against the running image.
    found = vm.report(READ_LOCAL + 'say etc_diff "$(apt-layer etc diff | tr \'\\n\' \'|\')"\n')
    assert found["release"] == "two" and _local(found) == LOCAL
    assert found["etc_from_image"] == "two"
    diff = found["etc_diff"].split("|")
    assert "A /etc/apt-layer-vmtest-local" in diff and "M /etc/apt-layer-vmtest/admin-edits" in diff
    assert not any(line.endswith("/etc/apt-layer-vmtest/from-image") for line in diff)
    # The changes live in the store's etc/upper on the physical root.
    assert vm.file("etc/upper/apt-layer-vmtest-local") == b"local\n"
    assert vm.file("etc/upper/apt-layer-vmtest/from-image") is None
    assert [image for image, _ in booted_events(vm.journal())] == ["two", "three", "two"]


# --- 6. apt-layer.deploy=previous on the kernel command line; 3. a layered package -----------------

HELLO = 'say hello "$(hello 2>/dev/null || echo missing)"\n'


def test_the_command_line_boots_the_previous_deployment_and_a_layered_package_comes_and_goes(vm: Machine) -> None:
    # 6. apt-layer.deploy=previous boots one, and changes nothing: what the guest reports
    # comes before its deploy of hello (one boot serves both scenarios).
    found = vm.report(STATUS_TEXT + HELLO + "apt-layer deploy hello\n", append="apt-layer.deploy=previous")
    assert found["release"] == "one"
    assert found["status_text"] == "  current: two|● previous: one (booted)|"
    status = json.loads(found["status"])
    assert status["booted"] == {"image": "one", "digest": status["deployments"]["previous"]["digest"],
                                "deploy": "previous", "kernel": vm.guest.kernel_release}
    assert status["next_boot"] == "two"
    assert {slot: dep["image"] for slot, dep in status["deployments"].items()} == {"current": "two", "previous": "one"}
    conn = vm.journal()
    assert [(image, data["deploy"]) for image, data in booted_events(conn)] == [("one", "previous")]
    # no rollback or deploy was recorded for booting previous: the only deploy is the guest's own
    assert [row["subject"] for row in conn.execute(
        "SELECT subject FROM events WHERE kind IN ('deployed', 'rolled-back') AND seq > "
        "(SELECT MAX(seq) FROM events WHERE kind = 'booted')")] == ["hello"]
    # 3. The layered package: after a reboot into hello its program runs; after rollback it is gone.
    assert found["hello"] == "missing"
    found = vm.report(HELLO + "apt-layer rollback\n")
    assert found["hello"] == "Hello, world!"
    assert found["dpkg_hello"] == "install ok installed"
    assert json.loads(found["status"])["booted"]["image"] == "hello"
    found = vm.report(HELLO)
    assert found["hello"] == "missing" and found["release"] == "two"
    conn = vm.journal()
    assert [image for image, _ in booted_events(conn)] == ["one", "hello", "two"]
    assert deployments(conn) == {"current": "two", "previous": "hello"}


# --- 5. a deployment that cannot boot falls back after its tries ---------------------------------

def test_a_deployment_that_does_not_boot_falls_back_after_its_tries(vm: Machine) -> None:
    tries = "apt-layer.deploy=current apt-layer.tries=2"
    assert vm.run("apt-layer deploy broken && say deployed yes\n", append=tries).found["deployed"] == "yes"
    for attempt in (1, 2):
        console = vm.boot("", append=tries).console
        assert "apt-layer: booting broken (current)" in console, attempt
        assert "this init is broken on purpose" in console and "Kernel panic" in console, attempt
        assert vm.file("boot/attempts") == f"broken {attempt}\n".encode()
    found = vm.report(append=tries)
    assert found["release"] == "two"
    status = json.loads(found["status"])
    assert status["booted"]["image"] == "two" and status["booted"]["fallback_from"] == "broken"
    assert status["deployments"]["current"]["image"] == "two"  # rolled back
    assert status["deployments"]["previous"]["image"] == "broken"
    conn = vm.journal()
    *_, (image, data) = booted_events(conn)
    assert (image, data["fallback_from"], data["tries"]) == ("two", "broken", 2)
    last = conn.execute("SELECT kind, subject FROM events WHERE kind IN ('rolled-back', 'deployed') "
                        "ORDER BY seq DESC LIMIT 1").fetchone()
    assert tuple(last) == ("rolled-back", "two")
    assert vm.file("boot/good") == b"two\n" and vm.file("boot/attempts") is None


# --- 4. power cut during a deploy -------------------------------------------------------------------

def test_a_power_cut_during_deploys_boots_one_whole_deployment(vm: Machine) -> None:
    delay = random.uniform(0, 15)  # where in a deploy the power goes (a deploy takes seconds here)

    def cut_power(line: str) -> bool:
        if line.strip() != "VMTEST deploying=2":
            return False
        time.sleep(delay)
        return True

    loop = "i=0\nwhile :; do i=$((i + 1)); say deploying $i; apt-layer deploy three; apt-layer deploy two; done\n"
    cut = vm.boot(SAY + loop, kill_when=cut_power)
    assert cut.killed
    found = vm.report('say recover "$(apt-layer recover --json | python3 -c \'import json, sys; '
                      'print(json.dumps(json.load(sys.stdin)))\')"\n')
    assert found["release"] in ("two", "three")
    status = json.loads(found["status"])
    assert status["booted"]["image"] == found["release"]
    assert status["problems"] == []
    recover = json.loads(found["recover"])
    assert recover["problems"] == [] and recover["actions"] == []  # recover --boot left it clean
    conn = vm.journal()
    current = deployments(conn)["current"]
    assert current in ("two", "three")
    # The link the next boot reads agrees with the journal.
    assert vmguest.read_link(vm.disk, f"{vmguest.STORE}/deploy/current") == f"../images/{current}.composefs"
