"""The installed package set of a root, read from its dpkg database.

Works on a directory tree or on a composefs image (see :mod:`.rootfs`): no
mount, no privileges, no dpkg binary. The dpkg facts it relies on:

* ``var/lib/dpkg/status`` holds one deb822 stanza per package dpkg knows of
  (parsed with python-debian). ``Status`` is three words, ``WANT EFLAG
  STATE``: the selection (``install``, ``hold``, ``deinstall``, ``purge``,
  ``unknown``), an error flag (``ok`` or ``reinstreq``, plus the obsolete
  ``hold`` and ``hold-reinstreq``) and the state (``not-installed``,
  ``config-files``, ``half-installed``, ``unpacked``, ``half-configured``,
  ``triggers-awaited``, ``triggers-pending``, ``installed``).
* A package is a name and an architecture: with ``Multi-Arch: same`` several
  architectures of one name are installed side by side, so records are keyed
  ``NAME:ARCH`` (:attr:`Package.key`).
* ``Version`` is ``[EPOCH:]UPSTREAM[-REVISION]``; ``Source`` is ``NAME`` or
  ``NAME (VERSION)`` and is absent when it equals the binary package's name
  and version; ``Installed-Size`` is in KiB; the first line of
  ``Description`` is the summary; ``Conffiles`` lines are ``PATH MD5`` with
  an optional ``obsolete`` or ``remove-on-upgrade`` flag after them.
* The files a package installed are listed in ``var/lib/dpkg/info/NAME.list``,
  or ``NAME:ARCH.list`` when the package is ``Multi-Arch: same`` and the
  database is in the multiarch layout (``info/format`` holds ``1``; without
  it dpkg uses ``NAME.list`` for all): one absolute path per line, the root
  directory written ``/.``. A missing list means no files, as dpkg assumes.
  Diversions are not applied: a list names the path the package ships.

Which packages count: the package set of a root (:attr:`Database.installed`)
is every package whose state is ``installed`` with the ``ok`` flag, whatever
its selection: ``hold ok installed`` (held back) and ``deinstall ok
installed`` (marked for removal, not yet removed) are as installed as
``install ok installed``. Packages in any other state but ``not-installed``
(a build that stopped half way, a package with ``reinstreq``, or one removed
but not purged, ``config-files``) are kept apart in :attr:`Database.partial`
with their state, for a listing to show; they take no part in a diff.
``not-installed`` stanzas (leftover selections) are skipped.

A missing status file raises :class:`NoDpkgDatabase` and a malformed one
:class:`MalformedDatabase`, each with a one-line message naming the stanza.
"""

from __future__ import annotations

import operator
import re
from collections.abc import Iterable
from dataclasses import dataclass

from debian.deb822 import Deb822
from debian.debian_support import Version

from aptlayer import errors

from .rootfs import ImageRoot, MissingFile, TreeRoot

STATUS_PATH = "var/lib/dpkg/status"
INFO_DIR = "var/lib/dpkg/info"
FORMAT_PATH = f"{INFO_DIR}/format"

SELECTIONS = frozenset({"unknown", "install", "hold", "deinstall", "purge"})
ERROR_FLAGS = frozenset({"ok", "reinstreq", "hold", "hold-reinstreq"})
STATES = frozenset({"not-installed", "config-files", "half-installed", "unpacked", "half-configured",
                    "triggers-awaited", "triggers-pending", "installed"})
MULTI_ARCH = frozenset({"no", "same", "foreign", "allowed"})
CONFFILE_FLAGS = frozenset({"obsolete", "remove-on-upgrade"})

# dpkg's own rules, which also keep a name from walking out of the info directory
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9+._-]*\Z")
_ARCH_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]*\Z")
#: a field line: a name of printable ASCII without colon or space, then a colon
_FIELD_RE = re.compile(r"[!-9;-~]+:")
_SOURCE_RE = re.compile(r"(\S+)(?:\s+\((\S+)\))?\Z")


class NoDpkgDatabase(errors.NotFound):
    """The root has no ``var/lib/dpkg/status``: it is not a Debian system."""


class MalformedDatabase(errors.InvalidInput):
    """The status file or a file list breaks dpkg's format; the message says where."""


@dataclass(frozen=True, slots=True)
class Conffile:
    """A configuration file dpkg tracks for a package (a ``Conffiles`` line)."""

    path: str
    #: MD5 of the file as shipped (``newconffile`` while not yet unpacked)
    md5: str
    obsolete: bool = False
    remove_on_upgrade: bool = False

    def to_json(self) -> dict:
        return {"path": self.path, "md5": self.md5, "obsolete": self.obsolete,
                "remove_on_upgrade": self.remove_on_upgrade}


