"""apt and apt-get on a booted deployment (aptlayer/data/booted-apt/apt).

The initramfs binds booted-apt over /usr/bin/apt and /usr/bin/apt-get and
the real programs at /run/apt-layer/apt/ (tests/test_vm.py proves that in
a boot). Here a bookworm minbase, read-only as a deployment's root is, gets
the same binds in bubblewrap, with the local test repository as its only
source (``copy:``, so that a download would land in /var/cache/apt):
a command that would change packages stops before apt locks, resolves or
downloads anything and names the apt-layer command; the others run apt.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
BOOTED_APT = REPO / "aptlayer" / "data" / "booted-apt" / "apt"
SOURCES = "Types: deb\nURIs: copy:/mnt\nSuites: stable\nComponents: main\nTrusted: yes\n"

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or shutil.which("bwrap") is None,
                                reason="needs root and bubblewrap (tools/setup.sh installs it)")


class Booted:
    """A read-only bookworm root with booted-apt in place, and the writable parts of /var a booted system has."""

    def __init__(self, base: Path, repo: Path, tmp: Path):
        self.base, self.repo, self.var = base, repo, tmp / "var"
        for sub in ("lib/apt/lists", "cache/apt/archives/partial"):
            (self.var / sub).mkdir(parents=True)
        self.sources = tmp / "sources.list.d"
        self.sources.mkdir()
        (self.sources / "test.sources").write_text(SOURCES)
        self.empty = tmp / "empty"
        self.empty.write_text("")

    def run(self, *command: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        argv = ["bwrap", "--ro-bind", str(self.base), "/", "--proc", "/proc", "--dev", "/dev",
                "--tmpfs", "/tmp", "--tmpfs", "/run", "--unshare-net", "--unshare-pid", "--die-with-parent",
                "--bind", str(self.var / "lib/apt/lists"), "/var/lib/apt/lists",
                "--bind", str(self.var / "cache/apt"), "/var/cache/apt",
                "--ro-bind", str(self.repo), "/mnt",
                "--ro-bind", str(self.empty), "/etc/apt/sources.list",
                "--ro-bind", str(self.sources), "/etc/apt/sources.list.d"]
        for prog in ("apt", "apt-get"):
            argv += ["--ro-bind", str(self.base / "usr/bin" / prog), f"/run/apt-layer/apt/{prog}",
                     "--ro-bind", str(BOOTED_APT), f"/usr/bin/{prog}"]
        base_env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8", "DEBIAN_FRONTEND": "noninteractive"}
        return subprocess.run(argv + ["--", *command], capture_output=True, text=True,
                              env={**base_env, **(env or {})}, check=False)

    def downloaded(self) -> list[str]:
        return sorted(p.name for p in (self.var / "cache/apt/archives").iterdir() if p.name.endswith(".deb"))


@pytest.fixture
def booted(debian_base_tree: Path, apt_repo, tmp_path: Path) -> Booted:
    system = Booted(debian_base_tree, apt_repo.path, tmp_path)
    update = system.run("apt-get", "update")
    assert update.returncode == 0, update.stdout + update.stderr
    return system


def _status(base: Path) -> bytes:
    return (base / "var/lib/dpkg/status").read_bytes()


@pytest.mark.parametrize(("command", "names"), [
    (("apt-get", "install", "-y", "al-app"), "apt-layer install"),
    (("apt", "install", "-y", "al-app"), "apt-layer install"),
    (("apt-get", "-o", "Debug::NoLocking=1", "-y", "install", "al-lib"), "apt-layer install"),
    (("apt-get", "-qy", "reinstall", "tzdata"), "apt-layer install"),
    (("apt-get", "remove", "-y", "tzdata"), "apt-layer uninstall"),
    (("apt", "purge", "tzdata"), "apt-layer uninstall"),
    (("apt-get", "autoremove"), "apt-layer uninstall"),
    (("apt-get", "upgrade", "-y"), "apt-layer upgrade"),
    (("apt-get", "dist-upgrade"), "apt-layer upgrade"),
    (("apt", "full-upgrade", "-y"), "apt-layer upgrade"),
], ids=lambda v: " ".join(v) if isinstance(v, tuple) else None)
def test_commands_that_change_packages_stop_first_and_name_apt_layer(booted: Booted, command, names) -> None:
    before = _status(booted.base)
    r = booted.run(*command)
    assert r.returncode == 100, r.stdout + r.stderr
    assert f"'{names} " in r.stderr or f"'{names}'" in r.stderr, r.stderr
    assert "this system runs an apt-layer deployment" in r.stderr
    # apt itself never ran: no lock error, no resolver output, nothing fetched
    assert "lock" not in r.stderr and r.stdout == ""
    assert booted.downloaded() == [] and _status(booted.base) == before


def test_reading_commands_and_simulations_run_apt(booted: Booted) -> None:
    policy = booted.run("apt-cache", "policy", "al-app")
    assert policy.returncode == 0 and "Candidate: 2.0" in policy.stdout, policy.stdout + policy.stderr
    show = booted.run("apt", "show", "al-app")
    assert show.returncode == 0 and "Package: al-app" in show.stdout, show.stderr
    listed = booted.run("apt", "list", "al-*")
    assert listed.returncode == 0 and "al-app/stable 2.0 all" in listed.stdout, listed.stderr
    simulated = booted.run("apt-get", "-s", "install", "al-app")
    assert simulated.returncode == 0 and "Inst al-app (2.0" in simulated.stdout, simulated.stderr
    simulated = booted.run("apt", "install", "--dry-run", "al-app")
    assert simulated.returncode == 0 and "Inst al-app (2.0" in simulated.stdout, simulated.stderr
    assert booted.downloaded() == []


def test_with_apt_config_set_the_real_apt_runs(booted: Booted) -> None:
    """apt-layer's own apt runs (on a store's state) set APT_CONFIG: they reach apt, which
    here, on the read-only dpkg database, refuses at its lock as it always did."""
    r = booted.run("apt-get", "install", "-y", "al-app", env={"APT_CONFIG": "/etc/apt/apt.conf"})
    assert r.returncode == 100 and "lock" in r.stderr and "apt-layer" not in r.stderr, r.stderr


def test_the_script_alone_does_not_pretend_to_be_apt() -> None:
    """Where the real apt is not under /run/apt-layer/apt (the initramfs did not put it there),
    booted-apt fails to exec it rather than answering in apt's place."""
    r = subprocess.run(["sh", str(BOOTED_APT), "show", "apt"], capture_output=True, text=True)
    assert r.returncode != 0 and "/run/apt-layer/apt/apt" in r.stderr and r.stdout == ""
