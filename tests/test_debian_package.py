"""The Debian packages: built once per run with tools/build-deb.sh, checked by
lintian, installed with apt into fresh Debian 12 (bookworm) and 13 (trixie)
minbase roots and used there in a chroot (the kernel is this host's):
``apt-layer image create``, ``mkcomposefs``, ``composefs-info`` and
``mount -t composefs`` through mount(8), each mount compared with its source
tree; then ``apt-get purge`` must leave nothing behind but the store.

The roots are bootstrapped by mmdebstrap from the archive this host's apt
uses and cached in /var/cache/apt-layer-tests (or APT_LAYER_TEST_CACHE),
with the wheels the build vendors. Needs root, mmdebstrap and, the first
time, the archive and PyPI; skips with the reason otherwise. The mounts need
erofs and overlayfs. Everything mounted happens in a private mount namespace.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import REPO

from aptlayer.composefs.upstream import find_tool

pytestmark = pytest.mark.deb

CACHE = Path(os.environ.get("APT_LAYER_TEST_CACHE", "/var/cache/apt-layer-tests"))
#: release -> its python3 version
RELEASES = {"bookworm": "3.11", "trixie": "3.13"}
#: what the cached roots carry beyond minbase: what installing needs, so apt downloads nothing
INCLUDE = "python3,mount"
#: a cached root older than this is bootstrapped again (security updates, new point releases)
MAX_AGE = 30 * 86400
ENV = "env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8 DEBIAN_FRONTEND=noninteractive"

#: a tree listing (run by the root's own python3): every entry with its type,
#: mode, owner, mtime, content hash or link target, and xattrs (overlayfs's own hidden)
LIST_TREE = textwrap.dedent(r"""
    import hashlib, os, stat, sys
    top = sys.argv[1]
    for dirpath, dirs, files in os.walk(top):
        dirs.sort()
        names = sorted(dirs + files) + ([""] if dirpath == top else [])
        for name in names:
            p = os.path.join(dirpath, name) if name else dirpath
            st = os.lstat(p)
            if stat.S_ISREG(st.st_mode):
                with open(p, "rb") as f:
                    what = "%d %s" % (st.st_size, hashlib.sha256(f.read()).hexdigest())
            elif stat.S_ISLNK(st.st_mode):
                what = os.readlink(p)
            elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
                what = str(st.st_rdev)
            else:
                what = ""
            xattrs = sorted((k, os.getxattr(p, k, follow_symlinks=False).hex())
                            for k in os.listxattr(p, follow_symlinks=False)
                            if not k.startswith(("trusted.overlay.", "user.overlay.")))
            print(os.path.relpath(p, top), oct(st.st_mode), st.st_uid, st.st_gid,
                  st.st_mtime_ns, what, xattrs)
""")


# --- helpers ------------------------------------------------------------------------------------

def _locked(name: str):
    CACHE.mkdir(parents=True, exist_ok=True)
    f = open(CACHE / f"{name}.lock", "w")
    fcntl.flock(f, fcntl.LOCK_EX)
    return f


def _wheelhouse() -> Path:
    """The vendored dependencies' wheels, fetched once per set of requirements."""
    key = hashlib.sha256((REPO / "pyproject.toml").read_bytes() + (REPO / "debian/wheels.py").read_bytes())
    house = CACHE / f"wheels-{key.hexdigest()[:16]}"
    with _locked("wheels"):
        if not house.is_dir():
            part = house.with_name(house.name + ".part")
            shutil.rmtree(part, ignore_errors=True)
            r = subprocess.run([sys.executable, str(REPO / "debian/wheels.py"), "fetch", str(part)],
                               capture_output=True, text=True)
            if r.returncode != 0:
                err = [ln for ln in r.stderr.splitlines() if not ln.startswith("WARNING: Location")]
                pytest.skip(f"cannot fetch the wheels to vendor (PyPI unreachable?): {err[-1:]}")
            part.rename(house)
    return house


