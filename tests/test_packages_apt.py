"""apt and dpkg in a new root: the local signed repository on the cached minbase.

Every install runs for real: the host's apt resolves and downloads into a
cache, the root's apt and dpkg install inside bubblewrap.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from aptlayer.errors import Conflict, IntegrityError, InvalidInput, NotFound
from aptlayer.packages import apt, sandbox
from aptlayer.packages.apt import (BadDeb, DownloadFailed, Package, PackageNotFound, RepositoryNotTrusted,
                                   ScriptFailed, Unsatisfiable, inspect_deb, installed_packages)
from aptlayer.packages.sources import read_sources
from aptrepo import BASE_FILE, BASE_PACKAGE, DIVERTED, AptRepo, write_hostile_deb

needs_sandbox = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("bwrap") is None or shutil.which("apt-get") is None,
    reason="needs root, bubblewrap and apt-get")

HOST_STATUS = Path("/var/lib/dpkg/status")


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def in_root(root: Path, *command: str) -> str:
    result = sandbox.run(root, list(command))
    assert result.returncode == 0, sandbox.output_text(result)
    return sandbox.output_text(result)


def dpkg_l(root: Path) -> dict[str, tuple[str, str]]:
    """``dpkg -l`` in the root: name -> (state, version)."""
    out = {}
    for line in in_root(root, "dpkg-query", "-W", "-f", "${Package} ${db:Status-Abbrev} ${Version}\n").splitlines():
        name, state, version = line.split()
        out[name] = (state, version)
    return out


@pytest.fixture
def install(apt_repo: AptRepo, tmp_path: Path):
    """install(root, *names, **kw) against the local repository, with one cache per test."""
    cache = tmp_path / "cache"

    work = tmp_path / "work"
    work.mkdir()

    def run(root: Path, *names: str, **kw):
        kw.setdefault("sources", [apt_repo.source()])
        kw.setdefault("cache", cache)
        kw.setdefault("trusted_parts", None)
        kw.setdefault("workdir", work)
        return apt.install(root, list(names), **kw)

    run.cache = cache
    yield run
    assert list(work.iterdir()) == []  # each operation removed its apt configuration, failed or not


# -- success --------------------------------------------------------------

@needs_sandbox
def test_dependencies_are_pulled_in_and_each_deb_is_hashed(debian_root: Path, install, apt_repo: AptRepo) -> None:
    host_status = HOST_STATUS.read_bytes()
    base = installed_packages(debian_root)
    outcome = install(debian_root, "al-app")
    assert outcome.installed == {
        Package("al-app", "2.0", "all"): sha256(apt_repo.deb("al-app")),
        Package("al-lib", "1.0", "all"): sha256(apt_repo.deb("al-lib")),
    }
    assert set(outcome.packages) == set(base) | set(outcome.installed)
    assert in_root(debian_root, "al-app") == "al-app 2.0\n"
    listed = dpkg_l(debian_root)
    assert listed["al-app"] == ("ii", "2.0") and listed["al-lib"] == ("ii", "1.0")
    assert listed["dpkg"][0] == "ii"  # the base's packages are still listed
    assert apt.audit(debian_root) == ""
    assert HOST_STATUS.read_bytes() == host_status  # the host's dpkg never saw any of it
    # the image carries no logs or caches of the build
    for log in ("var/log/apt/history.log", "var/log/apt/term.log", "var/log/dpkg.log"):
        path = debian_root / log
        assert not path.exists() or "al-app" not in path.read_text(errors="replace"), log
    assert not list((debian_root / "var/cache/apt/archives").glob("*.deb"))
    assert not os.path.lexists(debian_root / "usr/sbin/policy-rc.d")


@needs_sandbox
def test_conffile_is_installed_and_registered(debian_root: Path, install) -> None:
    install(debian_root, "al-conf")
    assert (debian_root / "etc/al-conf.conf").read_text() == "setting = default\n"
    conffiles = in_root(debian_root, "dpkg-query", "-W", "-f", "${Conffiles}", "al-conf")
    digest = hashlib.md5(b"setting = default\n").hexdigest()
    assert conffiles.split() == ["/etc/al-conf.conf", digest]


@needs_sandbox
def test_postinst_runs_and_prerm_runs_on_remove(debian_root: Path, install) -> None:
    install(debian_root, "al-scripts")
    made = debian_root / "var/lib/al-scripts/made-by-postinst"
    assert made.read_text() == "configure \n"  # postinst configure, no previous version
    outcome = apt.remove(debian_root, ["al-scripts"])
    assert outcome.removed == [Package("al-scripts", "1.0", "all")]
    assert not made.exists()
    assert (debian_root / "var/lib/al-scripts/prerm-ran").read_text() == "remove\n"
    assert "al-scripts" not in {p.name for p in installed_packages(debian_root)}
    assert apt.audit(debian_root) == ""


@needs_sandbox
def test_maintainer_scripts_reach_neither_network_nor_host_nor_cache(debian_root: Path, install) -> None:
    assert Path("/usr/bin/mmdebstrap").exists()  # on the host: the probe looks for it
    install(debian_root, "al-probe")
    assert (debian_root / "var/lib/al-probe/report").read_text() == (
        "interfaces: 1\n"  # loopback only, in a network namespace of its own
        "pid1: bwrap\n"
        "cache: read-only\n"
        "host root: hidden\n"
        "policy-rc.d: 101\n")
    assert not list(install.cache.rglob("poison"))


@needs_sandbox
def test_upgrade_to_the_newer_version(debian_root: Path, install, apt_repo: AptRepo) -> None:
    install(debian_root, "al-app=1.0")
    assert in_root(debian_root, "al-app") == "al-app 1.0\n"
    outcome = install(debian_root, "al-app")
    assert outcome.installed == {Package("al-app", "2.0", "all"): sha256(apt_repo.deb("al-app"))}
    assert in_root(debian_root, "al-app") == "al-app 2.0\n"


@needs_sandbox
def test_the_download_cache_is_reused(debian_base_tree: Path, install, tmp_path: Path) -> None:
    from debian_base import writable_root

    first_root, cleanup_first = writable_root(debian_base_tree, tmp_path / "first")
    second_root, cleanup_second = writable_root(debian_base_tree, tmp_path / "second")
    try:
        first = install(first_root, "al-app")
        assert first.downloaded == ["al-app_2.0_all.deb", "al-lib_1.0_all.deb"]
        cached = {p.name: p.stat().st_mtime_ns for p in (install.cache / "archives").glob("*.deb")}
        second = install(second_root, "al-app")
        assert second.downloaded == []
        assert re.findall(r"^Get:\d+ \S+ stable/main all (al-\S+)", first.output, re.M) == ["al-lib", "al-app"]
        assert re.findall(r"^Get:\d+ \S+ stable/main all (al-\S+)", second.output, re.M) == []
        assert {p.name: p.stat().st_mtime_ns for p in (install.cache / "archives").glob("*.deb")} == cached
        assert second.installed == first.installed
    finally:
        cleanup_first()
        cleanup_second()


@needs_sandbox
def test_replaces_takes_over_a_base_file(debian_root: Path, install) -> None:
    install(debian_root, "al-replaces")
    assert (debian_root / BASE_FILE.lstrip("/")).read_text() == "al-replaces took this file over\n"
    assert in_root(debian_root, "dpkg", "-S", BASE_FILE).split(":")[0] == "al-replaces"
    assert BASE_PACKAGE in {p.name for p in installed_packages(debian_root)}
    assert apt.audit(debian_root) == ""


@needs_sandbox
def test_a_diversion_moves_the_base_file_aside_and_back(debian_root: Path, install) -> None:
    original = (debian_root / DIVERTED.lstrip("/")).read_bytes()
    install(debian_root, "al-divert")
    assert (debian_root / DIVERTED.lstrip("/")).read_text() == "#!/bin/sh\necho diverted by al-divert\n"
    assert (debian_root / f"{DIVERTED}.distrib".lstrip("/")).read_bytes() == original
    assert "diversion of" in in_root(debian_root, "dpkg-divert", "--list", DIVERTED)
    apt.remove(debian_root, ["al-divert"])
    assert (debian_root / DIVERTED.lstrip("/")).read_bytes() == original
    assert not (debian_root / f"{DIVERTED}.distrib".lstrip("/")).exists()


@needs_sandbox
def test_a_local_deb_is_installed_from_its_file(debian_root: Path, install, apt_repo: AptRepo) -> None:
    deb = apt_repo.deb("al-app")
    outcome = install(debian_root, debs=[deb])
    assert outcome.installed == {Package("al-app", "2.0", "all"): sha256(deb),
                                 Package("al-lib", "1.0", "all"): sha256(apt_repo.deb("al-lib"))}
    assert dpkg_l(debian_root)["al-app"] == ("ii", "2.0")


@pytest.fixture
def trixie_roots(tmp_path: Path):
    """Two writable Debian 13 (trixie, apt 3.0) minbase roots, from a base cached like the bookworm one."""
    from debian_base import Unavailable, base_tree, writable_root

    try:
        tree = base_tree("trixie")
    except Unavailable as exc:
        pytest.skip(str(exc))
    roots = [writable_root(tree, tmp_path / f"trixie{n}") for n in range(2)]
    yield [root for root, _ in roots]
    for _, cleanup in roots:
        cleanup()


@needs_sandbox
def test_a_local_deb_installs_into_a_trixie_root_with_a_cold_and_a_warm_cache(trixie_roots, install,
                                                                               apt_repo: AptRepo,
                                                                               tmp_path: Path) -> None:
    """apt 3.0 gave dpkg a relative path for a local .deb under --no-download ("Pathname to install is not absolute")."""
    from aptrepo import Pkg, build_deb

    deb = build_deb(Pkg("al-local", control={"Depends": "al-lib"}, files={"/usr/share/al-local/x": "x\n"}), tmp_path)
    want = {Package("al-local", "1.0", "all"): sha256(deb),
            Package("al-lib", "1.0", "all"): sha256(apt_repo.deb("al-lib"))}
    cold = install(trixie_roots[0], debs=[deb])
    warm = install(trixie_roots[1], debs=[deb])  # every .deb in the cache: the one run of apt in the sandbox
    assert "download only" not in warm.output, warm.output
    assert cold.installed == warm.installed == want
    for root in trixie_roots:
        assert dpkg_l(root)["al-local"] == ("ii", "1.0")


def _updated(output: str) -> bool:
    """Whether apt-get update ran: its lines name the repository's Release files."""
    return re.search(r"^(Get|Hit|Ign):\d+ \S+ stable (InRelease|Release)", output, re.M) is not None


