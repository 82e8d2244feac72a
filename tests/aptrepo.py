"""A local, signed apt repository that the tests build from nothing.

Packages are made with ``dpkg-deb --build``, indexed with
``apt-ftparchive`` and signed with a throwaway ed25519 key generated in a
temporary GNUPGHOME. What the repository holds (prefix ``al-``, so nothing
clashes with a real package):

=================  ==========================================================
al-lib 1.0         a library-like dependency
al-app 1.0, 2.0    depends on al-lib (>= 1.0); 2.0 is the newer version for
                   ``upgrade`` tests (install ``al-app=1.0`` first)
al-broken          depends on al-missing, which no repository has
al-conf            a conffile, /etc/al-conf.conf
al-scripts         postinst creates /var/lib/al-scripts/made-by-postinst,
                   prerm removes it and leaves /var/lib/al-scripts/prerm-ran
al-badpostinst     postinst prints a line and exits 1
al-probe           postinst writes what it can reach to /var/lib/al-probe/report
al-conflicts       Conflicts with a base package (:data:`BASE_PACKAGE`)
al-replaces        ships a file the base has too (:data:`BASE_FILE`) with
                   Replaces on its owner
al-overwrites      ships that same file without Replaces (dpkg refuses)
al-divert          diverts a base file (:data:`DIVERTED`) in preinst and
                   ships its own in its place; postrm removes the diversion
=================  ==========================================================

The base-specific names suit a Debian bookworm minbase (see debian_base.py).
Used by the package tests and by tools/bench_layer.py::

    repo = AptRepo.build(tmp_path / "repo")
    repo.source()          # a sources.Source with Signed-By the repo's key
    repo.deb("al-app")     # the .deb file of a package (newest version)
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

from aptlayer.packages.sources import Source

SUITE = "stable"
COMPONENT = "main"
ARCH = "all"

#: a package of the bookworm minbase that nothing there depends on
BASE_PACKAGE = "tzdata"
#: a regular file that BASE_PACKAGE ships
BASE_FILE = "/usr/share/lintian/overrides/tzdata"
#: a base file (of debianutils) that al-divert diverts
DIVERTED = "/usr/bin/ischroot"


#: al-probe's postinst: what a maintainer script sees of the host, one answer a line
PROBE = """\
mkdir -p /var/lib/al-probe
{
  echo "interfaces: $(grep -c : /proc/net/dev)"
  echo "pid1: $(cat /proc/1/comm)"
  if touch /run/apt-layer/cache/archives/poison 2>/dev/null; then echo "cache: writable"; else echo "cache: read-only"; fi
  if [ -e /usr/bin/mmdebstrap ]; then echo "host root: visible"; else echo "host root: hidden"; fi
  echo "policy-rc.d: $(/usr/sbin/policy-rc.d x start >/dev/null 2>&1 || echo $?)"
} > /var/lib/al-probe/report"""


@dataclass
class Pkg:
    """What goes into one test package."""

    name: str
    version: str = "1.0"
    control: dict[str, str] = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)  # absolute path -> text
    scripts: dict[str, str] = field(default_factory=dict)  # postinst, prerm, ... -> sh body
    conffiles: tuple[str, ...] = ()


def default_packages() -> list[Pkg]:
    return [
        Pkg("al-lib", files={"/usr/share/al-lib/version": "1.0\n"}),
        Pkg("al-app", "1.0", {"Depends": "al-lib (>= 1.0)"},
            files={"/usr/bin/al-app": "#!/bin/sh\necho al-app 1.0\n"}),
        Pkg("al-app", "2.0", {"Depends": "al-lib (>= 1.0)"},
            files={"/usr/bin/al-app": "#!/bin/sh\necho al-app 2.0\n"}),
        Pkg("al-broken", control={"Depends": "al-missing"}),
        Pkg("al-conf", files={"/etc/al-conf.conf": "setting = default\n"},
            conffiles=("/etc/al-conf.conf",)),
        Pkg("al-scripts", files={"/usr/share/al-scripts/README": "scripts\n"}, scripts={
            "postinst": 'if [ "$1" = configure ]; then mkdir -p /var/lib/al-scripts; '
                        'echo "$1 $2" > /var/lib/al-scripts/made-by-postinst; fi',
            "prerm": "rm -f /var/lib/al-scripts/made-by-postinst; "
                     "echo \"$1\" > /var/lib/al-scripts/prerm-ran",
        }),
        Pkg("al-badpostinst", files={"/usr/share/al-badpostinst/README": "bad\n"}, scripts={
            "postinst": 'echo "al-badpostinst: refusing to configure" >&2; exit 1',
        }),
        Pkg("al-probe", files={"/usr/share/al-probe/README": "probe\n"}, scripts={"postinst": PROBE}),
        Pkg("al-conflicts", control={"Conflicts": BASE_PACKAGE},
            files={"/usr/share/al-conflicts/README": "conflicts\n"}),
        Pkg("al-replaces", control={"Replaces": BASE_PACKAGE},
            files={BASE_FILE: "al-replaces took this file over\n"}),
        Pkg("al-overwrites", files={BASE_FILE: "al-overwrites clobbers this file\n"}),
        Pkg("al-divert", files={DIVERTED: "#!/bin/sh\necho diverted by al-divert\n"}, scripts={
            "preinst": f'if [ "$1" = install ]; then dpkg-divert --package al-divert --add --rename '
                       f'--divert {DIVERTED}.distrib {DIVERTED}; fi',
            "postrm": f'if [ "$1" = remove ]; then dpkg-divert --package al-divert --remove --rename '
                      f'--divert {DIVERTED}.distrib {DIVERTED}; fi',
        }),
    ]


def build_deb(pkg: Pkg, out_dir: Path) -> Path:
    """``dpkg-deb --build`` of *pkg*; returns the .deb."""
    with tempfile.TemporaryDirectory() as tmp:
        tree = Path(tmp) / "tree"
        debian = tree / "DEBIAN"
        debian.mkdir(parents=True)
        control = {
            "Package": pkg.name, "Version": pkg.version, "Architecture": ARCH,
            "Maintainer": "apt-layer tests <tests@apt-layer.invalid>",
            "Priority": "optional", "Section": "misc",
            **pkg.control,
            "Description": f"apt-layer test package {pkg.name}",
        }
        (debian / "control").write_text("".join(f"{k}: {v}\n" for k, v in control.items()))
        if pkg.conffiles:
            (debian / "conffiles").write_text("".join(f"{c}\n" for c in pkg.conffiles))
        for script, body in pkg.scripts.items():
            path = debian / script
            path.write_text(f"#!/bin/sh\nset -e\n{body}\n")
            path.chmod(0o755)
        for name, text in pkg.files.items():
            path = tree / name.lstrip("/")
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
            path.chmod(0o755 if "/bin/" in name else 0o644)
        deb = out_dir / f"{pkg.name}_{pkg.version}_{ARCH}.deb"
        subprocess.run(["dpkg-deb", "--root-owner-group", "-Zgzip", "--build", str(tree), str(deb)],
                       check=True, stdout=subprocess.DEVNULL)
    return deb


def _gpg(home: Path, *args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(["gpg", "--homedir", str(home), "--batch", "--quiet", *args],
                          check=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kw)


@dataclass
class AptRepo:
    """A built repository: ``dists/stable/{InRelease,Release,Release.gpg}`` and ``pool/``."""

    path: Path
    keyring: Path | None
    debs: dict[str, list[Path]]

    @property
    def uri(self) -> str:
        return f"file://{self.path}"

    def source(self, *, trusted: bool = False, signed: bool = True) -> Source:
        """An apt source for this repository (Signed-By its key unless *signed* is false)."""
        signed_by = (str(self.keyring),) if signed and self.keyring else ()
        return Source(uris=(self.uri,), suites=(SUITE,), components=(COMPONENT,),
                      signed_by=signed_by, trusted=trusted, origin=f"test repo {self.path}")

    def deb(self, name: str) -> Path:
        """The .deb of the newest version of *name*."""
        return self.debs[name][-1]

    @classmethod
    def build(cls, path: Path, packages: list[Pkg] | None = None, *, sign: bool = True) -> "AptRepo":
        """Build the repository at *path* (created; must not exist)."""
        for tool in ("dpkg-deb", "apt-ftparchive", "gpg"):
            if shutil.which(tool) is None:
                raise RuntimeError(f"{tool} is not installed (tools/setup.sh installs it)")
        path.mkdir(parents=True)
        pool = path / "pool" / COMPONENT
        pool.mkdir(parents=True)
        debs: dict[str, list[Path]] = {}
        for pkg in packages if packages is not None else default_packages():
            debs.setdefault(pkg.name, []).append(build_deb(pkg, pool))
        binary = path / "dists" / SUITE / COMPONENT / f"binary-{ARCH}"
        binary.mkdir(parents=True)
        index = subprocess.run(["apt-ftparchive", "packages", "pool"], cwd=path, check=True,
                               stdout=subprocess.PIPE).stdout
        (binary / "Packages").write_bytes(index)
        subprocess.run(["gzip", "-9nk", str(binary / "Packages")], check=True)
        release = subprocess.run(
            ["apt-ftparchive",
             "-o", f"APT::FTPArchive::Release::Suite={SUITE}",
             "-o", f"APT::FTPArchive::Release::Codename={SUITE}",
             "-o", f"APT::FTPArchive::Release::Components={COMPONENT}",
             "-o", f"APT::FTPArchive::Release::Architectures={ARCH}",
             "-o", "APT::FTPArchive::Release::Origin=apt-layer-tests",
             "release", "."],
            cwd=path / "dists" / SUITE, check=True, stdout=subprocess.PIPE).stdout
        dist = path / "dists" / SUITE
        (dist / "Release").write_bytes(release)
        keyring = None
        if sign:
            keyring = path / "key.gpg"
            with tempfile.TemporaryDirectory(prefix="apt-layer-gpg-") as home:
                home_path = Path(home)
                os.chmod(home_path, 0o700)
                _gpg(home_path, "--passphrase", "", "--quick-gen-key",
                     "apt-layer tests <tests@apt-layer.invalid>", "ed25519", "sign", "never")
                _gpg(home_path, "--yes", "--output", str(keyring), "--export")
                _gpg(home_path, "--yes", "--clearsign", "--output", str(dist / "InRelease"),
                     str(dist / "Release"))
                _gpg(home_path, "--yes", "--detach-sign", "--armor", "--output",
                     str(dist / "Release.gpg"), str(dist / "Release"))
                subprocess.run(["gpgconf", "--homedir", str(home_path), "--kill", "all"],
                               check=False, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        # apt fetches as the _apt user where it can: let it read the files
        for p in [path, *path.rglob("*")]:
            p.chmod(0o755 if p.is_dir() else 0o644)
        return cls(path=path, keyring=keyring, debs=debs)


def write_hostile_deb(path: Path, members: list[tuple[str, str]]) -> Path:
    """A .deb whose data.tar holds *members* as given: (name, kind) with kind
    ``file``, ``chardev`` or ``hardlink:TARGET``; for the refusal tests.
    ``dpkg-deb --build`` never writes such members, so the ar and tar are
    put together here.
    """
    import io
    import tarfile

    def tar(entries: list[tarfile.TarInfo], data: dict[str, bytes]) -> bytes:
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w:gz", format=tarfile.GNU_FORMAT) as t:
            for info in entries:
                payload = data.get(info.name)
                t.addfile(info, io.BytesIO(payload) if payload is not None else None)
        return buf.getvalue()

    control = textwrap.dedent("""\
        Package: al-hostile
        Version: 1.0
        Architecture: all
        Maintainer: apt-layer tests <tests@apt-layer.invalid>
        Description: a package whose data escapes its root
        """).encode()
    cinfo = tarfile.TarInfo("./control")
    cinfo.size = len(control)
    entries, data = [], {}
    for name, kind in members:
        info = tarfile.TarInfo(name)
        if kind == "chardev":
            info.type, info.devmajor, info.devminor = tarfile.CHRTYPE, 1, 3
        elif kind.startswith("hardlink:"):
            info.type, info.linkname = tarfile.LNKTYPE, kind.split(":", 1)[1]
        else:
            data[name] = b"hostile\n"
            info.size = len(data[name])
        entries.append(info)
    parts = [(b"debian-binary", b"2.0\n"),
             (b"control.tar.gz", tar([cinfo], {"./control": control})),
             (b"data.tar.gz", tar(entries, data))]
    out = bytearray(b"!<arch>\n")
    for name, body in parts:
        out += b"%-16s%-12d%-6d%-6d%-8s%-10d`\n" % (name, 0, 0, 0, b"100644", len(body))
        out += body + (b"\n" if len(body) % 2 else b"")
    path.write_bytes(bytes(out))
    return path
