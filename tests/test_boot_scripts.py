"""The boot scripts apt-layer ships (initramfs-tools hook and boot script, grub.d script) are
POSIX sh that shellcheck passes, and the Debian package installs them where
initramfs-tools looks (tests/test_vm.py boots them)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DATA = REPO / "aptlayer" / "data"
SCRIPTS = sorted(p for d in ("initramfs-tools", "grub.d", "booted-apt") for p in (DATA / d).rglob("*") if p.is_file())
INITRAMFS = [p for p in SCRIPTS if "initramfs-tools" in p.parts]


def test_the_scripts_are_there_and_executable() -> None:
    names = {str(p.relative_to(DATA)) for p in SCRIPTS}
    assert names == {"initramfs-tools/hooks/apt-layer", "initramfs-tools/scripts/local-bottom/apt-layer",
                     "grub.d/15_apt-layer", "booted-apt/apt"}
    for script in SCRIPTS:
        assert script.stat().st_mode & 0o111, script
        assert script.read_text().startswith("#!/bin/sh\n"), script


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: str(p.relative_to(DATA)))
def test_shellcheck_passes(script: Path) -> None:
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed (tools/setup.sh installs it)")
    r = subprocess.run(["shellcheck", "--shell=sh", "--severity=style", str(script)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.parametrize("script", INITRAMFS, ids=lambda p: str(p.relative_to(DATA)))
def test_the_prereqs_protocol(script: Path) -> None:
    """initramfs-tools runs each script with ``prereqs`` first: it must print its
    prerequisites and exit 0 without doing anything else."""
    r = subprocess.run(["sh", str(script), "prereqs"], capture_output=True, text=True)
    assert (r.returncode, r.stdout.strip(), r.stderr) == (0, "", "")


def test_the_package_installs_them_for_initramfs_tools() -> None:
    rules = (REPO / "debian" / "rules").read_text()
    for script in INITRAMFS:
        rel = script.relative_to(DATA / "initramfs-tools")
        assert f"$(PKG)/usr/share/initramfs-tools/{rel}" in rules, rel
    assert "$(PKG)/etc/grub.d/15_apt-layer" in rules
