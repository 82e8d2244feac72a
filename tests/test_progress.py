"""Progress on a terminal: shown on stderr when it is one, never otherwise, never with -q or --json.

The commands run as real processes with stderr on a pseudo-terminal (or a
pipe) and stdout on a pipe.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from aptlayer.composefs import prehash
from aptlayer.linux import forked

#: enough content to be hashed ahead on two cores (MIN_BYTES), in two batches
MIB = 1 << 20


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    src = tmp_path_factory.mktemp("progress") / "src"
    for d in range(4):
        (src / f"d{d}").mkdir(parents=True)
        for i in range(12):
            (src / f"d{d}" / f"f{i}").write_bytes(os.urandom(MIB // 2 + i))
    return src


def run(root: Path, *args: str, tty: bool = True) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of ``apt-layer --root ROOT ARGS``, stderr on a terminal if ``tty``."""
    cmd = [sys.executable, "-m", "aptlayer", "--root", str(root), *args]
    if not tty:
        p = subprocess.run(cmd, capture_output=True, text=True)
        return p.returncode, p.stdout, p.stderr
    master, slave = os.openpty()
    try:
        p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=slave)
    finally:
        os.close(slave)
    err = b""
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:  # EIO: the last holder of the terminal's other side is gone
            break
        if not chunk:
            break
        err += chunk
    os.close(master)
    out = p.stdout.read().decode()
    return p.wait(), out, err.decode(errors="replace")


def test_create_shows_hashing_then_files_on_a_terminal(tmp_path: Path, source: Path) -> None:
    if not forked.helper_allowed():
        pytest.skip("hashing ahead needs two CPUs")
    assert 48 * MIB // 2 >= prehash.MIN_BYTES
    rc, out, err = run(tmp_path / "root", "image", "create", "--backend", "python", str(source), "base")
    assert rc == 0
    assert out.startswith("base  ") and "\x1b" not in out  # the result alone on stdout
    assert "\r\x1b[Kcreating base: 0 B of 24.0 MiB hashed" in err  # the first call is always shown
    assert err.endswith("\r\x1b[K")  # and the line is cleared at the end


def test_no_progress_when_quiet_in_json_or_without_a_terminal(tmp_path: Path, source: Path) -> None:
    root = tmp_path / "root"
    rc, out, err = run(root, "-q", "image", "create", "--backend", "python", str(source), "one")
    assert (rc, err) == (0, "")
    rc, out, err = run(root, "image", "create", "--backend", "python", "--json", str(source), "two")
    assert rc == 0 and err == "" and json.loads(out)["name"] == "two"
    rc, out, err = run(root, "image", "create", "--backend", "python", str(source), "three", tty=False)
    assert rc == 0 and err == "" and out.startswith("three  ")


def test_gc_and_fsck_show_progress_on_a_terminal(tmp_path: Path, source: Path) -> None:
    root = tmp_path / "root"
    assert run(root, "-q", "image", "create", "--backend", "python", str(source), "one")[0] == 0
    rc, out, err = run(root, "fsck")
    assert rc == 0 and "\r\x1b[Kfsck: 0/48" in err and "checked 48 objects: ok" in out
    assert run(root, "-q", "image", "delete", "one")[0] == 0
    rc, out, err = run(root, "gc")
    assert rc == 0 and "gc: " in err and out.startswith("removed 48 objects")
    assert "gc: " not in run(root, "gc", "--json")[2]
