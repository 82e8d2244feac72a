"""Package layering end to end: a real bookworm minbase, the signed local repository, real mounts.

Every layered image is checked byte for byte against mkcomposefs of its own
mounted tree, and every failure against the store as it was: no new image,
the same deployments, nothing left in staging, a journal that verifies.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path

import pytest

from aptlayer import errors, inventory, layering, mounts
from aptlayer.builder import CreateOptions
from aptlayer.maintenance import Maintenance
from aptlayer.packages import apt
from aptlayer.store import Store

from crashkit import check_committed_images, check_projection

pytestmark = pytest.mark.root


@pytest.fixture
def store(tmp_path: Path, debian_base_tree: Path, kernel: None):
    s = Store.open(tmp_path / "store")
    s.create(str(debian_base_tree), "base", CreateOptions(backend="python"))
    s.deploy("base")
    yield s
    s.close()


def deployed(store: Store) -> tuple[str | None, str | None]:
    deps = store.journal.deployments()
    return tuple(deps[slot].image if slot in deps else None for slot in ("current", "previous"))


def unchanged_since(store: Store, images: list[str], deps: tuple) -> None:
    """The store as it was before a failed operation."""
    assert [i["name"] for i in inventory.images(store)] == images
    assert deployed(store) == deps
    assert list(store.staging_dir.iterdir()) == []
    assert inventory.transactions(store, "open") == []
    assert check_committed_images(store) == []
    Maintenance(store).verify()


def mkcomposefs_digest(store: Store, name: str, tmp_path: Path) -> str:
    """The digest mkcomposefs gives the image's own tree, read through a read-only mount."""
    from aptlayer.composefs import build  # the project's writer: identical to upstream 1.0.8

    mnt = tmp_path / f"mnt-{name}"
    mnt.mkdir()
    mounts.mount(store, name, str(mnt), readonly=True)
    try:
        built = build.make_image(str(mnt), digest_store=str(tmp_path / "scratch-objects"))
    finally:
        mounts.unmount(store, str(mnt))
    return built.digest.hex()


def in_chroot(store: Store, name: str, tmp_path: Path, *command: str) -> subprocess.CompletedProcess:
    mnt = tmp_path / f"chroot-{name}"
    mnt.mkdir(exist_ok=True)
    mounts.mount(store, name, str(mnt), readonly=True)
    try:
        return subprocess.run(["chroot", str(mnt), *command], capture_output=True, text=True)
    finally:
        mounts.unmount(store, str(mnt))


def test_install_layers_packages_byte_identically_and_deploys_them(store: Store, apt_repo, tmp_path: Path) -> None:
    result = layering.install(store, ["al-app"], sources=[apt_repo.source()])
    assert result["image"] == "base+1" and result["deployed"]
    assert {(c["change"], c["package"]) for c in result["changes"]} == {("added", "al-app"), ("added", "al-lib")}
    assert deployed(store) == ("base+1", "base")
    assert mkcomposefs_digest(store, "base+1", tmp_path) == store.journal.image("base+1").digest
    listing = in_chroot(store, "base+1", tmp_path, "dpkg-query", "-W", "-f", "${Package} ${Version}\\n")
    assert "al-app 2.0" in listing.stdout and "al-lib 1.0" in listing.stdout
    audit = in_chroot(store, "base+1", tmp_path, "dpkg", "--audit")
    assert audit.returncode == 0 and audit.stdout == ""
    lineage = layering.lineage_of(store, "base+1")
    assert (lineage.base, lineage.request.install) == ("base", ("al-app",))
    assert {k for k, sha in lineage.debs.items() if sha is not None} == {"al-app:all", "al-lib:all"}
    assert lineage.debs["al-app:all"] == hashlib.sha256(apt_repo.deb("al-app").read_bytes()).hexdigest()
    # the whole resolved set, read from the image: the base's packages have no .deb at hand
    assert set(lineage.debs) == {f"{p['name']}:{p['architecture']}" for p in layering.packages(store)["packages"]
                                 if p["mark"] != "removed"}
    assert lineage.debs["dpkg:amd64"] is None
    status = Maintenance(store).status()["deployments"]["current"]
    assert (status["base"], status["layered"]) == ("base", ["al-app"])
    assert check_projection(store) == []


def test_uninstalling_every_layered_package_deploys_the_base_itself(store: Store, apt_repo) -> None:
    layering.install(store, ["al-app"], sources=[apt_repo.source()])
    result = layering.uninstall(store, ["al-app"], sources=[apt_repo.source()])
    assert result["image"] == "base"
    assert result["digest"] == store.journal.image("base").digest
    assert deployed(store) == ("base", "base+1")


def test_a_package_the_base_has_is_an_inactive_request(store: Store, apt_repo) -> None:
    result = layering.install(store, ["al-lib", "tzdata"], sources=[apt_repo.source()])
    assert result["inactive"] == ["tzdata"]
    assert layering.packages(store)["inactive"] == ["tzdata"]


