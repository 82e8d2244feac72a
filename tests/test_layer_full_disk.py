"""`apt-layer install` on a store whose file system fills up: exit 8, and the store as it was.

The store lives on a size-limited tmpfs holding the bookworm minbase; a
filler file leaves a few MiB free, and ``al-big`` (an 8 MiB file, a .deb of
about 4.5 MiB) runs out of space at each step that writes: apt's download
into the store's cache, dpkg's unpacking into the upper directory in
staging, and the build's import of the new object into the digest store.
"""

from __future__ import annotations

import gc
import os
import subprocess
import sys
from pathlib import Path

import pytest

from aptlayer.builder import CreateOptions
from aptlayer.maintenance import Maintenance
from aptlayer.store import Store

from crashkit import cli_env
from test_layering import deployed, unchanged_since

pytestmark = pytest.mark.root

MIB = 1 << 20
BIG_FILE = "/usr/share/al-big/blob"
#: what the CLI runs: `apt-layer install` with the test repository as the apt sources
INSTALL = ("import sys\n"
           "from aptlayer.cli import main\n"
           "from aptlayer import layering\n"
           "from aptlayer.packages.sources import Source\n"
           "source = Source(uris=(sys.argv[2],), suites=('stable',), components=('main',), signed_by=(sys.argv[3],))\n"
           "real = layering.install\n"
           "layering.install = lambda store, specs, **kw: real(store, specs, **{**kw, 'sources': [source]})\n"
           "sys.exit(main(['--root', sys.argv[1], '-q', 'install', *sys.argv[4:]]))\n")


@pytest.fixture(scope="module")
def big_repo(tmp_path_factory):
    from aptrepo import AptRepo, Pkg

    blob = os.urandom(4 * MIB).hex()  # 8 MiB that gzip cannot make much smaller
    return AptRepo.build(tmp_path_factory.mktemp("big-repo") / "repo", [Pkg("al-big", files={BIG_FILE: blob})])


@pytest.fixture
def small_store(tmp_path: Path, debian_base_tree: Path, kernel: None):
    """A store with the minbase deployed, on a tmpfs of its own (sized to fit it, with room to spare)."""
    fs = tmp_path / "fs"
    fs.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=640m,mode=0755", "apt-layer-full-disk", str(fs)], check=True)
    try:
        store = Store.open(fs / "store")
        store.create(str(debian_base_tree), "base", CreateOptions(backend="python"))
        store.deploy("base")
        yield store
        store.close()
    finally:
        gc.collect()
        subprocess.run(["umount", "--lazy", str(fs)], check=True)


def install(store: Store, repo, *specs: str) -> subprocess.CompletedProcess:
    source = repo.source()
    return subprocess.run([sys.executable, "-c", INSTALL, str(store.root), source.uris[0], source.signed_by[0],
                           *specs], env=cli_env(), capture_output=True, text=True)


def leave_free(store: Store, free: int) -> None:
    """Fill the store's file system up to ``free`` bytes left."""
    st = os.statvfs(store.root)
    have = st.f_bavail * st.f_frsize
    assert have > free + 64 * MIB, f"the tmpfs has only {have} bytes free"
    with open(store.root.parent / "filler", "wb") as f:
        os.posix_fallocate(f.fileno(), 0, have - free)


def warm_cache(store: Store, repo) -> None:
    """al-big downloaded into the store's cache once, its image and object gone again."""
    made = install(store, repo, "--no-deploy", "al-big")
    assert made.returncode == 0, made.stderr
    store.delete("base+1")
    Maintenance(store).gc(full=True)
    assert list((store.root / "cache/apt/archives").glob("al-big_*.deb"))


@pytest.mark.parametrize("step, warm, free, says", [
    ("download", False, 2 * MIB, "apt-layer: cannot install al-big: E: You don't have enough free space in "),
    ("dpkg unpack", True, 3 * MIB, "apt-layer: apt-get install in the new root failed: dpkg: error processing "
                                   f"archive /run/apt-layer/cache/archives/al-big_1.0_all.deb (--unpack): cannot copy "
                                   f"extracted data for '.{BIG_FILE}' to '{BIG_FILE}.dpkg-new': failed to write "
                                   "(No space left on device)"),
    ("object import", True, 12 * MIB, "apt-layer: creating image 'base+1': no space left on device"),
])
def test_an_install_that_fills_the_disk_exits_8_and_changes_nothing(small_store: Store, big_repo, step: str,
                                                                    warm: bool, free: int, says: str) -> None:
    if warm:
        warm_cache(small_store, big_repo)
    leave_free(small_store, free)
    failed = install(small_store, big_repo, "al-big")
    assert failed.returncode == 8, failed.stderr
    assert failed.stderr.startswith(says), failed.stderr  # the step that ran out, in apt's or dpkg's words
    unchanged_since(small_store, ["base"], ("base", None))  # no image, deployments, staging gone, verify clean
    # room again: the same install goes through, and nothing of the failed one is in the way
    os.unlink(small_store.root.parent / "filler")
    done = install(small_store, big_repo, "al-big")
    assert done.returncode == 0, done.stderr
    assert deployed(small_store)[0] != "base"
