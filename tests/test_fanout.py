"""Missing files of a fan-out directory (aptlayer/linux/fanout.py), which the Store's
``absent`` uses for an image's objects: the same answer whether a directory is listed
(many files wanted from it) or each file looked up (a few)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from aptlayer.linux.fanout import LIST_FROM, missing_files


@pytest.mark.parametrize("per_dir", [1, LIST_FROM - 1, LIST_FROM, 3 * LIST_FROM])
def test_missing_files_listed_or_looked_up(tmp_path: Path, per_dir: int) -> None:
    wanted = []
    for d in ("00", "ab"):
        (tmp_path / d).mkdir()
        for i in range(per_dir):
            wanted.append(f"{d}/{i:04x}")
            (tmp_path / d / f"{i:04x}").write_bytes(b"x")
    (tmp_path / "ab/0000").unlink()                                   # gone
    (tmp_path / "00/0000").unlink()
    (tmp_path / "00/0000").symlink_to(tmp_path / "ab" / wanted[-1].split("/")[1])  # a symlink is no object
    os.mkfifo(tmp_path / "ab/fifo")
    wanted += ["ab/fifo", "ff/0000", "no-fanout", "00/sub/deeper"]    # not a file, no directory, other shapes
    expected = ["00/0000", "ab/0000", "ab/fifo", "ff/0000", "no-fanout", "00/sub/deeper"]
    assert missing_files(str(tmp_path), wanted) == expected
    # in the order asked
    assert missing_files(str(tmp_path), list(reversed(wanted))) == list(reversed(expected))


def test_nothing_wanted_nothing_missing(tmp_path: Path) -> None:
    assert missing_files(str(tmp_path / "absent"), []) == []
    assert missing_files(str(tmp_path / "absent"), ["00/11"] * LIST_FROM) == ["00/11"] * LIST_FROM
