"""The kernel requirement: `deploy` refuses an image whose kernels cannot mount
it (Linux < 6.5: no overlayfs data-only lower layers), and `apt-layer check`
reports what the running kernel supports."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO

from aptlayer import errors
from aptlayer import bootable
from aptlayer.boot import kernel
from aptlayer.store import Store


def image_with_kernels(store: Store, tmp_path: Path, name: str, releases: list[str]) -> None:
    tree = tmp_path / name
    (tree / "usr/lib/modules").mkdir(parents=True)
    (tree / "etc").mkdir()
    for release in releases:
        (tree / "usr/lib/modules" / release / "kernel").mkdir(parents=True)
    store.create(str(tree), name)


def test_versions() -> None:
    assert bootable.version("6.12.57+deb13-amd64") == (6, 12)
    assert bootable.version("6.1.0-28-amd64") == (6, 1)
    assert bootable.version("vmlinuz") is None


def test_deploy_refuses_an_image_whose_kernels_are_all_too_old(store: Store, tmp_path: Path) -> None:
    image_with_kernels(store, tmp_path, "bookworm", ["6.1.0-28-amd64"])
    with pytest.raises(errors.Unsupported, match=r"image bookworm boots Linux 6\.1\.0-28-amd64, which cannot mount "
                                                 r"it: overlayfs data-only lower layers need Linux 6\.5 or newer"):
        store.deploy("bookworm")
    assert store.journal.deployments() == {}
    assert not store.layout.link("current").exists()
    # One new enough kernel is enough; an image without kernels boots the host's.
    image_with_kernels(store, tmp_path, "backports", ["6.1.0-28-amd64", "6.12.12+bpo-amd64"])
    image_with_kernels(store, tmp_path, "nokernel", [])
    store.deploy("backports")
    store.deploy("nokernel")
    assert bootable.image_kernels(store.image_path("backports")) == ["6.1.0-28-amd64", "6.12.12+bpo-amd64"]


def test_the_refusal_is_exit_9_with_the_message(store: Store, tmp_path: Path) -> None:
    image_with_kernels(store, tmp_path, "old", ["6.1.0-28-amd64"])
    r = subprocess.run([sys.executable, "-m", "aptlayer", "--root", str(store.root), "deploy", "old"],
                       capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert r.returncode == 9 and "need Linux 6.5 or newer" in r.stderr and r.stderr.count("\n") == 1


def test_check_reports_the_running_kernel(tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, "-m", "aptlayer", "check", "--json"], capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": str(REPO)})
    report = json.loads(r.stdout)
    assert report["kernel"] == os.uname().release
    names = [f["feature"] for f in report["features"]]
    assert {"erofs", "overlay", "overlay data-only lower layers", "fs-verity",
            "new mount API (fsopen, fsmount, move_mount)", "idmapped mounts of overlay layers"} <= set(names)
    assert r.returncode == (0 if report["mountable"] else 9)


def test_check_of_an_old_kernel_says_why_it_cannot_mount() -> None:
    report = kernel.check("6.1.0-28-amd64")
    assert report["mountable"] is False and report["problem"] == bootable.TOO_OLD
    assert {f["feature"]: f["supported"] for f in report["features"]}["overlay data-only lower layers"] is False
    assert kernel.check("6.12.57+deb13-amd64", Path("/nonexistent"))["features"][2]["supported"] is True
