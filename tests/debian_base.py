"""A small real Debian base for the package tests, made once per machine.

A bookworm minbase bootstrapped with mmdebstrap (through
aptlayer.packages.bootstrap) from the archive the host's apt uses, kept
outside the repository in ``/var/cache/apt-layer-tests/`` (or
``$APT_LAYER_TEST_CACHE``) as ``SUITE-VARIANT-DATE.tar``, DATE being the
``Date`` of the archive's Release for the suite: a new point release makes
a new base, and the older tarball of the same suite and variant goes.
Offline, the newest cached tarball is used; with none, :class:`Unavailable`
says why (the tests skip with that reason).

The tarball is also extracted once next to it (``.root``); each test gets a
writable overlay mount over that tree (a fresh copy where overlayfs cannot
be mounted), so a test's changes never reach the cache.
"""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import subprocess
import urllib.request
from collections.abc import Callable
from email.utils import parsedate_to_datetime
from pathlib import Path

from aptlayer.packages.bootstrap import BootstrapRequest, bootstrap
from aptlayer.packages.sources import archive_uri, read_sources

CACHE = Path(os.environ.get("APT_LAYER_TEST_CACHE", "/var/cache/apt-layer-tests"))
SUITE = "bookworm"
VARIANT = "minbase"


class Unavailable(Exception):
    """The base cannot be had here; the message is the skip reason."""


def release_date(uri: str, suite: str) -> str:
    """The Release ``Date`` of *suite* at *uri*, as YYYYMMDDTHHMMSSZ."""
    with urllib.request.urlopen(f"{uri.rstrip('/')}/dists/{suite}/InRelease", timeout=20) as response:
        for _, raw in zip(range(100), response):  # the fields come first, Date among them
            line = raw.decode("utf-8", "replace")
            if line.startswith("Date:"):
                return parsedate_to_datetime(line[5:].strip()).strftime("%Y%m%dT%H%M%SZ")
    raise Unavailable(f"{uri} {suite}: InRelease has no Date field")


def _cached(suite: str, variant: str) -> list[Path]:
    pattern = re.compile(rf"^{re.escape(suite)}-{re.escape(variant)}-\d{{8}}T\d{{6}}Z\.tar$")
    return sorted(p for p in CACHE.glob(f"{suite}-{variant}-*.tar") if pattern.match(p.name))


def base_tarball(suite: str = SUITE, variant: str = VARIANT) -> Path:
    """The cached base tarball, made first if the archive has a newer Release."""
    if os.geteuid() != 0:
        raise Unavailable("making the Debian test base needs root")
    if shutil.which("mmdebstrap") is None:
        raise Unavailable("mmdebstrap is not installed (tools/setup.sh installs it)")
    try:
        CACHE.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise Unavailable(f"cannot create the test cache {CACHE}: {exc.strerror}") from None
    try:
        uri = archive_uri(read_sources(), suite)
    except Exception as exc:  # no usable host sources: the reason is the skip message
        raise Unavailable(f"no Debian archive in the host's apt sources: {exc}") from None
    with open(CACHE / "lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # other test runs on this machine wait, then reuse
        try:
            date = release_date(uri, suite)
        except (OSError, ValueError) as exc:
            cached = _cached(suite, variant)
            if cached:
                return cached[-1]
            raise Unavailable(f"the archive is unreachable and no base is cached: {exc}") from None
        tarball = CACHE / f"{suite}-{variant}-{date}.tar"
        if not tarball.exists():
            try:
                bootstrap(BootstrapRequest(suite=suite, variant=variant), tarball)
            except Exception as exc:
                raise Unavailable(f"mmdebstrap could not make the base: {exc}") from None
            for old in _cached(suite, variant):
                if old != tarball:
                    shutil.rmtree(old.with_suffix(".root"), ignore_errors=True)
                    old.unlink()
        return tarball


def base_tree(suite: str = SUITE, variant: str = VARIANT) -> Path:
    """The cached base, extracted once (read-only use: tests mount over it)."""
    tarball = base_tarball(suite, variant)
    tree = tarball.with_suffix(".root")
    done = tree / ".apt-layer-tests-complete"
    with open(CACHE / "lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not done.exists():
            shutil.rmtree(tree, ignore_errors=True)
            tree.mkdir()
            subprocess.run(["tar", "-xf", str(tarball), "-C", str(tree), "--numeric-owner",
                            "--xattrs", "--xattrs-include=*"], check=True)
            done.touch()
    return tree


def writable_root(lower: Path, work: Path) -> tuple[Path, Callable[[], None]]:
    """A writable view of *lower* under *work*: (root, cleanup).

    An overlay mount where the kernel allows it (milliseconds), otherwise a
    copy with ``cp -a`` (a few seconds).
    """
    root, upper, scratch = work / "root", work / "upper", work / "work"
    for d in (root, upper, scratch):
        d.mkdir(parents=True)
    options = f"lowerdir={lower},upperdir={upper},workdir={scratch}"
    mounted = subprocess.run(["mount", "-t", "overlay", "overlay", "-o", options, str(root)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode == 0
    if mounted:
        def cleanup() -> None:
            if subprocess.run(["umount", str(root)], stderr=subprocess.DEVNULL).returncode != 0:
                subprocess.run(["umount", "-l", str(root)], check=False)
        return root, cleanup
    root.rmdir()
    subprocess.run(["cp", "-a", "--reflink=auto", str(lower), str(root)], check=True)
    (root / ".apt-layer-tests-complete").unlink(missing_ok=True)
    return root, lambda: None