@needs_sandbox
def test_fresh_lists_are_used_without_an_update_until_a_package_is_missing(debian_root: Path, install,
                                                                         tmp_path: Path) -> None:
    """One apt-get update per sources while the lists are fresh; a package new since is found all the same."""
    from aptrepo import Pkg

    path = tmp_path / "repo"
    AptRepo.build(path, [Pkg("al-lib")], sign=False)
    source = AptRepo(path, None, {}).source(trusted=True)
    first = install(debian_root, "al-lib", sources=[source])
    assert _updated(first.output), first.output
    again = install(debian_root, "al-lib", sources=[source])  # fresh lists: no update
    assert not _updated(again.output), again.output
    assert again.installed == {}
    shutil.rmtree(path)
    AptRepo.build(path, [Pkg("al-lib"), Pkg("al-conf", files={"/etc/al-conf.conf": "setting = default\n"})],
                  sign=False)
    grown = install(debian_root, "al-conf", sources=[source])  # not in the lists: updated, then found
    assert _updated(grown.output), grown.output
    assert [p.name for p in grown.installed] == ["al-conf"]
    stamp = install.cache / apt.LISTS_STAMP
    os.utime(stamp, (0, 0))  # fetched long ago
    stale = install(debian_root, "al-conf", sources=[source])
    assert _updated(stale.output), stale.output
    forced = install(debian_root, "al-conf", sources=[source], refresh=True)
    assert _updated(forced.output), forced.output


