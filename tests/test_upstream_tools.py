"""Finding the upstream composefs tools: never apt-layer's own drop-ins under their names."""

from __future__ import annotations

from pathlib import Path

from aptlayer.composefs.upstream import find_tool

LAUNCHER = Path(__file__).resolve().parent.parent / "debian" / "apt-layer.launcher"


def _executable(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(0o755)
    return path


def test_the_drop_ins_of_the_debian_package_are_not_upstream(tmp_path, monkeypatch):
    """apt-layer-composefs-tools links /usr/sbin/mount.composefs to apt-layer: taken for
    upstream, ``image mount`` (backend auto) would run apt-layer again through it."""
    ours = _executable(tmp_path / "ours/mount.composefs", LAUNCHER.read_text())
    theirs = _executable(tmp_path / "theirs/mount.composefs", "\x7fELF-ish\n")
    monkeypatch.delenv("APT_LAYER_COMPOSEFS_BIN", raising=False)
    monkeypatch.setenv("PATH", f"{ours.parent}:{theirs.parent}")
    assert find_tool("mount.composefs") == str(theirs)
    monkeypatch.setenv("PATH", str(ours.parent))
    assert find_tool("mount.composefs") in (None, "/usr/sbin/mount.composefs", "/sbin/mount.composefs")
    assert find_tool("mount.composefs") != str(ours)


def test_composefs_bin_comes_first_and_takes_its_sbin(tmp_path, monkeypatch):
    prefix = tmp_path / "prefix"
    mk = _executable(prefix / "bin/mkcomposefs", "#!/bin/sh\n")
    helper = _executable(prefix / "sbin/mount.composefs", "#!/bin/sh\n")
    _executable(tmp_path / "path/mkcomposefs", "#!/bin/sh\n")
    monkeypatch.setenv("APT_LAYER_COMPOSEFS_BIN", str(prefix / "bin"))
    monkeypatch.setenv("PATH", str(tmp_path / "path"))
    assert find_tool("mkcomposefs") == str(mk)
    assert find_tool("mount.composefs") == str(helper)
    monkeypatch.delenv("APT_LAYER_COMPOSEFS_BIN")
    assert find_tool("mkcomposefs") == str(tmp_path / "path/mkcomposefs")
    assert find_tool("composefs-info") is None or find_tool("composefs-info").startswith(("/usr/sbin", "/sbin"))
