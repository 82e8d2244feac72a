"""A Debian 13 guest that boots apt-layer deployments, for the ``vm`` tests.

Built once per version of apt-layer and cached outside the repository in
``/var/cache/apt-layer-tests/`` (or ``$APT_LAYER_TEST_CACHE``):

1. a trixie minbase with systemd, udev, linux-image-amd64 and
   initramfs-tools (and grub2-common, systemd-boot-tools for the boot
   loaders of tests/vmloaders.py), bootstrapped by mmdebstrap into a
   tarball (kept 30 days);
2. apt-layer's Debian package (tools/build-deb.sh) installed into it with
   dpkg, which brings the initramfs hook and boot script in and rebuilds the
   initramfs (``MODULES=list``: the disk's modules and what the hook adds);
   a unit that runs the script the host passes through qemu's
   fw_cfg (``opt/apt-layer/script``) and prints to the serial console;
   units a test boot does not need are masked;
3. a store, made with this checkout's apt-layer outside the tree, with four
   images of that tree: ``one``, ``two`` and ``three`` differ in
   /usr/share/apt-layer-vmtest/release and /etc/apt-layer-vmtest/from-image,
   ``broken`` is ``two`` with an /sbin/init that exits; then ``hello``:
   ``two`` with Debian's hello package layered by ``apt-layer install``;
   ``one`` then ``two`` are deployed, and the store is recovered once (its
   journal's hash chain checked, as a machine's first boot does). The store
   goes to /var/lib/apt-layer;
4. the tree becomes an ext4 disk image with ``mkfs.ext4 -d`` (no mount),
   and the kernel and initramfs are copied out for qemu's direct kernel boot.

The cache key covers every file that goes into it, so a change to apt-layer
builds a new guest (some minutes) and the older one goes.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import resource
import shutil
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("APT_LAYER_TEST_CACHE", "/var/cache/apt-layer-tests"))
SUITE = "trixie"
INCLUDE = ("systemd", "systemd-sysv", "udev", "linux-image-amd64", "initramfs-tools", "python3", "mount",
           "kmod", "e2fsprogs", "util-linux", "grub2-common", "systemd-boot-tools")
MAX_AGE = 30 * 86400
#: what goes into the guest, hashed for its cache key
SOURCES = ("aptlayer", "debian", "tools/build-deb.sh", "pyproject.toml", "tests/vmguest.py")
ENV = "env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8 DEBIAN_FRONTEND=noninteractive"
#: the prefix of the lines the guest's script prints for the host
MARK = "VMTEST "
STORE = "var/lib/apt-layer"

UNIT = textwrap.dedent("""\
    [Unit]
    Description=apt-layer VM test: run the script the host passed through fw_cfg
    After=multi-user.target apt-layer-boot-complete.service

    [Service]
    Type=oneshot
    ExecStart=/bin/sh -c 'modprobe qemu_fw_cfg && exec /bin/sh /sys/firmware/qemu_fw_cfg/by_name/opt/apt-layer/script/raw'
    StandardOutput=tty
    StandardError=tty
    TTYPath=/dev/ttyS0

    [Install]
    WantedBy=multi-user.target
    """)


class Unavailable(Exception):
    """The guest cannot be built here; the message is the skip reason."""


@dataclass(frozen=True)
class Guest:
    disk: Path
    kernel: Path
    initrd: Path

    @property
    def kernel_release(self) -> str:
        """The release of the guest's kernel (``uname -r`` in the guest)."""
        return (self.kernel.parent / "release").read_text().strip()


def _locked(name: str):
    CACHE.mkdir(parents=True, exist_ok=True)
    f = open(CACHE / f"{name}.lock", "w")
    fcntl.flock(f, fcntl.LOCK_EX)
    return f


def _run(argv: list[str], **kw) -> subprocess.CompletedProcess:
    r = subprocess.run(argv, capture_output=True, text=True, **kw)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, argv))} failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    return r


def chroot(root: Path, script: str) -> str:
    """Run ``script`` (sh -e) in a chroot of ``root`` with /proc, /dev and /sys, in a private mount namespace."""
    outer = ('mount -t proc proc "$1/proc" && mount --rbind /dev "$1/dev" && '
             'mount --rbind /sys "$1/sys" && exec chroot "$1" ' + ENV + ' /bin/sh -ec "$2"')
    return _run(["unshare", "--mount", "--propagation", "private", "sh", "-c", outer, "sh", str(root), script]).stdout


