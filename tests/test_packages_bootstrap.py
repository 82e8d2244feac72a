"""mmdebstrap through aptlayer.packages.bootstrap.

The command line is checked against synthetic sources; the failures run
mmdebstrap for real against a local repository and a closed port, so they
need no network. A successful bootstrap is the cached test base itself
(debian_base.py makes it with bootstrap()).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from aptlayer.errors import InvalidInput, NotFound
from aptlayer.packages.apt import installed_packages
from aptlayer.packages.bootstrap import (ArchiveUnreachable, BootstrapRequest, SuiteNotFound, bootstrap,
                                         command)
from aptlayer.packages.sources import parse_deb822, parse_one_line

needs_mmdebstrap = pytest.mark.skipif(os.geteuid() != 0 or shutil.which("mmdebstrap") is None,
                                      reason="needs root and mmdebstrap (apt-get install mmdebstrap)")

HOST_LIKE = parse_deb822("""\
Types: deb
URIs: file:/srv/archive/debian
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: file:/srv/archive/debian-security
Suites: bookworm-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
""")


def test_without_mirror_the_hosts_archive_and_its_keyring_are_used(tmp_path: Path) -> None:
    request = BootstrapRequest(suite="trixie", variant="apt", include=("htop", "less"),
                               components=("main", "contrib"), arch="arm64")
    assert command(request, tmp_path / "out.tar", HOST_LIKE) == [
        "mmdebstrap", "--mode=unshare", "--variant=apt", "--components=main,contrib",
        "--include=htop,less", "--architectures=arm64",
        "--keyring=/usr/share/keyrings/debian-archive-keyring.gpg",
        "trixie", str(tmp_path / "out.tar"), "file:/srv/archive/debian"]


def test_an_explicit_mirror_wins_and_brings_no_host_keyring(tmp_path: Path) -> None:
    request = BootstrapRequest(suite="bookworm", mirror="file:/srv/other/debian")
    argv = command(request, tmp_path / "root", HOST_LIKE)
    assert argv[-1] == "file:/srv/other/debian"
    assert not any(a.startswith("--keyring") for a in argv)


def test_no_archive_in_the_host_sources_asks_for_a_mirror(tmp_path: Path) -> None:
    only_security = parse_one_line("deb file:/srv/s/debian-security bookworm-security main\n")
    with pytest.raises(NotFound, match="pass --mirror"):
        command(BootstrapRequest(suite="bookworm"), tmp_path / "x.tar", only_security)


@pytest.mark.parametrize("request_,why", [
    (BootstrapRequest(suite="bookworm", variant="huge"), "unknown variant 'huge'"),
    (BootstrapRequest(suite="bookworm", include=("ok", "Bad Name")), "invalid package name 'Bad Name'"),
    (BootstrapRequest(suite="../etc"), "invalid suite"),
    (BootstrapRequest(suite="bookworm", components=("main,contrib",)), "invalid component"),
    (BootstrapRequest(suite="bookworm", mirror="ftp.example.invalid/debian"), "not an http"),
])
def test_bad_requests_are_invalid_input(tmp_path: Path, request_: BootstrapRequest, why: str) -> None:
    with pytest.raises(InvalidInput, match=why):
        command(request_, tmp_path / "x.tar", HOST_LIKE)


@needs_mmdebstrap
def test_an_existing_target_is_refused(tmp_path: Path) -> None:
    (tmp_path / "taken").mkdir()
    with pytest.raises(InvalidInput, match="exists already"):
        bootstrap(BootstrapRequest(suite="bookworm"), tmp_path / "taken", sources=HOST_LIKE)


@needs_mmdebstrap
def test_unknown_suite_quotes_apt_and_leaves_nothing(tmp_path: Path, apt_repo) -> None:
    out = tmp_path / "out"
    out.mkdir()
    request = BootstrapRequest(suite="nosuchsuite", mirror=apt_repo.uri, keyrings=(apt_repo.keyring,))
    with pytest.raises(SuiteNotFound) as err:
        bootstrap(request, out / "base.tar")
    assert str(err.value) == (  # apt's own line, quoted
        "cannot bootstrap nosuchsuite: the archive has no suite 'nosuchsuite': "
        f"E: The repository 'file:{apt_repo.path} nosuchsuite Release' does not have a Release file.")
    assert isinstance(err.value, NotFound) and err.value.exit_code == 3
    assert list(out.iterdir()) == []  # mmdebstrap's partial tarball is gone


@needs_mmdebstrap
def test_unreachable_archive_quotes_apt_and_leaves_nothing(tmp_path: Path) -> None:
    request = BootstrapRequest(suite="bookworm", mirror="http://127.0.0.1:9/debian")
    with pytest.raises(ArchiveUnreachable) as err:
        bootstrap(request, tmp_path / "root")
    assert "the archive cannot be reached: E: Failed to fetch http://127.0.0.1:9/debian/dists/bookworm/" \
        in str(err.value)
    assert any("Could not connect to 127.0.0.1:9" in line for line in err.value.lines)
    assert list(tmp_path.iterdir()) == []


def test_the_cached_base_is_a_bootstrapped_minbase(debian_base_tree: Path) -> None:
    names = {p.name for p in installed_packages(debian_base_tree)}
    assert {"dpkg", "apt", "base-files", "bash"} <= names
    assert not {"systemd", "openssh-server"} & names  # minbase: no services
    assert (debian_base_tree / "etc/os-release").read_text().count("bookworm") >= 1