@needs_sandbox
def test_a_warm_cache_installs_with_one_run_of_apt_and_a_missing_deb_takes_the_long_way(
        debian_base_tree: Path, install, tmp_path: Path) -> None:
    from debian_base import writable_root

    roots = [writable_root(debian_base_tree, tmp_path / f"root{n}") for n in range(3)]
    try:
        first = install(roots[0][0], "al-app")
        assert "Download complete and in download only mode" in first.output  # the host's apt fetched
        second = install(roots[1][0], "al-app")
        assert not _updated(second.output) and "download only" not in second.output, second.output
        assert second.installed == first.installed and second.downloaded == []
        os.unlink(install.cache / "archives/al-lib_1.0_all.deb")
        third = install(roots[2][0], "al-app")  # refused in the sandbox before dpkg ran, then downloaded
        assert "download only" in third.output and third.downloaded == ["al-lib_1.0_all.deb"]
        assert third.installed == first.installed
        assert dpkg_l(roots[2][0])["al-lib"] == ("ii", "1.0")
    finally:
        for _, cleanup in roots:
            cleanup()


# -- refusals -------------------------------------------------------------

@needs_sandbox
def test_unknown_package_is_not_found_and_changes_nothing(debian_root: Path, install) -> None:
    status = (debian_root / "var/lib/dpkg/status").read_bytes()
    with pytest.raises(PackageNotFound) as err:
        install(debian_root, "al-app", "al-nope")
    assert str(err.value) == "cannot install al-app al-nope: E: Unable to locate package al-nope"
    assert isinstance(err.value, NotFound) and err.value.exit_code == 3
    assert (debian_root / "var/lib/dpkg/status").read_bytes() == status
    with pytest.raises(PackageNotFound, match="E: Version '9.9' for 'al-app' was not found"):
        install(debian_root, "al-app=9.9")