def test_uninstall_of_a_base_package_points_at_override(store: Store, apt_repo) -> None:
    layering.install(store, ["al-lib"], sources=[apt_repo.source()])
    with pytest.raises(errors.InvalidInput, match="override remove tzdata"):
        layering.uninstall(store, ["tzdata"], sources=[apt_repo.source()])


def test_override_remove_and_reset(store: Store, apt_repo, tmp_path: Path) -> None:
    result = layering.override_remove(store, ["tzdata"], sources=[apt_repo.source()])
    assert {(c["change"], c["package"]) for c in result["changes"]} == {("removed", "tzdata")}
    marks = {p["name"]: p["mark"] for p in layering.packages(store)["packages"]}
    assert marks["tzdata"] == "removed"
    assert mkcomposefs_digest(store, result["image"], tmp_path) == result["digest"]
    back = layering.override_reset(store, None, sources=[apt_repo.source()])
    assert back["image"] == "base"


@pytest.mark.parametrize("spec, error, quoted", [
    ("al-badpostinst", apt.ScriptFailed, "al-badpostinst: refusing to configure"),
    ("al-nonexistent", apt.PackageNotFound, "al-nonexistent"),
    ("al-broken", apt.Unsatisfiable, "al-missing"),
    ("al-conflicts", apt.Unsatisfiable, "remove is disabled"),
])
def test_a_failed_install_leaves_the_store_as_it_was(store: Store, apt_repo, spec, error, quoted) -> None:
    before = ([i["name"] for i in inventory.images(store)], deployed(store))
    with pytest.raises(error) as caught:
        layering.install(store, [spec], sources=[apt_repo.source()])
    assert quoted in str(caught.value) + "\n".join(caught.value.lines)
    unchanged_since(store, *before)


def test_upgrade_rebuilds_only_when_a_version_changed(store: Store, tmp_path: Path) -> None:
    from aptrepo import AptRepo, Pkg

    lib = Pkg("al-lib", files={"/usr/share/al-lib/version": "1.0\n"})
    old = AptRepo.build(tmp_path / "v1", [lib, Pkg("al-app", "1.0", {"Depends": "al-lib"})])
    layering.install(store, ["al-app"], sources=[old.source()])
    unchanged = layering.upgrade(store, check=True, sources=[old.source()])
    assert unchanged["changed"] is False
    new = AptRepo.build(tmp_path / "v2", [lib, Pkg("al-app", "2.0", {"Depends": "al-lib"})])
    would = layering.upgrade(store, check=True, sources=[new.source()])
    assert would["changed"] is True and [c["change"] for c in would["changes"]] == ["upgraded"]
    assert [i["name"] for i in inventory.images(store)] == ["base", "base+1"]
    done = layering.upgrade(store, sources=[new.source()])
    assert done["image"] == "base+2" and deployed(store) == ("base+2", "base+1")
    assert [(c["package"], c["from"], c["version"]) for c in done["changes"]] == [("al-app", "1.0", "2.0")]


def test_diff_between_a_base_and_its_layered_image(store: Store, apt_repo) -> None:
    layering.install(store, ["al-app"], sources=[apt_repo.source()])
    d = layering.diff(store, "base", "base+1", files=True)
    assert [p["name"] for p in d["added"]] == ["al-app", "al-lib"]
    paths = {p["name"]: p["added"] for p in d["files"]}
    assert "/usr/bin/al-app" in paths["al-app"]


def test_a_killed_install_is_undone_by_recovery(store: Store, apt_repo) -> None:
    """SIGKILL while the base is mounted writable in staging: recovery detaches it and drops the work."""
    import sys

    from aptlayer.recovery import recover

    from crashkit import KILLED, cli_env

    source = apt_repo.source()
    code = ("import sys\n"
            "from aptlayer import layering\n"
            "from aptlayer.packages.sources import Source\n"
            "from aptlayer.store import Store\n"
            "store = Store.open(sys.argv[1])\n"
            "source = Source(uris=(sys.argv[2],), suites=('stable',), components=('main',), signed_by=(sys.argv[3],))\n"
            "layering.install(store, ['al-scripts'], sources=[source])\n")
    proc = subprocess.run([sys.executable, "-c", code, str(store.root), source.uris[0], source.signed_by[0]],
                          env=cli_env(APT_LAYER_FAULT="layer.after-apt"), capture_output=True, text=True)
    assert proc.returncode == KILLED, proc.stderr
    report = recover(store)
    assert any(a["kind"] == "recover.staging-unmounted" for a in report["actions"]), report
    assert any(a["kind"] == "mount.lost" for a in report["actions"]), report
    unchanged_since(store, ["base"], ("base", None))


