"""The host's apt sources, read from synthetic /etc/apt trees (no network)."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from aptlayer.errors import InvalidInput, NotFound
from aptlayer.packages.sources import (Source, SourcesError, archive_source, archive_uri, parse_deb822,
                                       parse_one_line, read_sources, render_deb822)

DEB822 = textwrap.dedent("""\
    Types: deb deb-src
    # a comment inside the stanza, as Debian's installer writes
    URIs: file:/srv/archive/debian
    Suites: bookworm bookworm-updates
    Components: main contrib
    Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

    Types: deb
    URIs: file:/srv/security/debian-security
    Suites: bookworm-security
    Components: main
    Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

    Types: deb
    URIs: file:/srv/off/debian
    Suites: sid
    Components: main
    Enabled: no
    """)


def etc_apt(tmp_path: Path, files: dict[str, str]) -> Path:
    etc = tmp_path / "etc-apt"
    for name, text in files.items():
        path = etc / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return etc


def test_deb822_stanzas_fields_and_disabled_entries() -> None:
    first, second = parse_deb822(DEB822, "debian.sources")
    assert first.types == ("deb", "deb-src")
    assert first.uris == ("file:/srv/archive/debian",)
    assert first.suites == ("bookworm", "bookworm-updates")
    assert first.components == ("main", "contrib")
    assert first.signed_by == ("/usr/share/keyrings/debian-archive-keyring.gpg",)
    assert first.keyring_files() == first.signed_by
    assert first.origin == "debian.sources:stanza 1"
    assert second.suites == ("bookworm-security",)  # the Enabled: no stanza is gone


def test_deb822_inline_key_and_trusted() -> None:
    text = textwrap.dedent("""\
        Types: deb
        URIs: file:/srv/example/repo
        Suites: stable
        Components: main
        Trusted: yes
        Signed-By:
         -----BEGIN PGP PUBLIC KEY BLOCK-----
         .
         mDMEZabc
         -----END PGP PUBLIC KEY BLOCK-----
        """)
    (source,) = parse_deb822(text)
    assert source.trusted is True
    assert source.signed_by == ()
    assert source.signed_by_key == ("-----BEGIN PGP PUBLIC KEY BLOCK-----\n\nmDMEZabc\n"
                                    "-----END PGP PUBLIC KEY BLOCK-----\n")


def test_one_line_options_flat_repositories_and_comments() -> None:
    text = textwrap.dedent("""\
        # the main archive
        deb [arch=amd64,arm64 signed-by=/k/a.gpg trusted=yes] file:/srv/a/debian bookworm main non-free
        deb-src file:/srv/a/debian bookworm main
        deb file:/srv/flat ./   # a flat repository needs no component
        """)
    main, src, flat = parse_one_line(text, "sources.list")
    assert main == Source(uris=("file:/srv/a/debian",), suites=("bookworm",),
                          components=("main", "non-free"), signed_by=("/k/a.gpg",), trusted=True,
                          architectures=("amd64", "arm64"))
    assert main.origin == "sources.list:2"
    assert src.types == ("deb-src",) and not src.is_binary
    assert flat.suites == ("./",) and flat.components == ()


@pytest.mark.parametrize("line,why", [
    ("deb file:/srv/a/debian bookworm", "component is required"),
    ("rpm file:/srv/a/debian bookworm main", "expected deb or deb-src"),
    ("deb [arch=amd64 file:/srv/a bookworm main", "unclosed"),
    ("deb [trusted] file:/srv/a bookworm main", "has no value"),
    ("deb [trusted=maybe] file:/srv/a bookworm main", "expected yes or no"),
    ("deb file:/srv/a", "expected URI and suite"),
])
def test_one_line_errors_name_file_and_line(line: str, why: str) -> None:
    with pytest.raises(SourcesError, match=why) as err:
        parse_one_line(f"# first\n{line}\n", "/etc/apt/sources.list")
    assert "/etc/apt/sources.list:2" in str(err.value)
    assert isinstance(err.value, InvalidInput)


def test_deb822_missing_field_is_an_error() -> None:
    with pytest.raises(SourcesError, match="stanza 1: no Uris field"):
        parse_deb822("Types: deb\nSuites: bookworm\nComponents: main\n", "x.sources")


def test_read_sources_reads_what_apt_reads_in_apts_order(tmp_path: Path) -> None:
    etc = etc_apt(tmp_path, {
        "sources.list": "deb file:/srv/list/debian bookworm main\n",
        "sources.list.d/b.sources": DEB822,
        "sources.list.d/a.list": "deb file:/srv/a-list/debian bookworm main\n",
        "sources.list.d/old.list.disabled": "deb file:/srv/ignored/debian bookworm main\n",
        "sources.list.d/notes.txt": "not a source\n",
    })
    uris = [s.uris[0] for s in read_sources(etc)]
    assert uris == ["file:/srv/list/debian", "file:/srv/a-list/debian",
                    "file:/srv/archive/debian",
                    "file:/srv/security/debian-security"]


def test_read_sources_of_an_empty_etc(tmp_path: Path) -> None:
    assert read_sources(tmp_path) == []


def test_archive_is_the_release_suite_not_security_or_updates() -> None:
    sources = parse_one_line(
        "deb file:/srv/sec/debian-security bookworm-security main\n"
        "deb file:/srv/upd/debian bookworm-updates main\n"
        "deb file:/srv/ppa/flat ./\n") + parse_deb822(DEB822)
    assert archive_uri(sources) == "file:/srv/archive/debian"
    # a suite listed exactly wins, whatever its name
    assert archive_uri(sources, "bookworm-security") == "file:/srv/sec/debian-security"
    # another release comes from the same archive
    assert archive_source(sources, "trixie").signed_by == ("/usr/share/keyrings/debian-archive-keyring.gpg",)


def test_no_archive_in_the_sources_is_not_found() -> None:
    sources = parse_one_line("deb file:/srv/sec/debian-security bookworm-security main\n"
                             "deb-src file:/srv/a/debian bookworm main\n")
    with pytest.raises(NotFound, match="pass --mirror"):
        archive_uri(sources)


def test_render_maps_keyrings_and_uris_and_reads_back() -> None:
    sources = parse_deb822(DEB822) + parse_one_line("deb [trusted=yes] file:/srv/repo stable main\n")
    text = render_deb822(sources, {"/usr/share/keyrings/debian-archive-keyring.gpg": "/run/k/0.gpg"},
                         lambda uri: uri.replace("file:", "copy:"))
    again = parse_deb822(text)
    assert [s.signed_by for s in again] == [("/run/k/0.gpg",), ("/run/k/0.gpg",), ()]
    assert again[2].uris == ("copy:/srv/repo",) and again[2].trusted
    assert [s.suites for s in again] == [s.suites for s in sources]
    assert [s.components for s in again] == [s.components for s in sources]
