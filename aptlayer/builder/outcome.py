"""What a build gives the Store to record, and what the builder asks of the store."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from ..composefs.lstatwalk import ScanStats


@dataclass(frozen=True)
class SameAs:
    """The manifest is the one already recorded for the image's digest."""


@dataclass(frozen=True)
class Delta:
    """The manifest of ``base`` without ``removed``, plus ``added`` (object, size) rows."""

    base: str
    removed: frozenset[str]
    added: tuple[tuple[str, int], ...]


@dataclass
class Outcome:
    """One built image, in staging, with what its event records."""

    staged: Path
    digest: str
    size: int
    #: (object, size) rows, or SameAs / Delta where the journal can derive them cheaply
    manifest: list[tuple[str, int]] | SameAs | Delta
    objects: int
    stats: ScanStats | None = None
    #: the live image whose bytes were reused (an unchanged tree)
    reused: str | None = None
    #: the live image that was patched, and how many entries changed
    patched_from: str | None = None
    #: the base image (digest) an upper directory was laid over
    layered_on: str | None = None
    #: entries changed: since the last build (patch), or in the upper directory (layered)
    changed: int = 0
    #: a layered image made by moving the base's inodes (composefs.relocate), not by rendering the merged tree
    relocated: bool = False

    def report(self, name: str, tx: str, staged: bool, missing: int) -> dict:
        """What ``image create`` reports of this build of image ``name`` (``missing``: objects the store lacks)."""
        info = {"name": name, "digest": self.digest, "size": self.size, "objects": self.objects,
                "objects_missing": missing, "tx": tx, "staged": staged, "reused": self.reused,
                "patched": self.provenance().get("patched")}
        if self.stats is not None:
            info.update(files=self.stats.files, bytes=self.stats.bytes,
                        objects_created=self.stats.objects_created, objects_deduped=self.stats.objects_deduped)
        return info

    def provenance(self) -> dict:
        """What the image's event says about how it was made (nothing for a plain render)."""
        if self.reused is not None:
            return {"reused": self.reused}
        if self.patched_from is not None:
            return {"patched": {"from": self.patched_from, "changed": self.changed}}
        if self.layered_on is not None:
            return {"layered": {"base": self.layered_on, "changed": self.changed, "relocated": self.relocated}}
        return {}


class Known(Protocol):
    """The three questions the builder asks of the store's journal (whose state queries answer them)."""

    def images_with_digest(self, digest: str) -> list[str]:
        """Names of the live images recorded with ``digest``."""

    def manifest_has(self, digest: str, obj: str) -> bool:
        """Whether the manifest recorded for ``digest`` lists the object ``obj``."""

    def manifest_objects(self, digest: str) -> int:
        """How many objects the manifest recorded for ``digest`` lists."""
