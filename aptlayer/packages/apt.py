"""Install and remove packages in a new root with apt and dpkg, never on the host.

Two steps, each with only the access it needs (docs/sandbox.md):

1. **Resolve and download** with the host's ``apt-get``, pointed at the
   root's dpkg status (``-o Dir::State::status``) and at a configuration of
   apt-layer's own (``APT_CONFIG``: the given sources and keyrings, the
   root's architectures, nothing of the host's apt.conf.d). Package lists
   and .debs go to the download cache (the store's ``cache/apt/``), so a
   package is fetched once. This step has the network and runs no code from
   the image or from a package; apt checks signatures as it always does.
2. **Install** with the root's own ``apt-get`` inside the sandbox
   (sandbox.py: no network, no host root, no store): the cache is bound
   read-only, ``--no-download`` makes any package missing from step 1 an
   error, and dpkg runs the maintainer scripts there.

Both steps use the same lists, status and configuration, so they agree.
What step 2 installed is read from the root's dpkg status afterwards.
Neither step may remove a package the caller did not name (``--no-remove``):
a conflict with a base package is refused, not resolved by removing it.

The lists are fetched (``apt-get update``) only when they are older than
:data:`LISTS_MAX_AGE` or were fetched for other sources. With fresh lists,
step 2 is tried first on its own: when the cache holds every .deb already
(a rebuild, an uninstall, a second image with the same packages), that is
the one run of apt. When apt refuses before dpkg starts (a .deb not in the
cache, a package not in the lists), the root is untouched and the two steps
run, step 1 updating the lists once more if it finds no such package.

``file:`` sources are handed to apt as ``copy:`` so that local repositories'
packages also land in the cache and step 2 needs no view of them.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import tarfile
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..config import DEFAULT_LISTS_MAX_AGE
from ..errors import AptLayerError, Conflict, IntegrityError, InvalidInput, NoSpace, NotFound, Unsupported
from . import sandbox
from .sandbox import Bind
from .sources import Source, render_deb822

TRUSTED_PARTS = Path("/etc/apt/trusted.gpg.d")
#: package lists fetched less than this many seconds ago, for the same sources, are used without an update
LISTS_MAX_AGE = DEFAULT_LISTS_MAX_AGE
#: in the download cache: what the lists were last fetched for (its mtime: when)
LISTS_STAMP = "lists/apt-layer.sources-key"
INSIDE = "/run/apt-layer"  # where the sandbox sees the cache and the configuration


class AptFailed(AptLayerError):
    """apt or dpkg failed; ``lines`` holds their own messages."""

    def __init__(self, message: str, lines: list[str] | tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.lines = tuple(lines)


class PackageNotFound(AptFailed, NotFound):
    """No package (or version) of that name in the sources, or not installed."""


class Unsatisfiable(AptFailed, Conflict):
    """Dependencies cannot be met without removing what was not asked for."""


class ScriptFailed(AptFailed):
    """A maintainer script (or dpkg itself) failed while unpacking or configuring."""


class RepositoryNotTrusted(AptFailed, IntegrityError):
    """A repository without a valid signature, not marked trusted."""


class DownloadFailed(AptFailed):
    """An index or a package could not be fetched."""


class DiskFull(AptFailed, NoSpace):
    """apt or dpkg ran out of space."""


class BadDeb(AptFailed, InvalidInput):
    """A local .deb that is not one, or whose files would leave the root."""


@dataclass(frozen=True)
class Package:
    """An installed package, as dpkg's status records it."""

    name: str
    version: str
    arch: str

    @property
    def key(self) -> str:
        return f"{self.name}:{self.arch}"


@dataclass
class Outcome:
    """What an install or removal did to the root."""

    #: every package installed in the root afterwards
    packages: list[Package]
    #: packages this operation installed or upgraded -> SHA-256 of their .deb (None if it is not at hand)
    installed: dict[Package, str | None] = field(default_factory=dict)
    removed: list[Package] = field(default_factory=list)
    #: .deb files fetched into the cache by this operation (file names)
    downloaded: list[str] = field(default_factory=list)
    #: apt's and dpkg's output, for a log
    output: str = ""


# -- the root's dpkg state ---------------------------------------------------

