"""What booted: the initramfs's report becomes a `booted` event once per boot,
a fallback rolls back, `status` marks the running deployment, and `boot
complete` ends the counting of tries (aptlayer.boot). The report is written
here as the initramfs script writes it (tests/test_vm.py boots the real one)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO

from aptlayer.boot import booted, counting
from aptlayer.store import Store


@pytest.fixture
def machine(tmp_path: Path):
    """A physical root at ``sysroot`` whose store has ``one`` and ``two`` deployed (two current)."""
    sysroot = tmp_path / "sysroot"
    tree = tmp_path / "tree"
    (tree / "etc").mkdir(parents=True)
    store = Store.open(sysroot / "var/lib/apt-layer")
    for name in ("one", "two"):
        (tree / "etc" / "release").write_text(f"{name}\n")
        store.create(str(tree), name)
    store.deploy("one")
    store.deploy("two")
    yield store, sysroot, tmp_path / "run-booted"
    store.close()


def report(path: Path, **fields: str) -> Path:
    path.write_text("".join(f"{key}={value}\n" for key, value in fields.items()))
    return path


def test_the_boot_is_journaled_once_with_digest_kernel_and_boot_id(machine) -> None:
    store, sysroot, run = machine
    report(run, deploy="current", image="two", store="/var/lib/apt-layer")
    assert booted.record_boot(store, run, sysroot) == {"image": "two", "recorded": True, "deploy": "current"}
    assert booted.record_boot(store, run, sysroot) == {"image": "two", "recorded": False}  # recover runs again
    events = list(store.journal.events(kind="booted"))
    assert len(events) == 1
    ev = events[0]
    assert ev.subject == "two"
    assert ev.data == {"digest": store.journal.image("two").digest, "deploy": "current",
                       "kernel": os.uname().release, "boot_id": store.boot_id}
    assert booted.booted(store) == {"image": "two", "digest": ev.data["digest"], "deploy": "current",
                                    "kernel": os.uname().release}


def test_no_report_or_another_stores_report_records_nothing(machine, tmp_path: Path) -> None:
    store, sysroot, run = machine
    assert booted.record_boot(store, run, sysroot) is None  # the physical root booted
    report(run, deploy="current", image="two", store="/srv/other-store")
    assert booted.record_boot(store, run, sysroot) is None
    report(run, deploy="current", image="two")  # no store: not the initramfs's
    assert booted.record_boot(store, run, sysroot) is None
    assert list(store.journal.events(kind="booted")) == []


def test_a_booted_image_the_store_does_not_know_is_a_problem(machine) -> None:
    store, sysroot, run = machine
    report(run, deploy="gone", image="gone", store="/var/lib/apt-layer")
    result = booted.record_boot(store, run, sysroot)
    assert result["recorded"] is False and "not a live image" in result["problem"]


def test_a_fallback_is_journaled_with_why_and_rolls_back(machine) -> None:
    store, sysroot, run = machine
    report(run, deploy="current", image="one", store="/var/lib/apt-layer", fallback_from="two", tries="3")
    result = booted.record_boot(store, run, sysroot)
    assert result["rolled_back_from"] == "two"
    (ev,) = store.journal.events(kind="booted")
    assert (ev.subject, ev.data["fallback_from"], ev.data["tries"]) == ("one", "two", 3)
    deps = store.journal.deployments()
    assert (deps["current"].image, deps["previous"].image) == ("one", "two")
    assert os.readlink(store.layout.link("current")) == "../images/one.composefs"
    # Recorded once: a second recover --boot neither records nor rolls back again.
    booted.record_boot(store, run, sysroot)
    assert store.journal.deployments()["current"].image == "one"


def _cli(store: Store, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "aptlayer", "--root", str(store.root), *args],
                          capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})


def test_status_marks_the_booted_deployment_apart_from_the_next_boot(machine) -> None:
    store, sysroot, run = machine
    report(run, deploy="previous", image="one", store="/var/lib/apt-layer")
    booted.record_boot(store, run, sysroot)
    out = _cli(store, "status").stdout
    assert "  current: two\n" in out and "● previous: one (booted)\n" in out
    assert "Booted: one (apt-layer.deploy=previous)\nNext boot mounts: two\n" in out
    info = json.loads(_cli(store, "status", "--json").stdout)
    assert info["booted"]["image"] == "one" and info["next_boot"] == "two"


def test_boot_complete_marks_the_image_good_and_stops_the_counting(machine) -> None:
    store, sysroot, run = machine
    attempts = store.layout.boot / "attempts"
    assert counting.complete(store)["good"] is None  # no booted event: nothing to mark
    attempts.write_text("two 2\n")  # as the initramfs counts
    report(run, deploy="current", image="two", store="/var/lib/apt-layer")
    booted.record_boot(store, run, sysroot)
    r = _cli(store, "boot", "complete", "--json")
    assert json.loads(r.stdout) == {"good": "two", "changed": True}
    assert (store.layout.boot / "good").read_text() == "two\n"
    assert not attempts.exists()
    assert json.loads(_cli(store, "boot", "complete", "--json").stdout) == {"good": "two", "changed": False}


def test_audit_answers_what_ran_at_a_time(machine) -> None:
    """docs/boot.md's query: the last `booted` event at or before T."""
    store, sysroot, run = machine
    report(run, deploy="current", image="two", store="/var/lib/apt-layer")
    booted.record_boot(store, run, sysroot)
    (ev,) = store.journal.events(kind="booted")
    query = ("SELECT subject AS image, digest FROM v_events WHERE kind = 'booted' AND at <= '{}' "
             "ORDER BY seq DESC LIMIT 1")
    r = _cli(store, "audit", "--json", query.format(ev.at))
    assert [(row["image"], row["digest"]) for row in json.loads(r.stdout)] == [("two", ev.data["digest"])]
    r = _cli(store, "audit", "--json", query.format("2000-01-01"))
    assert json.loads(r.stdout) == []
