"""What a store keeps of the OCI images it pulled, under ``cache/oci/`` (safe to delete: it only saves transfers).

::

    cache/oci/layers/HEX.json   the entries a layer gave (objects by digest, small
                                files inline), by the layer's sha256: a layer
                                read once is never read again while its
                                objects are in the store
    cache/oci/blobs/sha256/HEX  blobs fetched from registries (skopeo's shared
                                blob folder): a blob here is not fetched again,
                                so an interrupted pull resumes where it stopped
    cache/oci/pulled/NAME.json  the blobs of the image pulled as NAME: after a
                                pull, blobs of no live pulled image are removed,
                                so the cache holds the last version of each
    cache/oci/lock              pulls hold it shared; the removal takes it
                                exclusively, and only when no pull runs (a
                                blob another pull just fetched is not yet
                                listed by any image)
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable
from pathlib import Path

from ..composefs.objectstore import ObjectStore
from ..linux import fsops
from ..lock import LockTimeout, locked
from .layout import check_digest


class PullCache:
    def __init__(self, path: Path):
        self.path = path
        self.blobs = path / "blobs"
        self.layers = path / "layers"
        self.pulled = path / "pulled"
        self.lock = path / "lock"

    def prepare(self) -> None:
        for d in (self.path, self.blobs, self.blobs / "sha256", self.layers, self.pulled):
            if d.is_symlink():
                raise OSError(f"{d} is a symlink: apt-layer never follows a symlink inside its store")
            d.mkdir(mode=0o755, parents=True, exist_ok=True)

    def _layer_file(self, digest: str) -> Path:
        return self.layers / (check_digest(digest)[len("sha256:"):] + ".json")

    def entries(self, digest: str, objects: ObjectStore) -> list[dict] | None:
        """The entries layer ``digest`` gave, if known and every object they name is still in the store."""
        try:
            entries = json.loads(self._layer_file(digest).read_bytes())
        except (OSError, ValueError):
            return None
        if not isinstance(entries, list):
            return None
        for e in entries:
            if "object" in e and not objects.claim(bytes.fromhex(e["object"]), e["size"]):
                return None
        return entries

    def keep(self, digest: str, entries: list[dict]) -> None:
        fsops.write_file_atomic(self._layer_file(digest), json.dumps(entries, separators=(",", ":")).encode())

    def blob_sizes(self) -> dict[str, int]:
        """The blobs fetched so far and their sizes."""
        found = {}
        for entry in os.scandir(self.blobs / "sha256"):
            if entry.is_file(follow_symlinks=False) and not entry.name.startswith("."):
                found["sha256:" + entry.name] = entry.stat(follow_symlinks=False).st_size
        return found

    def remember(self, name: str, blobs: Iterable[str]) -> None:
        fsops.write_file_atomic(self.pulled / f"{name}.json", json.dumps(sorted(blobs)).encode())

    def prune(self, live: Callable[[str], bool]) -> int:
        """Remove fetched blobs that no live pulled image lists, unless a pull runs; returns how many went."""
        try:
            with locked(self.lock, exclusive=True, timeout=0):
                return self._prune(live)
        except LockTimeout:
            return 0

    def _prune(self, live: Callable[[str], bool]) -> int:
        keep: set[str] = set()
        for entry in os.scandir(self.pulled):
            name = entry.name.removesuffix(".json")
            if not live(name):
                os.unlink(entry.path)
                continue
            try:
                keep.update(json.loads(Path(entry.path).read_bytes()))
            except (OSError, ValueError):
                continue
        removed = 0
        for digest in self.blob_sizes():
            if digest not in keep:
                os.unlink(self.blobs / "sha256" / digest[len("sha256:"):])
                removed += 1
        return removed

