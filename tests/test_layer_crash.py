"""`apt-layer install` killed (SIGKILL) at every fault point it passes, then recovered.

As tests/test_crash.py does for the store's operations: the points are
discovered with ``APT_LAYER_FAULT_LOG`` on a copy of the store, then each is
hit (its first hit) in a fresh copy with ``APT_LAYER_FAULT``; a real
``apt-layer recover`` runs and invariants 1-5 of ``tests/crashkit.py`` must
hold. Among the points are the layering's own: ``layer.after-mount`` (the
base mounted writable in staging, nothing installed yet) and
``layer.after-apt`` (dpkg done in the upper directory, no image yet).

The store uses the test repository through ``[apt] dir`` in a
configuration file, as an administrator would point it at other sources.
A layered build is not reproducible to the byte (dpkg stamps its database
with the time), so atomicity is checked on what users see by name: the
images and deployments before the install, or those a run to the end left.
"""

from __future__ import annotations

import json
import shutil
import sqlite3
from contextlib import closing
from pathlib import Path

import pytest

from crashkit import check_store, fault_points, kill_at, run_cli

pytestmark = pytest.mark.root

#: the layering's own points, which the install must pass
LAYER_POINTS = {"layer.after-mount", "layer.after-apt"}


@pytest.fixture(scope="module")
def layered_template(tmp_path_factory, debian_base_tree: Path, apt_repo) -> dict:
    """A store with the minbase deployed, al-lib layered once (the apt cache warm), and its configuration."""
    base = tmp_path_factory.mktemp("layer-crash")
    etc = base / "apt"
    (etc / "sources.list.d").mkdir(parents=True)
    (etc / "sources.list.d" / "test.sources").write_text(
        f"Types: deb\nURIs: {apt_repo.uri}\nSuites: stable\nComponents: main\nSigned-By: {apt_repo.keyring}\n")
    config = base / "config.toml"
    config.write_text(f'[apt]\ndir = "{etc}"\n')
    root = base / "template"
    run_cli(root, "image", "create", str(debian_base_tree), "base", "--backend", "python")
    run_cli(root, "deploy", "base")
    run_cli(root, "--config", str(config), "install", "al-lib", "--no-deploy")
    return {"root": root, "base": base, "config": config}


def _copy(src: Path, dst: Path) -> Path:
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst, symlinks=True)
    return dst


def seen_by_name(root: Path) -> tuple:
    """What users see, by name: the live images and the deployments."""
    with closing(sqlite3.connect(root / "journal.db")) as conn:
        return (tuple(r[0] for r in conn.execute("SELECT name FROM images ORDER BY name")),
                tuple(conn.execute("SELECT slot, image FROM deployments ORDER BY slot")))


def kill_install_at(template: dict, only: set[str] | None = None) -> dict[str, list[str]]:
    """Kill the install at each point it passes (or those of ``only``), recover, check: the failures by point."""
    base, start = template["base"], template["root"]
    args = ("--config", str(template["config"]), "install", "al-scripts")
    probe = _copy(start, base / "probe")
    points = fault_points(probe, *args, log=base / "fault.log")
    assert LAYER_POINTS <= points.keys(), points
    outcomes = {seen_by_name(start), seen_by_name(probe)}
    failures = {}
    for point in sorted(points.keys() & only if only is not None else points):
        root = _copy(start, base / "case")
        kill_at(root, point, 1, *args)
        recovered = run_cli(root, "recover", "--json", check=False)
        assert recovered.returncode in (0, 10), recovered.stderr
        problems = check_store(root, json.loads(recovered.stdout))
        if seen_by_name(root) not in outcomes:
            problems.append(f"neither before nor after: {seen_by_name(root)}")
        if list((root / "staging").iterdir()):
            problems.append(f"staging not emptied: {sorted(p.name for p in (root / 'staging').iterdir())}")
        if problems:
            failures[point] = problems
    print(f"install: {len(points)} fault points: {dict(points)}")
    return failures


def test_an_install_killed_at_the_layering_points_is_recovered(layered_template: dict, kernel: None) -> None:
    """Killed with the base mounted writable in staging, before and after apt: recovery unmounts and drops it."""
    assert kill_install_at(layered_template, LAYER_POINTS) == {}


@pytest.mark.slow
def test_an_install_killed_at_every_point_is_recovered(layered_template: dict, kernel: None) -> None:
    """Every point of an install (16 on this kernel; about 6 minutes): `pytest -m slow`."""
    assert kill_install_at(layered_template) == {}


@pytest.mark.slow
def test_torture_with_layering(tmp_path: Path, kernel: None, debian_base_tree: Path) -> None:
    """tools/torture.py --layer: installs and uninstalls killed at random and at the layering's points (~2 min)."""
    import subprocess
    import sys

    from crashkit import REPO, cli_env

    proc = subprocess.run([sys.executable, str(REPO / "tools" / "torture.py"), "--layer", "--iterations", "16",
                           "--seed", "3", "--json", "--workdir", str(tmp_path)],
                          env=cli_env(), capture_output=True, text=True, timeout=900)
    result = json.loads(proc.stdout)
    assert result["failures"] == [] and proc.returncode == 0, proc.stdout
    assert {"layer.after-mount", "layer.after-apt"} <= result["killed_at_points"].keys(), result
