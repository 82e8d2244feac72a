"""What an image is built from: a directory tree, a composefs-dump(5) file, or a base image
with an overlay's upper directory over it, or a tree already read (an OCI image's layers).

A source checks that it exists before any work starts (a missing source is
NotFound, not a build failure) and says which strategies can build it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from .. import errors
from ..composefs.tree import Node


@dataclass(frozen=True)
class DirectorySource:
    """A directory tree, read like ``mkcomposefs DIR``: walked, hashed, its files imported."""

    path: str

    def check(self) -> None:
        if not os.path.exists(self.path):
            raise errors.NotFound(f"source {self.path}: no such directory")
        if not os.path.isdir(self.path):  # it exists, so the input is wrong, not missing
            raise errors.InvalidInput(f"source {self.path}: not a directory (for a composefs-dump(5) file, "
                                      "pass --from-file)")

    @property
    def recorded_as(self) -> str:
        return os.path.abspath(self.path)


@dataclass(frozen=True)
class DumpSource:
    """A composefs-dump(5) file (``-`` for standard input); its objects must be in the store already."""

    path: str

    def check(self) -> None:
        if self.path != "-" and not os.path.exists(self.path):
            raise errors.NotFound(f"source {self.path}: no such file")

    @property
    def recorded_as(self) -> str:
        return os.path.abspath(self.path)


@dataclass(frozen=True)
class LayeredSource:
    """A base image file and the upper directory of a writable mount of it (unmounted by now).

    Built as the merged view would scan, reading only what the upper
    directory holds (:mod:`aptlayer.composefs.upper`).
    """

    base_image: str
    upper: str

    def check(self) -> None:
        if not os.path.isfile(self.base_image):
            raise errors.NotFound(f"base image {self.base_image}: no such file")
        if os.path.islink(self.upper) or not os.path.isdir(self.upper):
            raise errors.NotFound(f"upper directory {self.upper}: not a directory" if os.path.lexists(self.upper)
                                  else f"upper directory {self.upper}: no such directory")

    @property
    def recorded_as(self) -> str:
        return os.path.abspath(self.upper)


@dataclass(frozen=True, eq=False)
class TreeSource:
    """A tree already read, whose objects are in the digest store: the layers of a pulled image, applied.

    With ``expect``, the image must come out with that digest (what the
    pushed image's manifest says it was), or the build fails and nothing is
    recorded.
    """

    root: Node
    recorded_as: str
    expect: str | None = None

    def check(self) -> None:
        pass


Source = DirectorySource | DumpSource | LayeredSource | TreeSource


def source_for(path: str, from_file: bool) -> Source:
    """The source ``image create`` names, checked."""
    source = DumpSource(path) if from_file else DirectorySource(path)
    source.check()
    return source