def base_tarball() -> Path:
    """The trixie minbase with a kernel and systemd, bootstrapped once (mmdebstrap)."""
    key = hashlib.sha256(",".join(INCLUDE).encode()).hexdigest()[:12]
    tar = CACHE / f"vm-{SUITE}-{key}.tar"
    with _locked("vm-base"):
        if tar.exists() and time.time() - tar.stat().st_mtime < MAX_AGE:
            return tar
        if shutil.which("mmdebstrap") is None:
            raise Unavailable("mmdebstrap is not installed (tools/setup.sh installs it)")
        uri = subprocess.run([str(REPO / "tools/archive-uri.sh")], capture_output=True, text=True)
        if uri.returncode != 0:
            raise Unavailable(uri.stderr.strip())
        part = tar.with_name(tar.name + ".part")
        r = subprocess.run(["mmdebstrap", "--quiet", "--variant=minbase", f"--include={','.join(INCLUDE)}",
                            "--format=tar", SUITE, str(part), uri.stdout.strip()], capture_output=True, text=True)
        if r.returncode != 0:
            part.unlink(missing_ok=True)
            raise Unavailable(f"mmdebstrap cannot bootstrap {SUITE}: {r.stderr.strip().splitlines()[-1:]}")
        part.rename(tar)
        for old in CACHE.glob(f"vm-{SUITE}-*.tar"):
            if old != tar:
                old.unlink()
    return tar


def _source_key(tarball: Path) -> str:
    h = hashlib.sha256(tarball.name.encode())
    files = _run(["git", "-C", str(REPO), "ls-files", "-z", "--cached", "--others", "--exclude-standard",
                  *SOURCES]).stdout.split("\0")
    for f in sorted(f for f in files if f):
        path = REPO / f
        if path.is_file():
            h.update(f.encode() + b"\0" + path.read_bytes())
    return h.hexdigest()[:16]


def guest(wheels: Callable[[], Path]) -> Guest:
    """The guest for this checkout, built first if needed (``wheels``: the vendored wheelhouse)."""
    for tool in ("qemu-system-x86_64", "mkfs.ext4", "debugfs"):
        if shutil.which(tool) is None:
            raise Unavailable(f"{tool} is not installed (tools/setup.sh installs it)")
    if os.geteuid() != 0:
        raise Unavailable("building the guest needs root (chroot, dpkg)")
    tarball = base_tarball()
    final = CACHE / f"vm-guest-{_source_key(tarball)}"
    with _locked("vm-guest"):
        if not (final / "disk.raw").exists():
            work = final.with_name(final.name + ".part")
            shutil.rmtree(work, ignore_errors=True)
            work.mkdir()
            _build(tarball, work, wheels())
            work.rename(final)
            for old in CACHE.glob("vm-guest-*"):
                if old != final and old.is_dir():
                    shutil.rmtree(old)
    return Guest(final / "disk.raw", final / "vmlinuz", final / "initrd.img")


def _apt_layer(store: Path, *args: str) -> str:
    return _run([sys.executable, "-m", "aptlayer", "--quiet", "--root", str(store), *args],
                env={**os.environ, "PYTHONPATH": str(REPO)}).stdout


