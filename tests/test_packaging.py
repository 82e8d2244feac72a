"""What the Debian package takes from the tree: one version, a complete conffile,
launcher and units that exist. (tests/test_debian_package.py builds and installs it.)"""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
import tomllib
from pathlib import Path

from conftest import REPO

import aptlayer
from aptlayer import config

CONFFILE = REPO / "aptlayer" / "data" / "config.toml"


def test_the_version_is_kept_in_one_place():
    changelog = (REPO / "debian" / "changelog").read_text().splitlines()[0]
    assert re.match(r"apt-layer \(([^)]+)\) ", changelog).group(1) == aptlayer.__version__
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert "version" not in project["project"] and project["project"]["dynamic"] == ["version"]
    assert project["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "aptlayer.__version__"}
    r = subprocess.run([sys.executable, "-m", "aptlayer", "--version"], capture_output=True, text=True,
                       cwd=REPO, check=True)
    assert r.stdout == f"apt-layer, version {aptlayer.__version__}\n"


def test_the_conffile_has_every_key_commented_out(tmp_path):
    text = CONFFILE.read_text()
    settings = [ln for ln in text.splitlines() if re.match(r"#?\s*\w+\s*=", ln)]
    assert settings and all(ln.startswith("#") for ln in settings), "keys must be commented out"
    # As shipped it changes nothing ...
    assert config.load(CONFFILE) == config.Config(source=CONFFILE)
    # ... and uncommented it sets every key config.py knows, with its default.
    uncommented = tmp_path / "config.toml"
    uncommented.write_text(re.sub(r"^#(\w+\s*=)", r"\1", text, flags=re.M))
    parsed = config.parse(uncommented, tomllib.loads(uncommented.read_text()))
    fields = {f.name for f in dataclasses.fields(config.Config)} - {"source"}
    assert set(parsed) == fields
    assert config.load(uncommented).root == config.DEFAULT_ROOT


def test_the_launcher_runs_aptlayer_from_its_private_directory():
    launcher = (REPO / "debian" / "apt-layer.launcher").read_text()
    assert launcher.startswith("#!/usr/bin/python3 -I\n# apt-layer launcher")
    assert 'LIB = "/usr/lib/apt-layer"' in launcher and "from aptlayer.cli import main" in launcher
    rules = (REPO / "debian" / "rules").read_text()
    for unit in (REPO / "aptlayer" / "data").glob("*.service"):
        assert unit.name in rules  # each unit gets an explicit enable/start policy


def _archive_uri(etc: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(REPO / "tools" / "archive-uri.sh")], capture_output=True, text=True,
                          env={"APT_ETC": str(etc), "PATH": "/usr/bin:/bin"})


def test_archive_uri_is_read_from_the_hosts_apt_sources(tmp_path):
    """Scripts name no mirror: the archive is the host's first non-security, non-updates deb source."""
    (tmp_path / "sources.list.d").mkdir()
    (tmp_path / "sources.list.d" / "debian.sources").write_text(
        "Types: deb\nURIs: file:/srv/security/debian-security\nSuites: bookworm-security\n"
        "Components: main\n\n"
        "Types: deb-src\nURIs: file:/srv/src/debian\nSuites: bookworm\nComponents: main\n\n"
        "Enabled: no\nTypes: deb\nURIs: file:/srv/off/debian\nSuites: bookworm\n\n"
        "Types: deb\n# a comment\nURIs: file:/srv/archive/debian/\nSuites: bookworm bookworm-updates\n"
        "Components: main\n")
    r = _archive_uri(tmp_path)
    assert (r.returncode, r.stdout) == (0, "file:/srv/archive/debian\n"), r.stderr
    (tmp_path / "sources.list.d" / "debian.sources").unlink()
    (tmp_path / "sources.list").write_text("# deb file:/srv/commented/debian bookworm main\n"
                                           "deb [signed-by=/k.gpg] file:/srv/one/debian bookworm main\n")
    assert _archive_uri(tmp_path).stdout == "file:/srv/one/debian\n"
    (tmp_path / "sources.list").write_text("")
    r = _archive_uri(tmp_path)
    assert r.returncode == 1 and "no Debian archive found" in r.stderr