def _bootstrap(release: str) -> Path:
    """A minbase root of ``release`` as a tarball, bootstrapped once and cached."""
    tar = CACHE / f"{release}-minbase.tar"
    with _locked(release):
        if tar.exists() and time.time() - tar.stat().st_mtime < MAX_AGE:
            return tar
        if shutil.which("mmdebstrap") is None:
            pytest.skip("mmdebstrap is not installed")
        uri = subprocess.run([str(REPO / "tools/archive-uri.sh")], capture_output=True, text=True)
        if uri.returncode != 0:
            pytest.skip(uri.stderr.strip())
        part = tar.with_name(tar.name + ".part")
        r = subprocess.run(["mmdebstrap", "--quiet", "--variant=minbase", f"--include={INCLUDE}",
                            "--skip=cleanup/apt/lists", "--format=tar", release, str(part),
                            uri.stdout.strip()], capture_output=True, text=True)
        if r.returncode != 0:
            part.unlink(missing_ok=True)
            pytest.skip(f"mmdebstrap cannot bootstrap {release} from {uri.stdout.strip()}: "
                        f"{r.stderr.strip().splitlines()[-1:]}")
        part.rename(tar)
    return tar


def chroot(root: Path, script: str) -> subprocess.CompletedProcess:
    """Run ``script`` (sh -e) in a chroot of ``root`` with /proc, /dev and /sys, in a
    private mount namespace: whatever it mounts goes away with it."""
    outer = ('mount -t proc proc "$1/proc" && mount --rbind /dev "$1/dev" && '
             'mount --rbind /sys "$1/sys" && exec chroot "$1" ' + ENV + ' /bin/sh -ec "$2"')
    return subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", outer, "sh",
                           str(root), script], capture_output=True, text=True)


def ok(root: Path, script: str) -> str:
    r = chroot(root, script)
    assert r.returncode == 0, f"{script}\nstdout: {r.stdout}\nstderr: {r.stderr}"
    return r.stdout


def _files(root: Path) -> set[str]:
    """Every path in the root but the kernel's file systems and the tests' own places."""
    skip = {"proc", "sys", "dev", "srv", "mnt", "tmp", "run"}
    out = set()
    for dirpath, dirs, files in os.walk(root):
        if dirpath == str(root):
            dirs[:] = [d for d in dirs if d not in skip]
        for name in dirs + files:
            out.add("/" + os.path.relpath(os.path.join(dirpath, name), root))
    return out


def _kernel_mounts() -> str | None:
    with open("/proc/filesystems") as f:
        have = {line.split()[-1] for line in f if line.strip()}
    missing = [fs for fs in ("erofs", "overlay") if fs not in have]
    return f"kernel lacks {', '.join(missing)}" if missing else None