@dataclass(frozen=True, slots=True)
class Package:
    """One package of a dpkg database."""

    name: str
    #: the full version, with its epoch if any (compare with :func:`debian.debian_support.version_compare`)
    version: str
    architecture: str
    #: the selection, first word of ``Status``
    want: str
    #: the error flag, second word of ``Status``
    flag: str
    #: the state, third word of ``Status``
    state: str
    multi_arch: str = "no"
    source: str = ""
    source_version: str = ""
    #: in KiB; None when the stanza has none
    installed_size: int | None = None
    essential: bool = False
    protected: bool = False
    section: str | None = None
    priority: str | None = None
    maintainer: str | None = None
    #: first line of ``Description``
    summary: str = ""
    conffiles: tuple[Conffile, ...] = ()

    @property
    def key(self) -> str:
        """``NAME:ARCH``, unique in a database."""
        return f"{self.name}:{self.architecture}"

    @property
    def status(self) -> str:
        return f"{self.want} {self.flag} {self.state}"

    def list_name(self, multiarch_layout: bool = True) -> str:
        """The file name of the package's file list in the info directory."""
        stem = self.key if multiarch_layout and self.multi_arch == "same" else self.name
        return f"{stem}.list"

    def to_json(self) -> dict:
        return {
            "name": self.name, "version": self.version, "architecture": self.architecture,
            "status": self.status, "multi_arch": self.multi_arch,
            "source": self.source, "source_version": self.source_version,
            "installed_size": self.installed_size, "essential": self.essential, "protected": self.protected,
            "section": self.section, "priority": self.priority, "maintainer": self.maintainer,
            "summary": self.summary, "conffiles": [c.to_json() for c in self.conffiles],
        }


@dataclass(frozen=True, slots=True)
class Database:
    """The packages of one dpkg database, each tuple sorted by name, then architecture."""

    #: the package set: state ``installed``, flag ``ok``
    installed: tuple[Package, ...]
    #: every other package but ``not-installed`` ones (see the module docstring)
    partial: tuple[Package, ...] = ()

    def get(self, name: str, architecture: str | None = None) -> tuple[Package, ...]:
        """The installed packages called ``name`` (several only with ``Multi-Arch: same``)."""
        return tuple(p for p in self.installed
                     if p.name == name and (architecture is None or p.architecture == architecture))

    def to_json(self) -> dict:
        return {"installed": [p.to_json() for p in self.installed],
                "partial": [p.to_json() for p in self.partial]}


def read_database(root: TreeRoot | ImageRoot) -> Database:
    """The dpkg database of a root.

    Raises:
        NoDpkgDatabase: the root has no status file.
        MalformedDatabase: the status file breaks dpkg's format.
        rootfs errors: the path is not a regular file, the image is damaged, ...
    """
    try:
        data = root.read_file(STATUS_PATH)
    except MissingFile as e:
        raise NoDpkgDatabase(f"no dpkg database: {e}") from None
    return parse_status(data, where=root.where(STATUS_PATH))


def parse_status(data: bytes, where: str = "status") -> Database:
    """Parse the bytes of a dpkg status file; ``where`` names it in error messages."""
    text = data.decode("utf-8", "replace")
    lines = text.splitlines(True)
    _check_lines(lines, where)
    installed: list[Package] = []
    partial: list[Package] = []
    seen: set[str] = set()
    for number, stanza in enumerate(Deb822.iter_paragraphs(lines, use_apt_pkg=False), 1):
        package = _package(stanza, f"{where}: stanza {number}")
        if package is None:
            continue
        if package.key in seen:
            raise MalformedDatabase(f"{where}: stanza {number}: {package.key} appears twice")
        seen.add(package.key)
        (installed if package.state == "installed" and package.flag == "ok" else partial).append(package)
    order = operator.attrgetter("name", "architecture")
    return Database(tuple(sorted(installed, key=order)), tuple(sorted(partial, key=order)))


def _check_lines(lines: list[str], where: str) -> None:
    """Refuse the lines python-debian would silently skip: neither a field, nor a continuation, nor blank."""
    in_stanza = False
    for number, line in enumerate(lines, 1):
        if not line.strip():
            in_stanza = False
        elif line[0] in " \t":
            if not in_stanza:
                raise MalformedDatabase(f"{where}: line {number}: a continuation line outside a field")
        elif _FIELD_RE.match(line):
            in_stanza = True
        else:
            raise MalformedDatabase(f"{where}: line {number}: not a field: {line.strip()[:60]!r}")


