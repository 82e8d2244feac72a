"""A new Debian base, made by mmdebstrap, into a directory or a tarball.

``apt-layer base bootstrap SUITE NAME`` starts here; the caller turns the
tree (or tarball) into an image. Without a mirror, the archive is the one
the host's apt sources name (sources.py), checked with the keyring those
sources name; nothing here knows a mirror host.

mmdebstrap runs in its ``unshare`` mode: the base's maintainer scripts run
as root of a user namespace, not as the host's root, and its own chroot
sees none of the host. The output appears only when mmdebstrap succeeded:
it writes to a temporary name next to the target, renamed into place at the
end and removed on failure (mmdebstrap itself leaves a partial tarball).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from ..errors import AptLayerError, InvalidInput, NoSpace, NotFound, Unsupported
from .sources import Source, archive_source, read_sources

MMDEBSTRAP = "mmdebstrap"
#: mmdebstrap's variants that make a root apt can work in
VARIANTS = ("essential", "required", "minbase", "buildd", "important", "standard", "apt")
TARBALL_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.xz", ".txz", ".tar.zst", ".tzst", ".tar.bz2")
_NAME = re.compile(r"^[a-z0-9][a-z0-9+.-]*$")
_SUITE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


class BootstrapFailed(AptLayerError):
    """mmdebstrap failed; ``lines`` holds its (and apt's) error lines."""

    def __init__(self, message: str, lines: list[str] | tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.lines = tuple(lines)


class SuiteNotFound(BootstrapFailed, NotFound):
    """The archive has no such suite (no Release file)."""


class ArchiveUnreachable(BootstrapFailed):
    """The archive could not be reached (no network, wrong host or port)."""


class BootstrapNoSpace(BootstrapFailed, NoSpace):
    """The disk filled up while the base was made."""


@dataclass(frozen=True)
class BootstrapRequest:
    """What ``base bootstrap`` asks for."""

    suite: str
    variant: str = "minbase"
    include: tuple[str, ...] = ()
    components: tuple[str, ...] = ("main",)
    mirror: str | None = None
    arch: str | None = None
    #: keyrings to check the archive with; by default those of the host's
    #: source for it (with an explicit mirror: apt's trusted keys)
    keyrings: tuple[Path, ...] = ()

    def validate(self) -> None:
        if not _SUITE.match(self.suite):
            raise InvalidInput(f"invalid suite {self.suite!r}")
        if self.variant not in VARIANTS:
            raise InvalidInput(f"unknown variant {self.variant!r}: one of {', '.join(VARIANTS)}")
        for name in self.include:
            if not _NAME.match(name):
                raise InvalidInput(f"invalid package name {name!r} in --include")
        for component in self.components:
            if not _SUITE.match(component):
                raise InvalidInput(f"invalid component {component!r}")
        if self.arch is not None and not re.match(r"^[a-z0-9-]+$", self.arch):
            raise InvalidInput(f"invalid architecture {self.arch!r}")


def is_tarball(target: Path) -> bool:
    return str(target).endswith(TARBALL_SUFFIXES)


def resolve_mirror(request: BootstrapRequest, sources: list[Source] | None = None) -> tuple[str, tuple[Path, ...]]:
    """The archive URI and the keyrings to check it with."""
    if request.mirror is not None:
        if not re.match(r"^(https?|file|copy|mirror\+\w+)://?", request.mirror):
            raise InvalidInput(f"--mirror {request.mirror!r} is not an http(s) or file URI")
        return request.mirror, request.keyrings
    source = archive_source(read_sources() if sources is None else sources, request.suite)
    keyrings = request.keyrings or tuple(Path(k) for k in source.keyring_files())
    return source.uris[0], keyrings


def command(request: BootstrapRequest, output: Path, sources: list[Source] | None = None) -> list[str]:
    """mmdebstrap's command line for *request*, writing *output*."""
    request.validate()
    mirror, keyrings = resolve_mirror(request, sources)
    argv = [MMDEBSTRAP, "--mode=unshare", f"--variant={request.variant}",
            f"--components={','.join(request.components)}"]
    if request.include:
        argv.append(f"--include={','.join(request.include)}")
    if request.arch:
        argv.append(f"--architectures={request.arch}")
    for keyring in keyrings:
        argv.append(f"--keyring={keyring}")
    argv += [request.suite, str(output), mirror]
    return argv


def bootstrap(request: BootstrapRequest, target: Path, *, sources: list[Source] | None = None) -> Path:
    """Make the base described by *request* at *target* (a new directory or a tarball).

    Returns *target*. Raises :class:`SuiteNotFound`, :class:`ArchiveUnreachable`
    or :class:`BootstrapFailed`, each quoting mmdebstrap and apt.
    """
    if shutil.which(MMDEBSTRAP) is None:
        raise Unsupported("mmdebstrap is not installed: apt-get install mmdebstrap")
    target = Path(target)
    if target.exists() or target.is_symlink():
        raise InvalidInput(f"{target} exists already")
    if not target.parent.is_dir():
        raise NotFound(f"{target.parent} is not a directory")
    # mmdebstrap picks the format from the name: keep the suffix on the temporary name
    temporary = target.with_name(f".{target.name}.partial-{os.getpid()}")
    if is_tarball(target):
        suffix = next(s for s in TARBALL_SUFFIXES if str(target).endswith(s))
        temporary = target.with_name(f".partial-{os.getpid()}-{target.name[:-len(suffix)]}{suffix}")
    argv = command(request, temporary, sources)
    try:
        result = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, check=False,
                                env={"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
                                     "LC_ALL": "C", "HOME": "/root"})
        if result.returncode != 0:
            raise _failure(request, result.stdout.decode("utf-8", "replace"))
        os.rename(temporary, target)
    finally:
        if temporary.is_dir() and not temporary.is_symlink():
            shutil.rmtree(temporary, ignore_errors=True)
        elif temporary.exists() or temporary.is_symlink():
            temporary.unlink()
    return target


def _failure(request: BootstrapRequest, output: str) -> BootstrapFailed:
    lines = [line.strip() for line in output.splitlines() if line.startswith(("E:", "W:", "Err:"))]
    apt_lines = [line for line in lines if "mmdebstrap failed" not in line
                 and not re.match(r"E: apt-get .* failed$", line)] or lines
    text = "\n".join(lines)
    headline = next((line for line in apt_lines if line.startswith("E:")),
                    apt_lines[0] if apt_lines else "mmdebstrap failed")
    summary = f"cannot bootstrap {request.suite}"
    if "does not have a Release file" in text or re.search(
            rf"/dists/{re.escape(request.suite)}/\S*\s+(File not found|404)", text):
        return SuiteNotFound(f"{summary}: the archive has no suite {request.suite!r}: {headline}", lines)
    if any(n in text for n in ("Could not connect", "Could not resolve", "Temporary failure resolving",
                               "Connection failed", "Network is unreachable", "Connection timed out")):
        failed = next((line for line in apt_lines if "Failed to fetch" in line), headline)
        return ArchiveUnreachable(f"{summary}: the archive cannot be reached: {failed}", lines)
    if "No space left on device" in text:
        return BootstrapNoSpace(f"{summary}: {headline}", lines)
    return BootstrapFailed(f"{summary}: {headline}", lines)
