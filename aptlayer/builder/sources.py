"""What an image is built from: a directory tree or a composefs-dump(5) file.

A source checks that it exists before any work starts (a missing source is
NotFound, not a build failure) and says which strategies can build it. A
layered source (a base image plus an overlay's upper directory) and an OCI
source will be the next kinds.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from .. import errors


@dataclass(frozen=True)
class DirectorySource:
    """A directory tree, read like ``mkcomposefs DIR``: walked, hashed, its files imported."""

    path: str

    def check(self) -> None:
        if not os.path.isdir(self.path):
            raise errors.NotFound(f"source {self.path}: not a directory" if os.path.exists(self.path)
                                  else f"source {self.path}: no such directory")

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


Source = DirectorySource | DumpSource


def source_for(path: str, from_file: bool) -> Source:
    """The source ``image create`` names, checked."""
    source = DumpSource(path) if from_file else DirectorySource(path)
    source.check()
    return source