def _status_path(root: Path) -> Path:
    path = Path(root) / "var/lib/dpkg/status"
    for part in (Path(root) / "var", Path(root) / "var/lib", Path(root) / "var/lib/dpkg", path):
        if part.is_symlink():
            raise InvalidInput(f"{part} is a symlink: refusing to read a dpkg database through it")
    return path


def installed_packages(root: Path) -> list[Package]:
    """The packages dpkg records as installed in *root*, sorted.

    Read line by line (only four fields matter; python-debian's full
    parser took a fifth of a layering's own time on a minbase).
    """
    path = _status_path(root)
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            text = f.read()
    except FileNotFoundError:
        return []
    out = []
    for stanza in text.split("\n\n"):
        fields = {}
        for line in stanza.splitlines():
            key, sep, value = line.partition(":")
            if sep and key in _STATUS_FIELDS:
                fields[key] = value.strip()
        state = fields.get("Status", "").split()
        if len(state) == 3 and state[2] == "installed" and "Package" in fields and "Version" in fields:
            out.append(Package(fields["Package"], fields["Version"], fields.get("Architecture", "all")))
    return sorted(out, key=lambda p: (p.name, p.arch))


_STATUS_FIELDS = frozenset(("Package", "Status", "Version", "Architecture"))


def root_architectures(root: Path) -> list[str]:
    """The root's native architecture (dpkg's own package) and its foreign ones."""
    native = next((p.arch for p in installed_packages(root) if p.name == "dpkg"), None)
    if native is None:
        raise InvalidInput(f"{root} has no dpkg installed: not a Debian root")
    archs = [native]
    foreign = Path(root) / "var/lib/dpkg/arch"
    if foreign.is_file() and not foreign.is_symlink():
        archs += [a for a in foreign.read_text().split() if a not in archs]
    return archs


# -- local .deb files -------------------------------------------------------

def inspect_deb(path: Path) -> Package:
    """Name, version and architecture of a local .deb, after checking its files.

    The data is read with dpkg-deb (as dpkg reads it) and refused if a
    member's name is absolute or has a ``..`` component, if a hard link
    points outside the package that way, or if it is a device node (the
    sandbox cannot make one, and an image has no business carrying one).
    """
    path = Path(path)
    fields = subprocess.run(["dpkg-deb", "--field", str(path), "Package", "Version", "Architecture"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_c_env())
    if fields.returncode != 0:
        lines = _lines(fields.stderr)
        raise BadDeb(f"{path} is not a valid .deb: {lines[0] if lines else 'dpkg-deb failed'}", lines)
    info = dict(line.split(": ", 1) for line in fields.stdout.splitlines() if ": " in line)
    if not {"Package", "Version", "Architecture"} <= info.keys():
        raise BadDeb(f"{path}: its control file lacks Package, Version or Architecture")
    with subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(path)], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, env=_c_env()) as proc:
        try:
            with tarfile.open(fileobj=proc.stdout, mode="r|*") as tar:
                for member in tar:
                    _check_member(path, member)
        except tarfile.TarError as exc:
            proc.kill()
            raise BadDeb(f"{path}: unreadable data archive: {exc}") from None
        except BadDeb:
            proc.kill()
            raise
        finally:
            stderr = proc.stderr.read().decode("utf-8", "replace")
    if proc.returncode != 0:
        lines = _lines(stderr)
        raise BadDeb(f"{path}: {lines[0] if lines else 'dpkg-deb --fsys-tarfile failed'}", lines)
    return Package(info["Package"], info["Version"], info["Architecture"])


def _check_member(deb: Path, member: tarfile.TarInfo) -> None:
    names = [("name", member.name)]
    if member.islnk():
        names.append(("hard link target", member.linkname))
    for what, name in names:
        if name.startswith("/"):
            raise BadDeb(f"{deb}: refused: member {member.name!r}: its {what} is an absolute path")
        if ".." in name.split("/"):
            raise BadDeb(f"{deb}: refused: member {member.name!r}: its {what} has a '..' component")
    if member.ischr() or member.isblk():
        raise BadDeb(f"{deb}: refused: member {member.name!r} is a device node")


#: what apt-layer passes to apt as a package: name[:arch][=version|/release]
_PACKAGE_SPEC = re.compile(r"^[a-z0-9][a-z0-9+.-]*(:[a-z0-9-]+)?([=/][A-Za-z0-9.+~:_-]+)?$")


