"""The kernel's fs-verity ioctls, on the file system the tests run on."""

from __future__ import annotations

import os

import pytest

from aptlayer.composefs import fsverity
from aptlayer.linux import verity


def test_kernel_ioctls_agree_with_support_probe(tmp_path) -> None:
    p = tmp_path / "f"
    p.write_bytes(b"data")
    fd = os.open(p, os.O_RDONLY)
    try:
        assert verity.measure(fd) is None  # never enabled on this file
        if verity.supported(tmp_path):
            assert verity.enable(fd) is True
            assert verity.enable(fd) is False
            assert verity.measure(fd) == fsverity.digest_bytes(b"data")
        else:
            with pytest.raises(verity.VerityUnsupported):
                verity.enable(fd)
    finally:
        os.close(fd)
    # the probe leaves nothing behind
    assert sorted(x.name for x in tmp_path.iterdir()) == ["f"]
