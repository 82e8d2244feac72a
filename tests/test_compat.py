"""`apt-layer composefs mkcomposefs|info`: upstream's arguments, outputs and exit codes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, VECTORS, vector_flags, vector_names

APT = [sys.executable, "-m", "aptlayer", "composefs"]
ENV = {**os.environ, "PYTHONPATH": str(REPO)}


def run(args: list[str], *, stdin: bytes | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(args, input=stdin, capture_output=True, env=ENV, cwd=cwd)


def ours(tool: str, *args: str, **kw) -> subprocess.CompletedProcess:
    return run([*APT, tool, *args], **kw)


def _source(name: str) -> Path:
    d = VECTORS / name
    return d / "input.dump" if (d / "input.dump").exists() else d / "dump.txt"


def _version_flags(name: str) -> list[str]:
    return [f for f in vector_flags(name) if f.startswith(("--min-version", "--max-version"))]


@pytest.mark.parametrize("name", vector_names())
def test_mkcomposefs_from_file_and_info_match_the_vector(vectors, tmp_path, name):
    out = tmp_path / "img.cfs"
    r = ours("mkcomposefs", "--from-file", "--print-digest", *_version_flags(name), str(_source(name)), str(out))
    assert r.returncode == 0, r.stderr
    assert out.read_bytes() == (vectors / name / "image.cfs").read_bytes()
    assert r.stdout == (vectors / name / "digest.txt").read_bytes()
    for cmd, expected in (("dump", "dump.txt"), ("ls", "ls.txt"), ("objects", "objects.txt")):
        r = ours("info", cmd, str(out))
        assert r.returncode == 0, r.stderr
        assert r.stdout == (vectors / name / expected).read_bytes(), cmd
    r = ours("info", "measure-file", str(out))
    assert r.stdout == (vectors / name / "digest.txt").read_bytes()


def test_stdin_to_stdout(vectors, tmp_path):
    dump = (vectors / "ff-basic" / "input.dump").read_bytes()
    r = ours("mkcomposefs", "--from-file", "-", "-", stdin=dump)
    assert r.returncode == 0, r.stderr
    assert r.stdout == (vectors / "ff-basic" / "image.cfs").read_bytes()


def test_print_digest_only_writes_nothing(vectors, tmp_path):
    r = ours("mkcomposefs", "--from-file", "--print-digest-only", str(vectors / "ff-basic" / "input.dump"),
             cwd=tmp_path)
    assert r.returncode == 0
    assert r.stdout == (vectors / "ff-basic" / "digest.txt").read_bytes()
    assert list(tmp_path.iterdir()) == []


def test_bad_dump_names_the_line_and_leaves_no_image(tmp_path):
    dump = b"/ 0 40755 2 0 0 0 0.0 - - -\n/a 0 100644 1 0 0 0 0.0 - - -\n/x/y 0 100644 1 0 0 0 0.0 - - -\n"
    out = tmp_path / "out.cfs"
    r = ours("mkcomposefs", "--from-file", "-", str(out), stdin=dump)
    assert r.returncode == 1
    assert b"line 3" in r.stderr and b"/x/y" in r.stderr
    assert b"Traceback" not in r.stderr
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_failing_build_keeps_the_old_destination(tmp_path):
    out = tmp_path / "out.cfs"
    out.write_bytes(b"old image")
    r = ours("mkcomposefs", "--from-file", "-", str(out), stdin=b"not a dump\n")
    assert r.returncode == 1
    assert out.read_bytes() == b"old image"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.cfs"]


BAD_MKCOMPOSEFS = [
    [],
    ["onlysource"],
    ["a", "b", "c"],
    ["--threads=0", "a", "b"],
    ["--threads=x", "a", "b"],
    ["--min-version=x", "a", "b"],
    ["--bogus", "a", "b"],
    ["/nonexistent-source", "{tmp}/x.cfs"],
    ["--from-file", "/nonexistent.dump", "{tmp}/x.cfs"],
    ["--print-digest-only", "a", "b"],
    ["--max-version=2", "{vectors}/ff-basic", "{tmp}/x.cfs"],
    ["", "x"],
]

BAD_INFO = [
    [],
    ["ls"],
    ["bogus", "{vectors}/ff-basic/image.cfs"],
    ["ls", "/nonexistent.cfs"],
    ["ls", "/etc/hostname"],
    ["--filter=d/x", "dump", "{vectors}/ff-basic/image.cfs"],
    ["missing-objects", "--basedir=/nonexistent", "{vectors}/dedupe/image.cfs"],
    ["--bogus", "ls", "x"],
]


def _fill(args: list[str], tmp: Path) -> list[str]:
    return [a.format(tmp=tmp, vectors=VECTORS) for a in args]


@pytest.mark.parametrize("args", BAD_MKCOMPOSEFS, ids=lambda a: " ".join(a) or "no-args")
def test_mkcomposefs_errors_exit_1_without_traceback(vectors, tmp_path, args):
    r = ours("mkcomposefs", *_fill(args, tmp_path))
    assert r.returncode == 1
    assert r.stderr.strip() and b"Traceback" not in r.stderr
    assert not (tmp_path / "x.cfs").exists()


@pytest.mark.parametrize("args", BAD_INFO, ids=lambda a: " ".join(a) or "no-args")
def test_info_errors_exit_1_without_traceback(vectors, tmp_path, args):
    r = ours("info", *_fill(args, tmp_path))
    assert r.returncode == 1
    assert r.stderr.strip() and b"Traceback" not in r.stderr


@pytest.mark.upstream
@pytest.mark.parametrize("args", BAD_MKCOMPOSEFS, ids=lambda a: " ".join(a) or "no-args")
def test_mkcomposefs_errors_like_upstream(vectors, tmp_path, mkcomposefs, args):
    up = run([mkcomposefs, *_fill(args, tmp_path)])
    mine = ours("mkcomposefs", *_fill(args, tmp_path))
    assert mine.returncode == up.returncode
    # The first line carries the same words as upstream's (ours may add the file or line).
    first = up.stderr.decode().splitlines()[0].removeprefix("mkcomposefs: ")
    for word in first.split()[:2]:
        assert word.encode() in mine.stderr, (first, mine.stderr)


@pytest.mark.upstream
@pytest.mark.parametrize("args", BAD_INFO, ids=lambda a: " ".join(a) or "no-args")
def test_info_errors_like_upstream(vectors, tmp_path, composefs_info, args):
    up = run([composefs_info, *_fill(args, tmp_path)])
    mine = ours("info", *_fill(args, tmp_path))
    assert mine.returncode == up.returncode


@pytest.mark.upstream
def test_info_several_images_like_upstream(vectors, composefs_info):
    images = [str(vectors / n / "image.cfs") for n in ("dedupe", "sizes", "symlinks")]
    for cmd in (["ls"], ["dump"], ["objects"], ["--filter=a", "ls"],
                [f"--basedir={vectors / 'objects'}", "missing-objects"]):
        up = run([composefs_info, *cmd, *images])
        mine = ours("info", *cmd, *images)
        assert (mine.returncode, mine.stdout) == (up.returncode, up.stdout), cmd


def test_mount_usage_and_option_errors():
    r = ours("mount", "-h")
    assert r.returncode == 0 and b"basedir=PATH" in r.stderr
    r = ours("mount", "-o", "basedir=/tmp,bogus", "img", "/mnt")
    assert r.returncode == 1 and b"Unsupported option bogus" in r.stderr
    r = ours("mount", "img", "/mnt")
    assert r.returncode == 1 and b"No object dirs specified" in r.stderr
    r = ours("mount", "-o", "basedir=/tmp,upperdir=/x", "img", "/mnt")
    assert r.returncode == 1 and b"Both workdir and upperdir" in r.stderr
    r = ours("mount", "-t", "ext4", "-o", "basedir=/tmp", "img", "/mnt")
    assert r.returncode == 1 and b"Unsupported fs type 'ext4'" in r.stderr


def test_mount_takes_what_mount8_passes_a_helper():
    """mount(8) runs ``mount.composefs IMAGE DIR [-sfnv] [-N NS] -o rw,...``; -f checks and mounts nothing."""
    r = ours("mount", "img", "/nonexistent", "-f", "-n", "-v", "-o", "rw,basedir=/a:/b,nofail,_netdev,x-systemd.automount")
    assert (r.returncode, r.stdout, r.stderr) == (0, b"", b"")
    r = ours("mount", "img", "/nonexistent", "-f", "-o", "rw,basedir=/a,noatime")
    assert r.returncode == 1 and r.stderr == b"mount.composefs: Unsupported option noatime\n"
    r = ours("mount", "img", "/nonexistent", "-s", "-f", "-o", "rw,basedir=/a,noatime")
    assert (r.returncode, r.stderr) == (0, b"")
    r = ours("mount", "img", "/nonexistent", "-f", "-t", "composefs.x", "-o", "basedir=/a")
    assert r.returncode == 1 and b"Unsupported fs type 'composefs.x'" in r.stderr


def test_mount_options_as_mount8_gives_them():
    from aptlayer.cli.dropins import Fail, mount_options

    kw = mount_options(["rw", "basedir=/a:/b", "basedir=/c", "digest=ab", "verity", "idmap=/ns",
                         "upperdir=/u", "workdir=/w", "nofail", "comment=x"])
    assert kw == {"basedirs": ["/a", "/b", "/c"], "digest": "ab", "verity": "require", "idmap": "/ns",
                  "upperdir": "/u", "workdir": "/w", "readonly": False}
    assert mount_options(["rw", "basedir=/a", "ro"])["readonly"] is True
    with pytest.raises(Fail, match="Unsupported option nodev"):
        mount_options(["basedir=/a", "nodev"])


def test_mount_in_a_namespace_that_does_not_exist_says_so():
    r = ours("mount", "-N", "/nonexistent/ns", "-o", "basedir=/a", "img", "/mnt")
    assert r.returncode == 1
    assert r.stderr == b"mount.composefs: Failed to open namespace /nonexistent/ns: No such file or directory\n"


@pytest.mark.parametrize("program, tool", [("mkcomposefs", "mkcomposefs"), ("composefs-info", "info"),
                                           ("mount.composefs", "mount")])
def test_run_under_a_tool_name_it_is_that_tool(tmp_path, program, tool):
    """The Debian package links /usr/bin/mkcomposefs etc. to apt-layer: argv[0] picks the tool."""
    link = tmp_path / program
    code = "import sys; from aptlayer.cli import main; sys.exit(main())"
    link.write_text(f"#!{sys.executable}\n{code}\n")
    link.chmod(0o755)
    r = run([str(link), "--bogus"])
    assert r.returncode == 1 and f"{program}: ".encode() in r.stderr
    assert r.stderr.splitlines()[1:] == ours(tool, "--bogus").stderr.splitlines()[1:]