@needs_sandbox
def test_failing_postinst_quotes_dpkg_and_the_script(debian_root: Path, install) -> None:
    with pytest.raises(ScriptFailed) as err:
        install(debian_root, "al-badpostinst")
    assert str(err.value) == (
        "apt-get install in the new root failed: dpkg: error processing package al-badpostinst (--configure): "
        "installed al-badpostinst package post-installation script subprocess returned error exit status 1")
    assert "al-badpostinst: refusing to configure" in err.value.lines  # the script's own words
    assert err.value.exit_code == 1


@needs_sandbox
def test_conflict_with_a_base_package_is_refused_not_resolved(debian_root: Path, install) -> None:
    with pytest.raises(Unsatisfiable) as err:
        install(debian_root, "al-conflicts")
    assert str(err.value) == ("cannot install al-conflicts: "
                              "E: Packages need to be removed but remove is disabled.")
    assert isinstance(err.value, Conflict) and err.value.exit_code == 4
    assert BASE_PACKAGE in {p.name for p in installed_packages(debian_root)}


@needs_sandbox
def test_unsatisfiable_dependency_quotes_apt(debian_root: Path, install) -> None:
    with pytest.raises(Unsatisfiable) as err:
        install(debian_root, "al-broken")
    assert str(err.value) == "cannot install al-broken: al-broken : Depends: al-missing but it is not installable"
    assert "E: Unable to correct problems, you have held broken packages." in err.value.lines


@needs_sandbox
def test_overwriting_a_base_file_without_replaces_quotes_dpkg(debian_root: Path, install) -> None:
    with pytest.raises(Unsatisfiable) as err:
        install(debian_root, "al-overwrites")
    assert f"trying to overwrite '{BASE_FILE}', which is also in package {BASE_PACKAGE}" in str(err.value)


