"""Which deployment this boot runs: the initramfs's report, journaled once per boot.

The initramfs script leaves ``/run/apt-layer/booted`` (``KEY=VALUE`` lines,
docs/boot.md): ``deploy`` (what the kernel command line asked for),
``image`` (what it mounted), ``store`` (the store's path on the physical
root) and, when a current deployment used up its tries and the previous one
was booted instead, ``fallback_from`` and ``tries``. ``recover --boot``
turns it into a ``booted`` event (with the image's digest, the kernel
release and the boot id); after a fallback it also rolls back, so that the
deployment that runs is the current one again and the one that failed is
the previous one.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ..journal import Event, kinds
from ..store import Store

#: what the initramfs leaves for ``recover --boot`` (``/run`` moves into the booted system)
BOOTED_FILE = Path("/run/apt-layer/booted")
#: where the initramfs puts the physical root in the booted system
SYSROOT = Path("/sysroot")


@dataclass(frozen=True)
class BootReport:
    """The initramfs's report of one boot."""

    deploy: str
    image: str
    store: str
    fallback_from: str | None = None
    tries: int | None = None

    @classmethod
    def read(cls, path: Path = BOOTED_FILE) -> BootReport | None:
        """The report, or None when this boot did not come from a deployment (or it is unreadable)."""
        try:
            text = path.read_text()
        except (FileNotFoundError, NotADirectoryError, UnicodeDecodeError):
            return None
        fields = dict(line.split("=", 1) for line in text.splitlines() if "=" in line)
        if not all(fields.get(key) for key in ("deploy", "image", "store")):
            return None
        tries = fields.get("tries", "")
        return cls(deploy=fields["deploy"], image=fields["image"], store=fields["store"],
                   fallback_from=fields.get("fallback_from") or None,
                   tries=int(tries) if tries.isdigit() else None)

    def is_of(self, store: Store, sysroot: Path = SYSROOT) -> bool:
        """Whether the booted image came from ``store`` (seen at ``sysroot`` + its path)."""
        try:
            return os.path.samefile(f"{sysroot}{self.store}", store.root)
        except OSError:
            return False


def this_boot(store: Store) -> Event | None:
    """The ``booted`` event of the running boot, if recorded."""
    for ev in store.journal.events(kind="booted", newest_first=True, limit=20):
        if ev.typed().boot_id == store.boot_id:
            return ev
    return None


def record(store: Store, report: BootReport) -> dict:
    """Journal ``report`` (once per boot id), rolling back after a fallback; returns what it did."""
    recorded = this_boot(store)
    if recorded is not None:
        return {"image": recorded.subject, "recorded": False}
    image = store.journal.image(report.image)
    if image is None:
        return {"image": report.image, "recorded": False,
                "problem": f"the booted image {report.image} is not a live image of this store"}
    with store.writing():
        store.record(kinds.Booted(subject=report.image, digest=image.digest, deploy=report.deploy,
                                  kernel=os.uname().release, boot_id=store.boot_id,
                                  fallback_from=report.fallback_from, tries=report.tries))
    result = {"image": report.image, "recorded": True, "deploy": report.deploy}
    if report.fallback_from:
        deps = store.journal.deployments()
        current, previous = deps.get("current"), deps.get("previous")
        if current is not None and previous is not None and \
                (current.image, previous.image) == (report.fallback_from, report.image):
            store.rollback()
            result["rolled_back_from"] = report.fallback_from
    return result


def booted(store: Store) -> dict | None:
    """The deployment this boot runs (``status``): image, digest, what was asked, any fallback."""
    ev = this_boot(store)
    if ev is None:
        return None
    body = ev.typed()
    out = {"image": ev.subject, "digest": body.digest, "deploy": body.deploy, "kernel": body.kernel}
    if body.fallback_from:
        out["fallback_from"] = body.fallback_from
    return out


def record_boot(store: Store, path: Path = BOOTED_FILE, sysroot: Path = SYSROOT) -> dict | None:
    """Journal what the initramfs booted from this store (``recover --boot``); None if nothing."""
    report = BootReport.read(path)
    if report is None or not report.is_of(store, sysroot):
        return None
    return record(store, report)