# --- fixtures -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def debs(tmp_path_factory) -> dict[str, Path]:
    """The packages, built once per run from this checkout (outside the repository)."""
    if os.geteuid() != 0:
        pytest.skip("needs root (installs the build dependencies, chroots)")
    out = tmp_path_factory.mktemp("debs")
    env = {**os.environ, "APT_LAYER_WHEELS": str(_wheelhouse())}
    r = subprocess.run([str(REPO / "tools/build-deb.sh"), "--no-lintian", str(out)],
                       capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    found = {p.name.split("_")[0]: p for p in out.glob("*.deb")}
    assert set(found) == {"apt-layer", "apt-layer-composefs-tools"}
    return found


@pytest.fixture(scope="module", params=sorted(RELEASES))
def installed(request, debs, tmp_path_factory) -> Iterator[tuple[str, Path, set[str], str]]:
    """A fresh root of each release with both packages installed by apt:
    (release, root, its files before, apt's output)."""
    release = request.param
    tar = _bootstrap(release)
    root = tmp_path_factory.mktemp(f"root-{release}")
    subprocess.run(["tar", "-C", str(root), "-xf", str(tar)], check=True)
    before = _files(root)
    (root / "tmp/debs").mkdir()
    for deb in debs.values():
        shutil.copy(deb, root / "tmp/debs")
    out = ok(root, "apt-get install -y -q --no-install-recommends "
                   "/tmp/debs/apt-layer_*.deb /tmp/debs/apt-layer-composefs-tools_*.deb 2>&1")
    # The tree the tests build images of: real files, setuid binaries, symlinks,
    # a FIFO, an empty file, a device node and user xattrs.
    ok(root, "mkdir -p /srv/rootfs && cp -a /etc /usr/share/doc /usr/bin /srv/rootfs/ && "
             "mkfifo /srv/rootfs/fifo && : > /srv/rootfs/empty && mknod /srv/rootfs/null c 1 3 && "
             "python3 -c 'import os; os.setxattr(\"/srv/rootfs/empty\", \"user.note\", b\"hello\")'")
    yield release, root, before, out
    shutil.rmtree(root)  # some 300 MB; nothing is mounted there (each chroot had its own namespace)


@pytest.fixture
def mounts(installed) -> None:
    if reason := _kernel_mounts():
        pytest.skip(reason)


# --- the build ----------------------------------------------------------------------------------

def test_lintian_is_clean(debs):
    """No error, no warning (justified ones are overridden, and README.source says why)."""
    changes = next(debs["apt-layer"].parent.glob("*.changes"))
    r = subprocess.run(["lintian", "--fail-on", "error,warning", str(changes)], capture_output=True, text=True)
    assert r.returncode == 0 and not re.search(r"^[EW]: ", r.stdout, re.M), r.stdout + r.stderr


def test_packages_say_what_they_are(debs):
    def field(deb: Path, name: str) -> str:
        return subprocess.run(["dpkg-deb", "-f", str(deb), name], capture_output=True, text=True,
                              check=True).stdout.strip()

    tools = debs["apt-layer-composefs-tools"]
    assert field(tools, "Conflicts") == "composefs"
    assert field(tools, "Replaces") == "composefs"
    assert field(tools, "Provides") == "composefs (= 1.0.8)"
    depends = field(debs["apt-layer"], "Depends")
    assert "python3 (>= 3.11)" in depends and "python3 (<< 3.14)" in depends
    assert "python3-" not in depends  # the vendored libraries are not asked of Debian
    listing = subprocess.run(["dpkg-deb", "-c", str(debs["apt-layer"])], capture_output=True, text=True,
                             check=True).stdout
    for version in ("3.11", "3.12", "3.13"):
        assert re.search(rf"usr/lib/apt-layer/vendor/python{version}/blake3/\S+\.so", listing), version
    assert "usr/lib/apt-layer/vendor/common/sqlite_utils/__init__.py" in listing
    assert "usr/lib/apt-layer/vendor/common/pip/" not in listing


# --- installed ----------------------------------------------------------------------------------

def test_installs_the_commands_units_docs_and_config(installed):
    release, root, _, _ = installed
    assert ok(root, "apt-layer --version") == "apt-layer, version 0.1.0\n"
    assert ok(root, "python3 -c 'import sys; print(\"%d.%d\" % sys.version_info[:2])'").strip() == RELEASES[release]
    for path in ("usr/bin/apt-layer", "usr/bin/mkcomposefs", "usr/bin/composefs-info",
                 "usr/sbin/mount.composefs", "etc/apt-layer/config.toml",
                 "usr/share/bash-completion/completions/apt-layer", "usr/share/man/man8/apt-layer.8.gz",
                 "usr/share/man/man8/apt-layer-image-create.8.gz", "usr/share/man/man1/mkcomposefs.1.gz",
                 "usr/share/man/man8/mount.composefs.8.gz"):
        assert (root / path).exists(), path
    conffiles = ok(root, "cat /var/lib/dpkg/info/apt-layer.conffiles")
    assert "/etc/apt-layer/config.toml" in conffiles.split()
    assert ok(root, "stat -c '%U %G %a' /var/lib/apt-layer") == "root root 700\n"
    # recover runs at boot (enabled, not started on installation); watch is opt-in.
    assert (root / "etc/systemd/system/sysinit.target.wants/apt-layer-recover.service").is_symlink()
    assert not (root / "etc/systemd/system/multi-user.target.wants/apt-layer-watch.service").exists()
    # py3compile made the bytecode at installation, for this release's python.
    tag = "cpython-" + RELEASES[release].replace(".", "")
    assert list((root / "usr/lib/apt-layer/aptlayer/cli/__pycache__").glob(f"__init__.{tag}.pyc"))


def test_apt_stays_apts_and_booted_apt_waits_for_the_initramfs(installed):
    """The package covers neither apt nor apt-get (no file, no diversion): on a machine not
    booted from a deployment they are apt's own; booted-apt is only in the private directory,
    for the boot script to bind over them (tests/test_booted_apt.py, tests/test_vm.py)."""
    _, root, _, _ = installed
    owners = ok(root, "dpkg -S /usr/bin/apt-get /usr/bin/apt").split()
    assert owners == ["apt:", "/usr/bin/apt-get", "apt:", "/usr/bin/apt"]
    assert "apt-layer" not in ok(root, "dpkg-divert --list")
    assert ok(root, "stat -c '%a' /usr/lib/apt-layer/booted-apt") == "755\n"
    assert "apt is already the newest version" in ok(root, "apt-get -s install apt 2>&1")  # apt, as always


def test_apt_layer_image_create(installed):
    _, root, _, _ = installed
    ok(root, "apt-layer image create /srv/rootfs base >/dev/null")
    info = json.loads(ok(root, "apt-layer image info base --json"))
    digest = ok(root, "mkcomposefs --print-digest-only /srv/rootfs").strip()
    assert info["digest"] == digest
    oracle = find_tool("mkcomposefs")
    if oracle is not None:  # upstream's mkcomposefs, on this host, gives the same image
        theirs = subprocess.run([oracle, "--print-digest-only", str(root / "srv/rootfs")], capture_output=True,
                                text=True, check=True).stdout.strip()
        assert theirs == digest
    assert ok(root, "apt-layer journal verify").startswith("journal ok: ")
    assert ok(root, "apt-layer audit --json 'SELECT name FROM v_images'") == '[\n  {\n    "name": "base"\n  }\n]\n'


def test_quick_example_from_the_composefs_documentation(installed, mounts):
    """composefs's README quick example, verbatim but for the paths (Debian 12 has no composefs)."""
    _, root, _, _ = installed
    out = ok(root, f"""
        mkdir -p /mnt/composefs /srv/quick && cd /srv/quick
        mkcomposefs /srv/rootfs myimage.composefs --digest-store=/srv/quick/objects
        mount -t composefs -o basedir=/srv/quick/objects myimage.composefs /mnt/composefs
        python3 -c '{LIST_TREE}' /mnt/composefs > /srv/quick/mounted.list
        composefs-info ls myimage.composefs
        umount /mnt/composefs
        python3 -c '{LIST_TREE}' /srv/rootfs > /srv/quick/source.list
    """)
    assert "/etc/os-release\t-> ../usr/lib/os-release\n" in out and "/bin/sh\t-> dash\n" in out
    mounted = (root / "srv/quick/mounted.list").read_text()
    assert mounted == (root / "srv/quick/source.list").read_text()
    assert len(mounted.splitlines()) > 500
    assert not ok(root, "grep ' /mnt/composefs ' /proc/self/mountinfo || true")


def test_composefs_info_commands(installed):
    _, root, _, _ = installed
    ok(root, "mkdir -p /srv/info && mkcomposefs --digest-store=/srv/info/objects /srv/rootfs /srv/info/img.cfs")
    objects = ok(root, "composefs-info objects /srv/info/img.cfs").split()
    stored = ok(root, "cd /srv/info/objects && find . -type f | cut -c3- | sort").split()
    assert objects == sorted(objects) and set(objects) == set(stored) and len(objects) > 100
    assert ok(root, "composefs-info --basedir=/srv/info/objects missing-objects /srv/info/img.cfs") == ""
    ok(root, "mkdir -p /srv/info/none")
    assert ok(root, "composefs-info --basedir=/srv/info/none missing-objects /srv/info/img.cfs").split() == objects
    listing = ok(root, "composefs-info ls /srv/info/img.cfs")
    assert "/bin/sh\t-> dash\n" in listing and "/etc/debian_version\n" in listing
    dump = ok(root, "composefs-info dump /srv/info/img.cfs")
    assert dump.startswith("/ 4096 40755 ")
    oracle = find_tool("composefs-info")
    if oracle is not None:  # the upstream tool, on this host, reads the image the same way
        for command, mine in (("ls", listing), ("dump", dump), ("objects", "\n".join(objects) + "\n")):
            theirs = subprocess.run([oracle, command, str(root / "srv/info/img.cfs")], capture_output=True,
                                    text=True, check=True).stdout
            assert theirs == mine, command
    # The dump is the image: mkcomposefs --from-file of it gives the same bytes.
    ok(root, "composefs-info dump /srv/info/img.cfs | mkcomposefs --from-file - /srv/info/again.cfs && "
             "cmp /srv/info/img.cfs /srv/info/again.cfs")
    # Upstream's exit code for a bad image.
    r = chroot(root, "composefs-info ls /etc/hostname")
    assert r.returncode == 1 and "Failed to load" in r.stderr


def test_mount_options_through_mount8(installed, mounts):
    _, root, _, _ = installed
    ok(root, f"""
        mkdir -p /srv/opt /mnt/o && cd /srv/opt
        mkcomposefs --digest-store=/srv/opt/a /srv/rootfs img.cfs
        # two object stores: half the objects in each
        mkdir b && for d in a/[0-7]*; do mv "$d" b/; done
        python3 -c '{LIST_TREE}' /srv/rootfs > source.list
        mount -t composefs -o basedir=/srv/opt/a:/srv/opt/b img.cfs /mnt/o
        python3 -c '{LIST_TREE}' /mnt/o > two.list
        umount /mnt/o
        mkdir -p up work
        mount -v -t composefs -o basedir=/srv/opt/b:/srv/opt/a,upperdir=/srv/opt/up,workdir=/srv/opt/work img.cfs /mnt/o > verbose.out
        echo written > /mnt/o/new-file
        umount /mnt/o
        mount -r -t composefs -o basedir=/srv/opt/a:/srv/opt/b img.cfs /mnt/o
        ! touch /mnt/o/x 2>/dev/null
        umount /mnt/o
        echo "/srv/opt/img.cfs /mnt/o composefs basedir=/srv/opt/a:/srv/opt/b,nofail,noauto 0 0" >> /etc/fstab
        mount /mnt/o
        test -s /mnt/o/etc/debian_version
        umount /mnt/o
        sed -i '/composefs/d' /etc/fstab
    """)
    opt = root / "srv/opt"
    assert (opt / "two.list").read_text() == (opt / "source.list").read_text()
    assert (opt / "verbose.out").read_text() == "mount.composefs: /srv/opt/img.cfs mounted on /mnt/o\n"
    assert (opt / "up/new-file").read_text() == "written\n"


def test_digest_and_verity_through_mount8(installed, mounts):
    """digest= and verity reach the helper through mount(8); they need fs-verity, and where
    the kernel has none (as here) the mount fails with that reason, leaving nothing mounted."""
    from aptlayer.linux.verity import kernel_lacks_fsverity

    _, root, _, _ = installed
    ok(root, "mkdir -p /srv/v /mnt/v && mkcomposefs --digest-store=/srv/v/o /srv/rootfs/etc /srv/v/img.cfs")
    digest = ok(root, "mkcomposefs --print-digest-only /srv/rootfs/etc").strip()
    bad = chroot(root, "mount -t composefs -o basedir=/srv/v/o,digest=00 /srv/v/img.cfs /mnt/v")
    assert bad.returncode != 0 and "mount.composefs: Failed to mount composefs /srv/v/img.cfs:" in bad.stderr
    if not kernel_lacks_fsverity():
        pytest.skip("this kernel has fs-verity: mounting with digest= and verity needs a verity-enabled store")
    r = chroot(root, f"mount -t composefs -o basedir=/srv/v/o,digest={digest} /srv/v/img.cfs /mnt/v")
    assert r.returncode != 0
    assert r.stderr.startswith("mount.composefs: Failed to mount composefs /srv/v/img.cfs: cannot check "
                               "digest= of /srv/v/img.cfs: this kernel was built without fs-verity"), r.stderr
    r = chroot(root, "mount -t composefs -o basedir=/srv/v/o,verity /srv/v/img.cfs /mnt/v")
    assert r.returncode != 0 and "verity=require: basedir /srv/v/o cannot have fs-verity" in r.stderr, r.stderr
    # tryverity mounts anyway, and the tree is there.
    assert ok(root, "mount -t composefs -o basedir=/srv/v/o,tryverity /srv/v/img.cfs /mnt/v && "
                    "cat /mnt/v/debian_version && umount /mnt/v") == (root / "etc/debian_version").read_text()


@pytest.fixture
def userns() -> Iterator[int]:
    """A user namespace mapping 0..65535 to 100000.., held by a sleeping child: its pid.
    Made out here: the kernel lets no chrooted process create one."""
    child = subprocess.Popen(["unshare", "--user", "sleep", "600"])
    try:
        while os.readlink(f"/proc/{child.pid}/ns/user") == os.readlink("/proc/self/ns/user"):
            time.sleep(0.01)
        for name in ("uid_map", "gid_map"):
            Path(f"/proc/{child.pid}/{name}").write_text("0 100000 65536\n")
        yield child.pid
    finally:
        child.kill()
        child.wait()


def test_idmap_mount_through_mount8(installed, mounts, userns):
    _, root, _, _ = installed
    out = ok(root, f"""
        mkdir -p /srv/id /mnt/id
        mkcomposefs --digest-store=/srv/id/o /srv/rootfs/etc /srv/id/img.cfs
        mount -t composefs -o basedir=/srv/id/o,idmap=/proc/{userns}/ns/user /srv/id/img.cfs /mnt/id
        stat -c '%u %g' /mnt/id/debian_version
        umount /mnt/id
    """)
    assert out == "100000 100000\n"


def test_auto_backend_does_not_take_the_drop_ins_for_upstream(installed, mounts):
    """/usr/sbin/mount.composefs is apt-layer itself here: `image mount` mounts natively."""
    _, root, _, _ = installed
    ok(root, "apt-layer image create /srv/rootfs/etc etc-image >/dev/null && mkdir -p /mnt/e && "
             "apt-layer image mount etc-image /mnt/e && test -s /mnt/e/debian_version && apt-layer image unmount /mnt/e")
    events = json.loads(ok(root, "apt-layer log --kind mounted --image etc-image --json"))
    assert [e["data"]["backend"] for e in events] == ["python"]


def test_purge_leaves_only_the_store_and_says_so(installed):
    _, root, before, _ = installed
    ok(root, "apt-layer image list >/dev/null")  # the store has a journal: it is data
    out = chroot(root, "apt-get purge -y -q apt-layer apt-layer-composefs-tools 2>&1")
    assert out.returncode == 0, out.stdout
    assert "the image store /var/lib/apt-layer is kept" in out.stdout
    left = {p for p in _files(root) - before
            if not p.startswith(("/var/lib/apt-layer", "/var/lib/dpkg/", "/var/log/", "/var/cache/",
                                 "/var/lib/apt/"))}
    assert left == set()
    assert (root / "var/lib/apt-layer/journal.db").exists()
    dpkg_left = {p for p in _files(root) - before if p.startswith("/var/lib/dpkg/info/apt-layer")}
    assert dpkg_left == set()
