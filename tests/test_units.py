"""The shipped systemd units are valid and run the commands that exist."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from aptlayer.cli import cli

DATA = Path(__file__).resolve().parent.parent / "aptlayer" / "data"
UNITS = sorted(DATA.glob("*.service"))


def _exec_args(unit: Path) -> list[str]:
    line = next(ln for ln in unit.read_text().splitlines() if ln.startswith("ExecStart="))
    return line.removeprefix("ExecStart=").split()


def test_units_are_shipped():
    assert {u.name for u in UNITS} == {"apt-layer-recover.service", "apt-layer-watch.service",
                                       "apt-layer-boot-complete.service", "apt-layer-boot-entries.service"}


@pytest.mark.parametrize("unit", UNITS, ids=lambda u: u.name)
def test_unit_runs_an_existing_command(unit):
    argv = _exec_args(unit)
    assert argv[0] == "/usr/bin/apt-layer"
    words = [a for a in argv[1:] if not a.startswith("-")]
    assert words[0] in cli.list_commands(None), words


@pytest.mark.parametrize("unit", UNITS, ids=lambda u: u.name)
def test_systemd_analyze_verify(unit, tmp_path):
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    # Verify a copy whose ExecStart points at an executable that exists here.
    fake = tmp_path / "apt-layer"
    fake.write_text("#!/bin/sh\nexit 0\n")
    fake.chmod(0o755)
    copy = tmp_path / unit.name
    copy.write_text(unit.read_text().replace("/usr/bin/apt-layer", str(fake)))
    r = subprocess.run([analyze, "verify", str(copy)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
