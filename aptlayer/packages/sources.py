"""The host's apt sources: where packages come from, and which keys sign them.

apt-layer never names a mirror itself. A bootstrap without ``--mirror`` uses
the archive that the host's apt configuration names, and apt inside a new
root sees the host's sources and keyrings (a caller may pass others, for
example from config.toml). Both formats apt reads are understood:

* deb822 files, ``/etc/apt/sources.list.d/*.sources`` (parsed with
  python-debian), where ``Signed-By`` may hold keyring paths, fingerprints or
  a whole armored key;
* one-line files, ``/etc/apt/sources.list`` and ``sources.list.d/*.list``:
  ``deb [opt=value ...] URI SUITE [COMPONENT ...]``.

Only ``deb`` entries matter here (``deb-src`` are read but never used to
install). :func:`render_deb822` writes sources back as one deb822 file whose
keyring paths the caller maps, so the same sources can be handed to apt on
the host and inside a sandbox where the keyrings sit elsewhere.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from debian.deb822 import Deb822

from ..errors import InvalidInput, NotFound

ETC_APT = Path("/etc/apt")


class SourcesError(InvalidInput):
    """An apt sources file that cannot be read as apt would read it."""


@dataclass(frozen=True)
class Source:
    """One sources entry (a deb822 stanza or a one-line ``deb`` line)."""

    uris: tuple[str, ...]
    suites: tuple[str, ...]
    components: tuple[str, ...] = ()
    types: tuple[str, ...] = ("deb",)
    #: keyring files (absolute paths) and key fingerprints, as apt's Signed-By
    signed_by: tuple[str, ...] = ()
    #: an armored public key given inline in a deb822 Signed-By field
    signed_by_key: str | None = None
    #: apt's ``trusted=yes``: accepted without a valid signature
    trusted: bool = False
    architectures: tuple[str, ...] = ()
    #: where it was read ("file:line"), for messages
    origin: str = field(default="", compare=False)

    @property
    def is_binary(self) -> bool:
        return "deb" in self.types

    def keyring_files(self) -> tuple[str, ...]:
        """The Signed-By entries that are keyring files (not fingerprints)."""
        return tuple(item for item in self.signed_by if item.startswith("/"))


def _words(value: str) -> tuple[str, ...]:
    return tuple(value.replace(",", " ").split())


def _yes(value: str, origin: str, key: str) -> bool:
    lowered = value.strip().lower()
    if lowered in ("yes", "true", "1"):
        return True
    if lowered in ("no", "false", "0"):
        return False
    raise SourcesError(f"{origin}: {key}: expected yes or no, not {value!r}")


def parse_deb822(text: str, origin: str = "<sources>") -> list[Source]:
    """The entries of a deb822 ``.sources`` file (``Enabled: no`` skipped)."""
    out: list[Source] = []
    for number, stanza in enumerate(Deb822.iter_paragraphs(text.splitlines(keepends=True)), 1):
        where = f"{origin}:stanza {number}"
        fields = {key.lower(): value for key, value in stanza.items()}
        if "enabled" in fields and not _yes(fields["enabled"], where, "Enabled"):
            continue
        for required in ("types", "uris", "suites"):
            if not fields.get(required, "").strip():
                raise SourcesError(f"{where}: no {required.capitalize()} field")
        suites = _words(fields["suites"])
        components = _words(fields.get("components", ""))
        if any(not s.endswith("/") for s in suites) and not components:
            raise SourcesError(f"{where}: Components is required unless the suite is a path ending in /")
        signed = fields.get("signed-by", "").strip()
        inline = signed if "\n" in signed or "BEGIN PGP" in signed else None
        out.append(Source(
            uris=_words(fields["uris"]),
            suites=suites,
            components=components,
            types=_words(fields["types"]),
            signed_by=() if inline else _words(signed),
            signed_by_key=_armored(inline) if inline else None,
            trusted=_yes(fields["trusted"], where, "Trusted") if "trusted" in fields else False,
            architectures=_words(fields.get("architectures", "")),
            origin=where,
        ))
    return out


def _armored(value: str) -> str:
    """A deb822 multi-line key back to armor: ``.`` lines stand for blank ones."""
    lines = [line.strip() for line in value.strip().splitlines()]
    return "\n".join("" if line == "." else line for line in lines) + "\n"


def parse_one_line(text: str, origin: str = "<sources.list>") -> list[Source]:
    """The entries of a one-line ``sources.list`` file."""
    out: list[Source] = []
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        where = f"{origin}:{number}"
        kind, _, rest = line.partition(" ")
        if kind not in ("deb", "deb-src"):
            raise SourcesError(f"{where}: expected deb or deb-src, not {kind!r}")
        options: dict[str, str] = {}
        rest = rest.strip()
        if rest.startswith("["):
            close = rest.find("]")
            if close < 0:
                raise SourcesError(f"{where}: unclosed [ in the options")
            for option in rest[1:close].split():
                key, eq, value = option.partition("=")
                if not eq:
                    raise SourcesError(f"{where}: option {option!r} has no value")
                options[key.lower()] = value
            rest = rest[close + 1:].strip()
        parts = rest.split()
        if len(parts) < 2:
            raise SourcesError(f"{where}: expected URI and suite")
        uri, suite, components = parts[0], parts[1], tuple(parts[2:])
        if not suite.endswith("/") and not components:
            raise SourcesError(f"{where}: a component is required unless the suite is a path ending in /")
        out.append(Source(
            uris=(uri,),
            suites=(suite,),
            components=components,
            types=(kind,),
            signed_by=_words(options.get("signed-by", "")),
            trusted=_yes(options["trusted"], where, "trusted") if "trusted" in options else False,
            architectures=_words(options.get("arch", "")),
            origin=where,
        ))
    return out


def read_sources(etc_apt: Path = ETC_APT) -> list[Source]:
    """Every entry of the sources apt reads under *etc_apt*, in apt's order.

    ``sources.list`` first, then ``sources.list.d/`` in name order; files
    apt ignores there (other extensions, ``.disabled`` and the like) are
    ignored here too.
    """
    out: list[Source] = []
    main = etc_apt / "sources.list"
    if main.is_file():
        out += parse_one_line(_read(main), str(main))
    parts = etc_apt / "sources.list.d"
    if parts.is_dir():
        for path in sorted(parts.iterdir()):
            if path.suffix == ".list" and path.is_file():
                out += parse_one_line(_read(path), str(path))
            elif path.suffix == ".sources" and path.is_file():
                out += parse_deb822(_read(path), str(path))
    return out


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise SourcesError(f"{path}: cannot read: {exc}") from None


def archive_source(sources: list[Source], suite: str | None = None) -> Source:
    """The source that names the distribution's main archive.

    With *suite*, the first binary source listing exactly that suite;
    otherwise (or if none lists it) the first binary source with a ``main``
    component and a plain release suite (``bookworm``, ``stable``: no
    ``-security``, ``-updates`` or flat ``./`` suite). The archive holds
    every release, so a host on one release can bootstrap another.
    """
    binary = [s for s in sources if s.is_binary]
    if suite is not None:
        for source in binary:
            if suite in source.suites:
                return source
    for source in binary:
        if "main" in source.components and any("-" not in s and "/" not in s for s in source.suites):
            return source
    raise NotFound("the host's apt sources name no distribution archive "
                   "(a deb entry with a release suite and the main component); pass --mirror")


def archive_uri(sources: list[Source], suite: str | None = None) -> str:
    """The URI of :func:`archive_source`, as mmdebstrap takes it."""
    return archive_source(sources, suite).uris[0]


def render_deb822(sources: list[Source], keyring_path: dict[str, str],
                  rewrite_uri=None) -> str:
    """*sources* as one deb822 file, for an apt that reads it elsewhere.

    *keyring_path* maps each keyring file of a Signed-By (and, under the
    key ``"inline:N"``, the inline key of the N-th source) to the path the
    reading apt finds it at; fingerprints are kept as they are.
    *rewrite_uri*, if given, maps each URI (apt-layer turns ``file:`` into
    ``copy:`` so that local packages land in the download cache too).
    """
    stanzas = []
    for number, source in enumerate(sources):
        uris = [rewrite_uri(u) if rewrite_uri else u for u in source.uris]
        lines = [f"Types: {' '.join(source.types)}", f"URIs: {' '.join(uris)}",
                 f"Suites: {' '.join(source.suites)}"]
        if source.components:
            lines.append(f"Components: {' '.join(source.components)}")
        if source.architectures:
            lines.append(f"Architectures: {' '.join(source.architectures)}")
        signed = [keyring_path.get(item, item) for item in source.signed_by]
        if source.signed_by_key is not None:
            signed.append(keyring_path[f"inline:{number}"])
        if signed:
            lines.append(f"Signed-By: {' '.join(signed)}")
        if source.trusted:
            lines.append("Trusted: yes")
        stanzas.append("\n".join(lines) + "\n")
    return "\n".join(stanzas)