def _build(tarball: Path, work: Path, wheelhouse: Path) -> None:
    debs = work / "debs"
    _run([str(REPO / "tools/build-deb.sh"), "--no-lintian", str(debs)],
         env={**os.environ, "APT_LAYER_WHEELS": str(wheelhouse)})
    root = work / "root"
    root.mkdir()
    _run(["tar", "-xf", str(tarball), "-C", str(root), "--numeric-owner", "--xattrs", "--xattrs-include=*"])
    # A test boot's initramfs: the disk's modules only, and whatever apt-layer's hook adds (so a
    # boot proves the hook brings erofs, overlay and loop in); smaller and faster under emulation.
    (root / "etc/initramfs-tools/conf.d/apt-layer-vmtest").write_text("MODULES=list\n")
    with open(root / "etc/initramfs-tools/modules", "a") as modules:
        modules.write("virtio_pci\nvirtio_blk\next4\n")
    deb = next(debs.glob("apt-layer_*.deb"))
    shutil.copy(deb, root / "tmp" / deb.name)
    chroot(root, f"dpkg -i /tmp/{deb.name} && rm /tmp/{deb.name}")
    assert (root / "sysroot").is_dir(), "the package makes /sysroot"
    # The guest's own settings, in the tree (so in every image of it).
    (root / "etc/fstab").write_text("# The root is an apt-layer deployment (docs/boot.md): no entry for /.\n")
    (root / "etc/hostname").write_text("apt-layer-vm\n")
    (root / "etc/systemd/system/apt-layer-vmtest.service").write_text(UNIT)
    wants = root / "etc/systemd/system/multi-user.target.wants"
    wants.mkdir(exist_ok=True)
    (wants / "apt-layer-vmtest.service").symlink_to("/etc/systemd/system/apt-layer-vmtest.service")
    # The console is the test's; and what a test boot does not need costs time under emulation.
    for unit in ("serial-getty@.service", "getty@.service", "getty-static.service", "e2scrub_reap.service",
                 "ldconfig.service", "systemd-binfmt.service", "systemd-journal-catalog-update.service",
                 "systemd-update-done.service", "apt-daily.timer", "apt-daily-upgrade.timer",
                 "dpkg-db-backup.timer", "e2scrub_all.timer", "fstrim.timer",
                 "modprobe@drm.service", "modprobe@efi_pstore.service", "modprobe@fuse.service",
                 "modprobe@configfs.service", "sys-kernel-config.mount", "sys-kernel-debug.mount",
                 "sys-kernel-tracing.mount", "sys-fs-fuse-connections.mount", "dev-hugepages.mount",
                 "dev-mqueue.mount", "systemd-random-seed.service", "systemd-journal-flush.service"):
        (root / "etc/systemd/system" / unit).symlink_to("/dev/null")
    # Four images of the tree, made outside it, then the store moves in.
    store = work / "store"
    marker, from_image = root / "usr/share/apt-layer-vmtest/release", root / "etc/apt-layer-vmtest/from-image"
    marker.parent.mkdir(parents=True)
    from_image.parent.mkdir(parents=True)
    (root / "etc/apt-layer-vmtest/admin-edits").write_text("as the image has it\n")
    for name in ("one", "three", "two"):
        marker.write_text(f"{name}\n")
        from_image.write_text(f"{name}\n")
        _apt_layer(store, "image", "create", str(root), name)
    init = root / "usr/sbin/init"
    target = os.readlink(init)
    init.unlink()
    init.write_text("#!/bin/sh\necho 'apt-layer-vmtest: this init is broken on purpose' >&2\nexit 1\n")
    init.chmod(0o755)
    _apt_layer(store, "image", "create", str(root), "broken")
    init.unlink()
    init.symlink_to(target)
    _apt_layer(store, "deploy", "one")
    _apt_layer(store, "deploy", "two")
    # Debian's hello, from the host's apt sources: a real package of the archive, as a user would layer it.
    _apt_layer(store, "install", "--no-deploy", "--from", "two", "--name", "hello", "hello")
    # What the store's first recover does once on a machine (check the whole journal's hash
    # chain), done here rather than again in every test's first boot.
    _apt_layer(store, "recover")
    (root / STORE).rmdir()
    store.rename(root / STORE)
    boot = root / "boot"
    kernel = sorted(boot.glob("vmlinuz-*"))[-1]
    shutil.copy(kernel, work / "vmlinuz")
    (work / "release").write_text(kernel.name.removeprefix("vmlinuz-") + "\n")
    shutil.copy(boot / kernel.name.replace("vmlinuz-", "initrd.img-"), work / "initrd.img")
    used = int(_run(["du", "-sxm", str(root)]).stdout.split()[0])
    _run(["mkfs.ext4", "-q", "-F", "-L", "apt-layer-vm", "-d", str(root), str(work / "disk.raw"), f"{used + 1536}M"])
    shutil.rmtree(root)
    shutil.rmtree(debs)


# --- running it --------------------------------------------------------------------------------------