@needs_sandbox
def test_removing_a_dependency_of_another_package_is_refused(debian_root: Path, install) -> None:
    install(debian_root, "al-app")
    with pytest.raises(Unsatisfiable, match="removing al-lib would also remove al-app"):
        apt.remove(debian_root, ["al-lib"])
    with pytest.raises(PackageNotFound, match="not installed in the root: al-conf"):
        apt.remove(debian_root, ["al-conf"])
    assert {"al-app", "al-lib"} <= {p.name for p in installed_packages(debian_root)}


@needs_sandbox
def test_unsigned_repository_is_refused_unless_trusted(debian_root: Path, install, tmp_path: Path,
                                                        apt_repo: AptRepo) -> None:
    from aptrepo import Pkg

    unsigned = AptRepo.build(tmp_path / "unsigned", [Pkg("al-unsigned")], sign=False)
    with pytest.raises(RepositoryNotTrusted) as err:
        install(debian_root, "al-unsigned", sources=[unsigned.source()])
    assert "is not signed" in str(err.value)
    assert isinstance(err.value, IntegrityError) and err.value.exit_code == 10
    # signed, but by a key other than the one the source names
    with pytest.raises(RepositoryNotTrusted, match="NO_PUBKEY|not signed|couldn't be verified"):
        other = apt_repo.source()
        install(debian_root, "al-app", sources=[
            type(other)(uris=other.uris, suites=other.suites, components=other.components,
                        signed_by=(str(unsigned.path / "dists/stable/Release"),))],
            cache=tmp_path / "cache-other")
    outcome = install(debian_root, "al-unsigned", sources=[unsigned.source(trusted=True)])
    assert Package("al-unsigned", "1.0", "all") in outcome.installed


@pytest.mark.parametrize("spec", ["-oDPkg::Pre-Invoke::=touch /tmp/pwned", "--purge", "al app",
                                  "al-app=1.0;touch x", "../al-app", ""])
def test_what_is_not_a_package_never_reaches_apt(tmp_path: Path, spec: str) -> None:
    with pytest.raises(InvalidInput, match="invalid package"):
        apt.check_package_specs(["al-app", spec])
    apt.check_package_specs(["al-app", "al-app=2.0", "libc6:amd64", "hello/bookworm", "g++", "al-app=1:2.0~rc1+b1"])


@needs_sandbox
def test_install_and_remove_check_specs_before_running_anything(debian_root: Path, install) -> None:
    status = (debian_root / "var/lib/dpkg/status").read_bytes()
    with pytest.raises(InvalidInput, match="invalid package '-oAPT::Get::Simulate=false'"):
        install(debian_root, "-oAPT::Get::Simulate=false")
    with pytest.raises(InvalidInput, match="invalid package"):
        apt.remove(debian_root, ["-y", "dpkg"])
    assert (debian_root / "var/lib/dpkg/status").read_bytes() == status
    assert not (install.cache / "lists").exists()  # apt never ran


# -- local .deb files ------------------------------------------------------

@pytest.mark.parametrize("members,why", [
    ([("./usr/share/ok", "file"), ("/etc/cron.d/evil", "file")], "its name is an absolute path"),
    ([("./usr/share/ok", "file"), ("./usr/../../escape", "file")], "its name has a '..' component"),
    ([("./usr/share/ok", "file"), ("./etc/evil", "hardlink:../../etc/shadow")], "its hard link target has a '..' component"),
    ([("./usr/share/ok", "file"), ("./dev/mem0", "chardev")], "is a device node"),
])
def test_a_hostile_local_deb_is_refused(tmp_path: Path, members, why: str) -> None:
    deb = write_hostile_deb(tmp_path / "hostile.deb", members)
    assert subprocess.run(["dpkg-deb", "--field", str(deb), "Package"], stdout=subprocess.PIPE,
                          text=True).stdout == "al-hostile\n"  # a well-formed .deb otherwise
    with pytest.raises(BadDeb, match=why) as err:
        inspect_deb(deb)
    assert isinstance(err.value, InvalidInput) and err.value.exit_code == 2


def test_a_sane_local_deb_is_read(tmp_path: Path) -> None:
    deb = write_hostile_deb(tmp_path / "fine.deb", [("./usr/share/ok", "file"), ("./usr/share/ok2", "hardlink:./usr/share/ok")])
    assert inspect_deb(deb) == Package("al-hostile", "1.0", "all")


