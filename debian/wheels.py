#!/usr/bin/python3
"""apt-layer's Python dependencies, vendored into /usr/lib/apt-layer (see README.source).

    debian/wheels.py fetch WHEELHOUSE        (network: PyPI, through pip download)
    debian/wheels.py install WHEELHOUSE DEST (offline: what debian/rules runs)

``fetch`` resolves pyproject.toml's dependencies once per Python version in
PYTHONS, as binary wheels for this machine's architecture, into
WHEELHOUSE/pythonX.Y/. ``install`` unpacks them: a wheel resolved alike for
every version goes once into DEST/common, the others (compiled modules, or a
release picked for one version only) into DEST/pythonX.Y, which the launcher
puts on sys.path for the running interpreter. Console scripts and other
``.data`` payloads are left out: only the libraries are used.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

#: the Python versions the package runs on: Debian 12 has 3.11, Debian 13 3.13,
#: Ubuntu 24.04 3.12 (debian/control's python3 range must match)
PYTHONS = ("3.11", "3.12", "3.13")
#: oldest glibc of those systems (Debian 12: 2.36); manylinux wheels up to it fit
GLIBC_MINOR = 36
#: dependencies of dependencies that apt-layer never runs: sqlite-utils needs pip
#: only for its own ``sqlite-utils install`` command; python-dateutil falls back to
#: tzdata's copy of the time zone database, which Debian has in /usr/share/zoneinfo
EXCLUDED = {"pip", "tzdata"}
WHEEL_ARCH = {"amd64": "x86_64", "arm64": "aarch64", "i386": "i686", "armhf": "armv7l",
              "ppc64el": "ppc64le", "s390x": "s390x", "riscv64": "riscv64"}

ROOT = Path(__file__).resolve().parent.parent


def requirements() -> list[str]:
    with open(ROOT / "pyproject.toml", "rb") as f:
        return tomllib.load(f)["project"]["dependencies"]


def platforms() -> list[str]:
    arch = subprocess.run(["dpkg", "--print-architecture"], capture_output=True, text=True,
                          check=True).stdout.strip()
    machine = WHEEL_ARCH[arch]
    tags = [f"manylinux_2_{minor}_{machine}" for minor in range(17, GLIBC_MINOR + 1)]
    return [f"manylinux2014_{machine}", *tags]


def fetch(wheelhouse: str) -> int:
    for version in PYTHONS:
        dest = Path(wheelhouse) / f"python{version}"
        dest.mkdir(parents=True, exist_ok=True)
        abi = "cp" + version.replace(".", "")
        cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check",
               "--only-binary=:all:", "--implementation", "cp", "--python-version", version,
               "--abi", abi, "--abi", "abi3", "--abi", "none", "--dest", str(dest)]
        for tag in platforms():
            cmd += ["--platform", tag]
        subprocess.run(cmd + requirements(), check=True)
        for wheel in dest.glob("*.whl"):
            if project(wheel) in EXCLUDED:
                wheel.unlink()
    return 0


def project(wheel: Path) -> str:
    return wheel.name.split("-", 1)[0].lower().replace("_", "-")


def unpack(wheel: Path, dest: Path) -> None:
    """Install a wheel's libraries into ``dest`` (what pip --target does, minus scripts)."""
    with zipfile.ZipFile(wheel) as z:
        for info in z.infolist():
            parts = info.filename.split("/")
            if parts[0].endswith(".data"):
                if len(parts) < 3 or parts[1] not in ("purelib", "platlib") or info.is_dir():
                    continue
                parts = parts[2:]
            target = dest.joinpath(*parts)
            if info.is_dir():
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            with z.open(info) as src, open(target, "wb") as out:
                shutil.copyfileobj(src, out)
            executable = target.suffix == ".so" or (info.external_attr >> 16) & 0o111
            os.chmod(target, 0o755 if executable else 0o644)  # a script the wheel ships stays executable


def install(wheelhouse: str, dest: str) -> int:
    sets = {v: {w.name for w in (Path(wheelhouse) / f"python{v}").glob("*.whl")} for v in PYTHONS}
    if not all(sets.values()):
        sys.exit(f"wheels.py: no wheels for some of {', '.join(PYTHONS)} in {wheelhouse}: "
                 "run tools/build-deb.sh, or debian/wheels.py fetch first")
    common = set.intersection(*sets.values())
    for name in sorted(common):
        unpack(Path(wheelhouse) / f"python{PYTHONS[0]}" / name, Path(dest) / "common")
    for version, names in sets.items():
        for name in sorted(names - common):
            unpack(Path(wheelhouse) / f"python{version}" / name, Path(dest) / f"python{version}")
        (Path(dest) / f"python{version}").mkdir(parents=True, exist_ok=True)
    return 0


if __name__ == "__main__":
    commands = {"fetch": fetch, "install": install}
    if len(sys.argv) < 3 or sys.argv[1] not in commands:
        sys.exit(__doc__)
    sys.exit(commands[sys.argv[1]](*sys.argv[2:]))