def _package(stanza: Deb822, where: str) -> Package | None:
    """The record of one stanza, or None for a ``not-installed`` one."""
    name = stanza.get("Package")
    if not name:
        raise MalformedDatabase(f"{where}: no Package field")
    if not _NAME_RE.match(name):
        raise MalformedDatabase(f"{where}: invalid package name {name!r}")
    where = f"{where} ({name})"
    status = stanza.get("Status", "").split()
    if len(status) != 3 or status[0] not in SELECTIONS or status[1] not in ERROR_FLAGS or status[2] not in STATES:
        raise MalformedDatabase(f"{where}: invalid Status {stanza.get('Status', '')!r}")
    want, flag, state = status
    if state == "not-installed":
        return None
    version = stanza.get("Version", "")
    arch = stanza.get("Architecture", "")
    # A package removed but for its conffiles may have lost both (old dpkg).
    optional = state == "config-files"
    if version or not optional:
        try:
            Version(version)
        except ValueError:
            raise MalformedDatabase(f"{where}: invalid Version {version!r}") from None
    if (arch or not optional) and not _ARCH_RE.match(arch):
        raise MalformedDatabase(f"{where}: invalid Architecture {arch!r}")
    multi_arch = stanza.get("Multi-Arch", "no")
    if multi_arch not in MULTI_ARCH:
        raise MalformedDatabase(f"{where}: invalid Multi-Arch {multi_arch!r}")
    source, source_version = name, version
    if "Source" in stanza:
        found = _SOURCE_RE.match(stanza["Source"].strip())
        if not found:
            raise MalformedDatabase(f"{where}: invalid Source {stanza['Source']!r}")
        source, source_version = found.group(1), found.group(2) or version
    size = stanza.get("Installed-Size")
    if size is not None and not (size.isascii() and size.isdigit()):
        raise MalformedDatabase(f"{where}: invalid Installed-Size {size!r}")
    return Package(
        name=name, version=version, architecture=arch, want=want, flag=flag, state=state,
        multi_arch=multi_arch, source=source, source_version=source_version,
        installed_size=None if size is None else int(size),
        essential=stanza.get("Essential") == "yes", protected=stanza.get("Protected") == "yes",
        section=stanza.get("Section"), priority=stanza.get("Priority"), maintainer=stanza.get("Maintainer"),
        summary=stanza.get("Description", "").split("\n", 1)[0].strip(),
        conffiles=_conffiles(stanza.get("Conffiles", ""), where),
    )


def _conffiles(value: str, where: str) -> tuple[Conffile, ...]:
    """Parse ``Conffiles``: the hash and the flags come last, so a path may hold spaces."""
    found = []
    for line in value.splitlines():
        line = line.strip()
        if not line:
            continue
        words = line.split()
        flags = []
        while len(words) > 2 and words[-1] in CONFFILE_FLAGS:
            flags.append(words.pop())
        if len(words) < 2 or not line.startswith("/"):
            raise MalformedDatabase(f"{where}: invalid Conffiles line {line!r}")
        path = line.rsplit(None, len(flags) + 1)[0]
        found.append(Conffile(path, words[-1], "obsolete" in flags, "remove-on-upgrade" in flags))
    return tuple(found)


def read_file_lists(root: TreeRoot | ImageRoot, packages: Iterable[Package]) -> dict[str, tuple[str, ...]]:
    """``Package.key`` -> the paths the package installed, in the order dpkg wrote them.

    The root directory ``/.`` is given as ``/``; paths are decoded as UTF-8
    with ``surrogateescape`` (as :func:`os.fsdecode`), so no byte is lost.
    """
    try:
        layout = root.read_file(FORMAT_PATH).strip()
    except MissingFile:
        layout = b"0"
    if layout not in (b"0", b"1"):
        raise MalformedDatabase(f"{root.where(FORMAT_PATH)}: unknown database layout {layout[:20]!r}")
    lists = root.read_dir_files(INFO_DIR, ".list")
    found: dict[str, tuple[str, ...]] = {}
    for package in packages:
        list_name = package.list_name(multiarch_layout=layout == b"1")
        data = lists.get(list_name, b"")
        paths = []
        for line in data.decode("utf-8", "surrogateescape").split("\n"):
            if not line:
                continue
            if not line.startswith("/"):
                where = root.where(f"{INFO_DIR}/{list_name}")
                raise MalformedDatabase(f"{where}: not an absolute path: {line!r}")
            paths.append("/" if line == "/." else line)
        found[package.key] = tuple(paths)
    return found