@dataclass
class Boot:
    """One boot's serial console, and what the script reported (``VMTEST key=value`` lines)."""

    console: str
    killed: bool

    @property
    def found(self) -> dict[str, str]:
        out = {}
        for line in self.console.splitlines():
            line = line.strip("\r")
            if line.startswith(MARK) and "=" in line:
                key, value = line[len(MARK):].split("=", 1)
                out[key] = value
        return out


def boot(disk: Path, guest_: Guest, script: str, log: Path, append: str = "apt-layer.deploy=current",
         kill_when: Callable[[str], bool] | None = None, limit: float = 600,
         firmware: list[str] | None = None) -> Boot:
    """Boot ``disk`` once (TCG, direct kernel boot) running ``script`` as root after multi-user.target.

    The script should end the boot (``poweroff``); ``kill_when(line)``
    kills qemu at the first console line it accepts (a power cut). ``limit``
    only guards against a hung guest. ``firmware``: qemu arguments that
    boot through firmware and a boot loader instead (``append`` unused).
    """
    script_file = log.with_suffix(".sh")
    script_file.write_text("exec >/dev/ttyS0 2>&1\n" + script)
    argv = ["qemu-system-x86_64", "-machine", "q35", "-cpu", "max", "-m", "1024", "-smp", "1", "-nodefaults",
            "-display", "none", "-serial", "stdio", "-no-reboot",
            *(firmware if firmware is not None else
              ["-kernel", str(guest_.kernel), "-initrd", str(guest_.initrd),
               "-append", f"console=ttyS0 root=/dev/vda ro panic=-1 {append}"]),
            "-drive", f"file={disk},format=raw,if=virtio,cache=unsafe",
            "-fw_cfg", f"name=opt/apt-layer/script,file={script_file}"]
    killed = False
    lines = []
    started, cpu_before = time.monotonic(), _children_cpu()
    with open(log, "w") as out:
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + limit
        try:
            for raw in proc.stdout:
                line = raw.decode("utf-8", "replace")
                lines.append(line)
                out.write(line)
                if kill_when is not None and kill_when(line.strip("\r\n")):
                    proc.send_signal(signal.SIGKILL)
                    killed = True
                    break
                if time.monotonic() > deadline:
                    proc.kill()
                    raise TimeoutError(f"the guest did not end in {limit} s; console in {log}")
        finally:
            if proc.poll() is None and not killed:
                try:
                    proc.wait(timeout=max(1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    proc.kill()
            proc.wait()
            # what the boot cost, for whoever tunes the VM tests (no test asserts on time)
            out.write(f"\n# qemu: {time.monotonic() - started:.1f} s wall, "
                      f"{_children_cpu() - cpu_before:.1f} s cpu\n")
    return Boot("".join(lines), killed)


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def copy_disk(guest_: Guest, to: Path) -> Path:
    """A writable copy of the guest's disk (sparse)."""
    _run(["cp", "--sparse=always", str(guest_.disk), str(to)])
    return to


def read_file(disk: Path, path: str) -> bytes | None:
    """A file of the disk image, read with debugfs (no mount); None if absent."""
    r = subprocess.run(["debugfs", "-R", f"cat /{path}", str(disk)], capture_output=True)
    if r.returncode != 0 or b"File not found" in r.stderr:
        return None
    return r.stdout


def read_link(disk: Path, path: str) -> str | None:
    """The target of a symlink on the disk image (debugfs), or None if absent."""
    r = subprocess.run(["debugfs", "-R", f"stat /{path}", str(disk)], capture_output=True, text=True)
    for line in r.stdout.splitlines():
        if "link dest:" in line:
            return line.split("link dest:", 1)[1].strip().strip('"')
    return None


def journal(disk: Path, into: Path) -> sqlite3.Connection:
    """The store's journal on the disk image, copied out (with its WAL, if any), opened read-only."""
    into.mkdir(parents=True, exist_ok=True)
    for name in ("journal.db", "journal.db-wal"):
        data = read_file(disk, f"{STORE}/{name}")
        if data is not None:
            (into / name).write_bytes(data)
    conn = sqlite3.connect(f"file:{into / 'journal.db'}?mode=ro", uri=True)
    conn.row_factory = sqlite3.Row
    return conn