def test_hello_from_the_debian_archive_runs_in_the_layered_image(store: Store, tmp_path: Path) -> None:
    """The host's own apt sources, through the command line: `apt-layer install hello`."""
    from crashkit import run_cli

    proc = run_cli(store.root, "install", "hello", "--json", check=False)
    if proc.returncode != 0 and ("Failed to fetch" in proc.stderr or "Could not resolve" in proc.stderr):
        pytest.skip(f"the Debian archive cannot be reached: {proc.stderr.strip()}")
    assert proc.returncode == 0, proc.stderr
    result = __import__("json").loads(proc.stdout)
    assert ("added", "hello") in {(c["change"], c["package"]) for c in result["changes"]}
    ran = in_chroot(store, result["image"], tmp_path, "/usr/bin/hello")
    assert ran.returncode == 0 and ran.stdout == "Hello, world!\n"
    status = run_cli(store.root, "status").stdout
    assert f"current: {result['image']}" in status and "LayeredPackages: hello" in status


@pytest.mark.parametrize("point", ["layer.after-mount", "layer.after-apt", "create.after-begin"])
def test_ctrl_c_during_an_install_leaves_the_store_as_it_was(store: Store, apt_repo, point: str) -> None:
    """SIGINT with the base mounted writable, after apt, or while building: exit 130, the store as it was."""
    import signal
    import sys

    from crashkit import cli_env

    source = apt_repo.source()
    code = ("import sys\n"
            "from aptlayer.cli import main\n"
            "from aptlayer import layering\n"
            "from aptlayer.packages.sources import Source\n"
            "source = Source(uris=(sys.argv[2],), suites=('stable',), components=('main',), signed_by=(sys.argv[3],))\n"
            "real = layering.install\n"
            "layering.install = lambda store, specs, **kw: real(store, specs, **{**kw, 'sources': [source]})\n"
            "sys.exit(main(['--root', sys.argv[1], '-q', 'install', 'al-scripts']))\n")
    proc = subprocess.Popen([sys.executable, "-c", code, str(store.root), source.uris[0], source.signed_by[0]],
                            env=cli_env(APT_LAYER_PAUSE=point), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    _, status = os.waitpid(proc.pid, os.WUNTRACED)
    assert os.WIFSTOPPED(status), status
    os.kill(proc.pid, signal.SIGINT)
    os.kill(proc.pid, signal.SIGCONT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    unchanged_since(store, ["base"], ("base", None))
    assert [m for m in inventory.mounts(store) if m["state"] == "mounted"] == []


def test_a_local_deb_is_kept_in_the_store_and_replayed_by_the_request(store: Store, apt_repo) -> None:
    import hashlib

    deb = apt_repo.deb("al-lib")
    result = layering.install(store, [str(deb)], sources=[apt_repo.source()])
    digest = hashlib.sha256(deb.read_bytes()).hexdigest()
    assert layering.lineage_of(store, result["image"]).request.install == (f"deb:{digest}",)
    assert (store.root / "cache" / "debs" / f"{digest}.deb").read_bytes() == deb.read_bytes()
    assert ("added", "al-lib") in {(c["change"], c["package"]) for c in result["changes"]}
    again = layering.install(store, ["al-app"], sources=[apt_repo.source()])  # the .deb replayed from the store
    assert layering.lineage_of(store, again["image"]).request.install == (f"deb:{digest}", "al-app")


def test_the_configured_apt_dir_gives_the_sources_of_an_install(store: Store, apt_repo, tmp_path: Path) -> None:
    """`[apt] dir` in config.toml: its sources.list.d, not the host's, and its lists' maximum age."""
    import json

    from crashkit import run_cli

    etc = tmp_path / "apt"
    (etc / "sources.list.d").mkdir(parents=True)
    (etc / "sources.list.d" / "test.sources").write_text(
        f"Types: deb\nURIs: {apt_repo.uri}\nSuites: stable\nComponents: main\nSigned-By: {apt_repo.keyring}\n")
    config = tmp_path / "config.toml"
    config.write_text(f'[apt]\ndir = "{etc}"\nlists_max_age_seconds = 0\n')
    proc = run_cli(store.root, "--config", str(config), "install", "al-lib", "--json")
    assert ("added", "al-lib") in {(c["change"], c["package"]) for c in json.loads(proc.stdout)["changes"]}
    stamp = store.root / "cache" / "apt" / apt.LISTS_STAMP
    fetched = stamp.stat().st_mtime_ns
    run_cli(store.root, "--config", str(config), "install", "al-conf", "--json")
    assert stamp.stat().st_mtime_ns > fetched  # lists at most 0 s old: fetched again


@pytest.mark.parametrize("table, error", [
    ("dir = \"apt\"", "apt.dir: must be an absolute path"),
    ("lists_max_age_seconds = -1", "apt.lists_max_age_seconds: must be a whole number >= 0"),
    ("sources = \"/etc/apt\"", "apt: a table with the keys 'dir' and 'lists_max_age_seconds'"),
])
def test_a_bad_apt_setting_is_refused_with_its_key(tmp_path: Path, table: str, error: str) -> None:
    from aptlayer import config

    path = tmp_path / "config.toml"
    path.write_text(f"[apt]\n{table}\n")
    with pytest.raises(errors.InvalidInput, match=error):
        config.load(path)