def test_a_file_that_is_not_a_deb_quotes_dpkg_deb(tmp_path: Path) -> None:
    bogus = tmp_path / "bogus.deb"
    bogus.write_text("not an archive\n")
    with pytest.raises(BadDeb, match=r"bogus.deb is not a valid .deb: dpkg-deb: error: .*not a Debian format archive"):
        inspect_deb(bogus)


# -- the real archive -------------------------------------------------------

@needs_sandbox
def test_hello_from_the_real_archive_runs_in_the_root(debian_root: Path) -> None:
    from debian_base import CACHE

    cache = CACHE / "apt-cache"  # kept between runs, like the store's cache/apt
    try:
        sources = [s for s in read_sources() if s.is_binary]
        outcome = apt.install(debian_root, ["hello"], sources=sources, cache=cache)
    except DownloadFailed as exc:
        pytest.skip(f"the Debian archive is unreachable: {exc}")
    (hello,) = [p for p in outcome.installed if p.name == "hello"]
    assert hello.arch == apt.root_architectures(debian_root)[0]
    assert in_root(debian_root, "hello") == "Hello, world!\n"
    assert sha256(cache / "archives" / f"hello_{hello.version.replace(':', '%3a')}_{hello.arch}.deb") \
        == outcome.installed[hello]


# -- the root's dpkg state, on synthetic databases ---------------------------

STATUS = """\
Package: dpkg
Status: install ok installed
Architecture: amd64
Version: 1.21.22

Package: gone
Status: deinstall ok config-files
Architecture: amd64
Version: 1.0

Package: broken
Status: install ok half-configured
Architecture: all
Version: 2.0

Package: libfoo
Status: install ok installed
Architecture: i386
Version: 1:3.0
"""


def synthetic_root(tmp_path: Path, status: str, arch: str | None = None) -> Path:
    root = tmp_path / "root"
    (root / "var/lib/dpkg").mkdir(parents=True)
    (root / "var/lib/dpkg/status").write_text(status)
    if arch is not None:
        (root / "var/lib/dpkg/arch").write_text(arch)
    return root


def test_installed_packages_are_those_dpkg_calls_installed(tmp_path: Path) -> None:
    root = synthetic_root(tmp_path, STATUS)
    assert installed_packages(root) == [Package("dpkg", "1.21.22", "amd64"), Package("libfoo", "1:3.0", "i386")]


def test_architectures_are_dpkgs_own_then_the_foreign_ones(tmp_path: Path) -> None:
    root = synthetic_root(tmp_path, STATUS, "amd64\ni386\n")
    assert apt.root_architectures(root) == ["amd64", "i386"]
    with pytest.raises(InvalidInput, match="has no dpkg installed"):
        apt.root_architectures(synthetic_root(tmp_path / "other", "Package: x\nStatus: install ok installed\n"
                                                                  "Architecture: all\nVersion: 1\n"))


def test_a_dpkg_database_behind_a_symlink_is_not_read(tmp_path: Path) -> None:
    real = synthetic_root(tmp_path / "elsewhere", STATUS)
    root = tmp_path / "root"
    (root / "var").mkdir(parents=True)
    (root / "var/lib").symlink_to(real / "var/lib")
    with pytest.raises(InvalidInput, match="is a symlink"):
        installed_packages(root)


@needs_sandbox
def test_an_unreachable_repository_quotes_apt(debian_root: Path, install) -> None:
    from aptlayer.packages.sources import Source

    closed = Source(uris=("http://127.0.0.1:9/debian",), suites=("stable",), components=("main",))
    with pytest.raises(DownloadFailed) as err:
        install(debian_root, "al-app", sources=[closed])
    assert str(err.value) == (
        "cannot read the package lists: E: Failed to fetch http://127.0.0.1:9/debian/dists/stable/InRelease  "
        "Could not connect to 127.0.0.1:9 (127.0.0.1). - connect (111: Connection refused)")
