"""tools/rootfs_tree.py recreates a dump's tree: the benchmark's realistic source must be right."""

from __future__ import annotations

import gzip
import sys
from pathlib import Path

from aptlayer.composefs.dumpfile import parse_dump
from aptlayer.composefs.scan import scan

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
from rootfs_tree import build_rootfs_tree  # noqa: E402


def metadata(root) -> dict:
    return {path: (node.size, node.mode, node.uid, node.gid, node.rdev, node.mtime_sec, node.mtime_nsec,
                   node.xattrs, node.payload if node.is_lnk else None)
            for path, node in root.walk()}


def test_special_dump_is_recreated(upstream_tests: Path, tmp_path: Path, as_root) -> None:
    """Devices, a fifo, xattrs, inline and external files: everything but content comes back from a scan."""
    dump = (upstream_tests / "special.dump").read_bytes()
    packed = tmp_path / "special.dump.gz"
    packed.write_bytes(gzip.compress(dump))
    stats = build_rootfs_tree(packed, tmp_path / "tree")
    assert (stats.xattrs_skipped, stats.specials_skipped) == (0, 0)
    want, got = metadata(parse_dump(dump)), metadata(scan(tmp_path / "tree").root)
    assert got.keys() == want.keys()
    for path in want:
        size, *rest = want[path]
        assert got[path][1:] == tuple(rest), path
        if want[path][1] >> 12 != 0o04:  # a directory's size is the file system's
            assert got[path][0] == size, path


def test_same_digest_same_content(tmp_path: Path) -> None:
    lines = [b"/ 4096 40755 2 0 0 0 0.0 - - -",
             b"/a 5000 100644 1 0 0 0 0.0 " + b"ab/" + b"1" * 62 + b" - -",
             b"/b 5000 100644 1 0 0 0 0.0 " + b"ab/" + b"1" * 62 + b" - -",
             b"/c 5000 100644 1 0 0 0 0.0 " + b"cd/" + b"2" * 62 + b" - -"]
    packed = tmp_path / "t.dump.gz"
    packed.write_bytes(gzip.compress(b"\n".join(lines) + b"\n"))
    build_rootfs_tree(packed, tmp_path / "tree")
    a, b, c = ((tmp_path / "tree" / n).read_bytes() for n in "abc")
    assert a == b != c and len(c) == 5000