def check_package_specs(specs: list[str]) -> None:
    """Refuse anything apt would read as other than a package (``-o...`` above all)."""
    for spec in specs:
        if not _PACKAGE_SPEC.match(spec):
            raise InvalidInput(f"invalid package {spec!r}: expected NAME[:ARCH][=VERSION|/RELEASE]")


# -- running apt ------------------------------------------------------------

def _c_env() -> dict[str, str]:
    return {"PATH": sandbox.ENV["PATH"], "LC_ALL": "C", "HOME": "/root"}


def _lines(text: str) -> list[str]:
    return [line.rstrip() for line in text.splitlines() if line.strip()]


def _copy_uri(uri: str) -> str:
    return "copy:" + uri[len("file:"):] if uri.startswith("file:") else uri


class _Workspace:
    """apt's configuration for one operation, seen from the host and from the sandbox."""

    def __init__(self, root: Path, sources: list[Source], cache: Path | None, *,
                 trusted_parts: Path | None, recommends: bool, under: Path | None = None) -> None:
        self.root = Path(root)
        if not sandbox.exists_in_root(self.root, "/usr/bin/apt-get"):
            raise Unsupported(f"{root} has no apt-get: bootstrap the base with variant apt or larger")
        if '"' in str(self.root) or (cache is not None and '"' in str(cache)):
            raise InvalidInput(f"a path with a double quote cannot go into apt's configuration: {root}, {cache}")
        self.archs = root_architectures(self.root)
        self.dir = Path(tempfile.mkdtemp(prefix="apt-layer-apt-", dir=under))
        try:
            self.cache = Path(cache) if cache is not None else self.dir / "cache"
            for sub in ("lists/partial", "lists/auxfiles", "archives/partial"):
                (self.cache / sub).mkdir(parents=True, exist_ok=True)
            for sub in ("keyrings", "trusted.gpg.d", "state", "log"):
                (self.dir / sub).mkdir()
            if trusted_parts is not None and trusted_parts.is_dir():
                for key in sorted(trusted_parts.iterdir()):
                    if key.suffix in (".gpg", ".asc") and key.is_file():
                        shutil.copyfile(key, self.dir / "trusted.gpg.d" / key.name)
            names = self._copy_keyrings(sources)
            self.lists_key = self._lists_key(sources, names)
            for view, prefix in (("host", str(self.dir)), ("inside", f"{INSIDE}/work")):
                etc = self.dir / view
                for sub in ("sources.list.d", "apt.conf.d", "preferences.d"):
                    (etc / sub).mkdir(parents=True)
                mapping = {key: f"{prefix}/keyrings/{name}" for key, name in names.items()}
                (etc / "sources.list.d" / "apt-layer.sources").write_text(
                    render_deb822(sources, mapping, _copy_uri))
            self.host_config = self._config("host", recommends)
            self.inside_config = self._config("inside", recommends)
            # readable by apt's _apt user, which fetches where it can
            for p in [self.dir, *self.dir.rglob("*")]:
                p.chmod(0o755 if p.is_dir() else 0o644)
        except BaseException:
            self.close()
            raise

    def _copy_keyrings(self, sources: list[Source]) -> dict[str, str]:
        """Copy every keyring the sources name into keyrings/: Signed-By entry -> file name."""
        names: dict[str, str] = {}
        for number, source in enumerate(sources):
            for item in source.keyring_files():
                if item in names:
                    continue
                names[item] = f"{len(names)}{'.asc' if item.endswith('.asc') else '.gpg'}"
                try:
                    shutil.copyfile(item, self.dir / "keyrings" / names[item])
                except OSError as exc:
                    raise InvalidInput(f"{source.origin}: keyring {item}: {exc.strerror}") from None
            if source.signed_by_key is not None:
                names[f"inline:{number}"] = f"inline-{number}.asc"
                (self.dir / "keyrings" / f"inline-{number}.asc").write_text(source.signed_by_key)
        return names

    def _lists_key(self, sources: list[Source], names: dict[str, str]) -> str:
        """What the package lists depend on: the sources, their keys, the trusted keys, the architectures."""
        keys = {key: _sha256(self.dir / "keyrings" / name) for key, name in names.items()}
        digest = hashlib.sha256(render_deb822(sources, keys, _copy_uri).encode())
        for part in sorted((self.dir / "trusted.gpg.d").iterdir()):
            digest.update(f"\n{part.name} {_sha256(part)}".encode())
        digest.update(f"\n{' '.join(self.archs)}".encode())
        return digest.hexdigest()

    def _config(self, view: str, recommends: bool) -> Path:
        host = view == "host"
        work = str(self.dir) if host else f"{INSIDE}/work"
        cache = str(self.cache) if host else f"{INSIDE}/cache"
        etc = f"{work}/{view}"
        items = {
            "Dir::Etc": f"{etc}/",
            "Dir::Etc::main": "/dev/null",
            "Dir::Etc::parts": f"{etc}/apt.conf.d/",
            "Dir::Etc::sourcelist": f"{etc}/sources.list",
            "Dir::Etc::sourceparts": f"{etc}/sources.list.d/",
            "Dir::Etc::preferences": f"{etc}/preferences",
            "Dir::Etc::preferencesparts": f"{etc}/preferences.d/",
            "Dir::Etc::trusted": f"{work}/trusted.gpg",
            "Dir::Etc::trustedparts": f"{work}/trusted.gpg.d/",
            "Dir::State::lists": f"{cache}/lists/",
            "Dir::Cache::archives": f"{cache}/archives/",
            "Dir::Cache::pkgcache": "",
            "Dir::Cache::srcpkgcache": "",
            "Dir::Log": f"{work}/log/" if host else "/tmp/",
            "APT::Architecture": self.archs[0],
            "APT::Install-Recommends": "true" if recommends else "false",
            "APT::Get::List-Cleanup": "false",
            "Acquire::Languages": "none",
            "Dpkg::Use-Pty": "false",
        }
        if host:
            # read the root's state, write nothing there
            items["Dir::State"] = f"{work}/state/"
            items["Dir::State::status"] = str(_status_path(self.root))
        else:
            # the cache is read-only in the sandbox; apt's locks there would fail
            items["Debug::NoLocking"] = "true"
        lines = [f'{key} "{value}";' for key, value in items.items()]
        lines.append("APT::Architectures { " + " ".join(f'"{a}";' for a in self.archs) + " };")
        lines.append('DPkg::Options { "--force-confdef"; "--force-confold"; "--log=/dev/null"; };')
        path = self.dir / view / "apt.conf"
        path.write_text("\n".join(lines) + "\n")
        return path

    def host_apt(self, *args: str) -> tuple[int, str]:
        """The host's apt-get on the root's state (resolving and downloading only)."""
        env = {**_c_env(), "APT_CONFIG": str(self.host_config), "DEBIAN_FRONTEND": "noninteractive"}
        for proxy in ("http_proxy", "https_proxy", "no_proxy"):
            if proxy in os.environ:
                env[proxy] = os.environ[proxy]
        result = subprocess.run(["apt-get", "-q", *args], stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, env=env, check=False)
        return result.returncode, result.stdout.decode("utf-8", "replace")

    def root_apt(self, *args: str, debs: Path | None = None) -> tuple[int, str]:
        """The root's apt-get in the sandbox, with the cache read-only."""
        binds = [Bind(self.dir, f"{INSIDE}/work"), Bind(self.cache, f"{INSIDE}/cache")]
        if debs is not None:
            binds.append(Bind(debs, f"{INSIDE}/debs"))
        # apt insists on chmod-ing its partial directories: give it scratch ones
        scratch = tuple(f"{INSIDE}/cache/{sub}" for sub in ("lists/partial", "lists/auxfiles", "archives/partial"))
        result = sandbox.run(self.root, ["apt-get", "-q", *args], binds=tuple(binds), tmpfs=scratch,
                             env={"APT_CONFIG": f"{INSIDE}/work/inside/apt.conf"})
        return result.returncode, sandbox.output_text(result)

    def close(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


# -- reading apt's output ---------------------------------------------------

_NOT_FOUND = ("Unable to locate package", "has no installation candidate",
              "Couldn't find any package", "was not found", "is not installed")
_UNSATISFIABLE = ("unmet dependencies", "held broken packages", "remove is disabled",
                  "essential system-critical", "pkgProblemResolver", "trying to overwrite")
_UNTRUSTED = ("is not signed", "NO_PUBKEY", "couldn't be verified", "signatures were invalid",
              "Clearsigned file isn't valid", "not signed", "EXPKEYSIG", "BADSIG",
              "without authentication", "cannot be authenticated")
_DOWNLOAD = ("Failed to fetch", "Could not resolve", "Temporary failure resolving",
             "Could not connect", "Unable to fetch", "Connection failed", "Some index files failed")
_SPACE = ("No space left on device", "You don't have enough free space")


_PROGRESS = ("Setting up ", "Unpacking ", "Preparing to unpack ", "Removing ", "Purging configuration")


def _important(output: str) -> list[str]:
    """The lines of apt's and dpkg's output that say what went wrong.

    When dpkg failed: from the last progress line before its first error
    (so a maintainer script's own output is kept) to the end, with each
    ``dpkg: error ...`` line joined to its indented continuation. Otherwise
    apt's ``E:``/``W:``/``Err:`` lines and its unmet-dependency lines.
    """
    lines = _lines(output)
    first = next((i for i, line in enumerate(lines) if line.startswith("dpkg: error")), None)
    if first is not None:
        start = max((i for i in range(first) if lines[i].startswith(_PROGRESS)), default=first)
        out: list[str] = []
        for line in lines[start:]:
            if line.startswith(" ") and out and out[-1].startswith("dpkg: error"):
                out[-1] = f"{out[-1]} {line.strip()}"
            else:
                out.append(line.strip())
        return out
    return [line.strip() for line in lines
            if line.startswith(("E:", "W:", "Err:")) or "unmet dependencies" in line
            or re.match(r"^\s+\S+ : ", line)]


def _failure(summary: str, output: str, default: type[AptFailed] = AptFailed) -> AptFailed:
    lines = _important(output) or _lines(output)[-5:]
    text = "\n".join(lines)
    kind: type[AptFailed] = default
    for needles, candidate in ((_SPACE, DiskFull), (_UNTRUSTED, RepositoryNotTrusted),
                               (_NOT_FOUND, PackageNotFound), (_UNSATISFIABLE, Unsatisfiable),
                               (_DOWNLOAD, DownloadFailed), (("dpkg: error",), ScriptFailed)):
        if any(n in text for n in needles):
            kind = candidate
            break
    quoted = _headline(lines)
    return kind(f"{summary}: {quoted}" if quoted else summary, lines)


def _headline(lines: list[str]) -> str:
    """The one line of apt's or dpkg's that says best what went wrong."""
    for prefix in ("dpkg: error", "E: The repository", "E: Failed to fetch", "Err:"):
        for line in lines:
            if line.startswith(prefix):
                return line
    for line in lines:
        if re.match(r"^\S+ : ", line):  # apt's unmet dependency: "pkg : Depends: other but ..."
            return line
    for line in lines:
        if line.startswith("E:"):
            return line
    return lines[0] if lines else ""


_REMV = re.compile(r"^(?:Remv|Purg) (\S+) \[(\S+)\]")


def _removals(output: str) -> list[str]:
    """The packages apt would remove (names), from ``-s``."""
    return [m.group(1).partition(":")[0] for line in output.splitlines() if (m := _REMV.match(line))]


def _deb_name(pkg: Package) -> str:
    """apt's file name for a package in its archives directory."""
    return f"{pkg.name}_{pkg.version.replace(':', '%3a')}_{pkg.arch}.deb"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _check_removal(root: Path, before: list[Package], removals: list[str]) -> list[Package]:
    """The root's packages after a removal, which must be those before less exactly ``removals``."""
    after = installed_packages(root)
    expected = [p for p in before if p.name not in removals]
    if after != expected:
        got, want = set(after), set(expected)
        raise AptFailed("apt in the root did not do what it planned: "
                        f"unexpected {sorted(p.key for p in got - want) or 'nothing'}, "
                        f"missing {sorted(p.key for p in want - got) or 'nothing'}")
    return after


# -- the operations ---------------------------------------------------------

def install(root: Path, packages: list[str], *, sources: list[Source], cache: Path,
            debs: list[Path] = (), refresh: bool | None = None, recommends: bool = True,
            trusted_parts: Path | None = TRUSTED_PARTS, workdir: Path | None = None,
            lists_max_age: float | None = None) -> Outcome:
    """Install *packages* (apt names, ``name=version`` allowed) and local *debs* into *root*.

    *sources* are what apt fetches from (the host's, usually); *cache* is the
    download cache (lists and .debs), kept between calls. The package lists
    are updated first if *refresh* is true; if it is None (the default),
    only when they are not :func:`lists_fresh` for these sources (younger
    than *lists_max_age* seconds, :data:`LISTS_MAX_AGE` by default), and
    again once if apt then finds no such package. apt's configuration for the
    operation lives in a temporary directory under *workdir* (the system's
    temporary directory by default; the Store will pass its staging), removed
    at the end whatever happens. Raises an :class:`AptFailed`
    subclass, quoting apt or dpkg, if anything goes wrong; the root is then
    in whatever state dpkg left it, and the caller discards it.

    At most two runs of apt (and an update): the host's resolves and
    downloads (``--download-only``), the root's installs in the sandbox;
    with fresh lists and a warm cache, the second alone. What was installed
    is read from the root's dpkg status afterwards, not asked of apt first.
    """
    sandbox.check_available()
    if not packages and not debs:
        raise InvalidInput("nothing to install")
    check_package_specs(packages)
    local = [(Path(d), inspect_deb(Path(d))) for d in debs]
    work = _Workspace(root, sources, cache, trusted_parts=trusted_parts, recommends=recommends, under=workdir)
    try:
        output = []
        updated = refresh is True or (refresh is None and not lists_fresh(work, lists_max_age))
        if updated:
            _update(work, output)
        debdir = work.dir / "debs"
        debdir.mkdir()
        host_args, inside_args = list(packages), list(packages)
        for number, (path, info) in enumerate(local):
            name = f"{number}-{_deb_name(info)}"
            shutil.copyfile(path, debdir / name)
            host_args.append(str(debdir / name))
            inside_args.append(f"{INSIDE}/debs/{name}")
        common = ["-y", "--no-remove"]
        # apt 3.0 (trixie) hands dpkg a relative path for a local .deb under
        # --no-download ("Pathname to install is not absolute"); the sandbox
        # has no network, so without the option apt still fetches nothing.
        offline = [] if local else ["--no-download"]
        before = installed_packages(root)
        downloaded: list[str] = []
        ran = None
        if not updated:  # fresh lists: the cache may hold every .deb already
            ran = _install_from_cache(work, root, [*common, *offline, "install", *inside_args], debdir)
        if ran is not None:
            rc, out = ran
        else:
            have = set(os.listdir(work.cache / "archives"))
            rc, out = work.host_apt(*common, "--download-only", "install", *host_args)
            if rc != 0 and not updated and refresh is None \
                    and isinstance(_failure("", out), PackageNotFound):  # maybe new since the lists were fetched
                _update(work, output)
                rc, out = work.host_apt(*common, "--download-only", "install", *host_args)
            output.append(out)
            if rc != 0:
                raise _failure(f"cannot install {' '.join(packages + [str(p) for p, _ in local])}", out)
            downloaded = sorted(n for n in set(os.listdir(work.cache / "archives")) - have if n.endswith(".deb"))
            rc, out = work.root_apt(*common, *offline, "install", *inside_args, debs=debdir)
        output.append(out)
        if rc != 0:
            raise _failure("apt-get install in the new root failed", out, ScriptFailed)
        after = installed_packages(root)
        new = _installed_by(before, after)
        local_by_key = {info: debdir / f"{n}-{_deb_name(info)}" for n, (_, info) in enumerate(local)}
        hashes = {pkg: _deb_sha256(local_by_key.get(pkg) or work.cache / "archives" / _deb_name(pkg))
                  for pkg in new}
        return Outcome(packages=after, installed=hashes, downloaded=downloaded, output="".join(output))
    finally:
        work.close()


#: lines of apt's output that only come once dpkg has started on the root
_DPKG_RAN = ("Selecting previously unselected package", "Preparing to unpack", "Unpacking ", "Setting up ",
             "dpkg:", "Removing ")


def _install_from_cache(work: _Workspace, root: Path, args: list[str], debdir: Path) -> tuple[int, str] | None:
    """``apt-get ARGS`` (an install ``--no-download``) in the sandbox, from the lists and .debs the cache holds.

    A failure before dpkg started (a .deb not in the cache, a package not
    in the lists, or any other refusal of apt's: the root is untouched, as
    its status shows) is None: the caller takes the long way, downloading
    on the host, then installing. Otherwise apt's exit code and output.
    """
    status = _status_path(root)
    was = status.read_bytes() if status.exists() else None
    rc, out = work.root_apt(*args, debs=debdir)
    if rc == 0:
        return rc, out
    now = status.read_bytes() if status.exists() else None
    if now == was and not any(line.startswith(_DPKG_RAN) for line in out.splitlines()):
        return None
    return rc, out


def _update(work: _Workspace, output: list[str]) -> None:
    """``apt-get update`` into the cache; on success the lists are stamped fresh for these sources."""
    rc, out = work.host_apt("update", "--error-on=any")
    output.append(out)
    problems = [line for line in _important(out) if line.startswith(("E:", "Err:"))]
    if rc != 0 or problems:
        raise _failure("cannot read the package lists", out, DownloadFailed)
    stamp = work.cache / LISTS_STAMP
    tmp = stamp.with_name(f".{stamp.name}.{os.getpid()}")
    tmp.write_text(work.lists_key + "\n")
    os.replace(tmp, stamp)


def lists_fresh(work: _Workspace, max_age: float | None = None) -> bool:
    """Whether the cache's package lists were fetched for these very sources less than *max_age* seconds ago.

    The stamp names what the lists were fetched for (:attr:`_Workspace.lists_key`):
    other sources, keyrings or architectures make them stale at once.
    """
    max_age = LISTS_MAX_AGE if max_age is None else max_age
    stamp = work.cache / LISTS_STAMP
    try:
        key = stamp.read_text().strip()
        age = time.time() - stamp.stat().st_mtime
    except OSError:
        return False
    return key == work.lists_key and 0 <= age < max_age


def _installed_by(before: list[Package], after: list[Package]) -> list[Package]:
    """The packages an install added or changed; refused if it removed any (``--no-remove`` promises not)."""
    now = {p.key for p in after}
    gone = sorted(p.key for p in before if p.key not in now)
    if gone:
        raise AptFailed(f"apt in the new root removed {', '.join(gone)}, which was not asked for")
    was = set(before)
    return [p for p in after if p not in was]


def _deb_sha256(path: Path) -> str | None:
    """The SHA-256 of the .deb a package was installed from; None if it is not at hand."""
    try:
        return _sha256(path)
    except FileNotFoundError:
        return None


def remove(root: Path, packages: list[str], *, purge: bool = False, workdir: Path | None = None) -> Outcome:
    """Remove *packages* from *root* (their prerm and postrm run in the sandbox).

    Refused if another package depends on one of them (apt would remove it
    too) or if one is not installed. Needs no sources and no network.
    """
    sandbox.check_available()
    if not packages:
        raise InvalidInput("nothing to remove")
    check_package_specs(packages)
    before = installed_packages(root)
    names = {p.name for p in before}
    missing = [p for p in packages if p.partition(":")[0] not in names]
    if missing:
        raise PackageNotFound(f"not installed in the root: {', '.join(missing)}")
    work = _Workspace(root, [], None, trusted_parts=None, recommends=False, under=workdir)
    try:
        verb = "purge" if purge else "remove"
        rc, out = work.host_apt("-y", "-s", verb, *packages)
        if rc != 0:
            raise _failure(f"cannot remove {' '.join(packages)}", out)
        plan_out = _removals(out)
        others = sorted(set(plan_out) - {p.partition(":")[0] for p in packages})
        if others:
            raise Unsatisfiable(f"removing {' '.join(packages)} would also remove {', '.join(others)} "
                                "(they depend on it)", _important(out))
        rc, out2 = work.root_apt("-y", verb, *packages)
        if rc != 0:
            raise _failure(f"apt-get {verb} in the new root failed", out2, ScriptFailed)
        after = _check_removal(root, before, plan_out)
        removed = [p for p in before if p.name in plan_out]
        return Outcome(packages=after, removed=removed, output=out + out2)
    finally:
        work.close()


def audit(root: Path) -> str:
    """``dpkg --audit`` in the root: empty when the database is consistent."""
    result = sandbox.run(root, ["dpkg", "--audit"])
    return sandbox.output_text(result)
