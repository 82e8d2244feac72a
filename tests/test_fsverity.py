"""fs-verity digests against the shared vectors, a naive model and upstream."""

from __future__ import annotations

import hashlib
import io
import os
import struct
import subprocess

import pytest

from aptlayer.composefs import fsverity
from conftest import VECTORS, vector_names


def object_files() -> list[str]:
    """Every object of the shared pool, as ``xx/yyyy...`` (read from disk)."""
    pool = VECTORS / "objects"
    if not pool.is_dir():
        return []
    return sorted(f"{d.name}/{f.name}" for d in pool.iterdir() if d.is_dir() for f in d.iterdir())


def naive_digest(data: bytes) -> bytes:
    """A deliberately plain model of the Merkle tree (composefs-format.md §13)."""

    def hash_level(buf: bytes) -> bytes:
        blocks = [buf[i : i + 4096] for i in range(0, len(buf), 4096)]
        return b"".join(hashlib.sha256(b.ljust(4096, b"\0")).digest() for b in blocks)

    root = b""
    if data:
        level = hash_level(data)
        while len(level) > 32:
            level = hash_level(level)
        root = level
    desc = bytes([1, 1, 12, 0]) + bytes(4) + struct.pack("<Q", len(data))
    desc += root.ljust(64, b"\0") + bytes(32) + bytes(144)
    assert len(desc) == 256
    return hashlib.sha256(desc).digest()


# Sizes around the block (4096) and the level-1 fan-out (128 hashes per block).
SIZES = [1, 6, 64, 65, 4095, 4096, 4097, 8192, 128 * 4096, 128 * 4096 + 1, 129 * 4096 - 7,
         128 * 128 * 4096 + 4096]


@pytest.mark.parametrize("relpath", object_files())
def test_pool_object_named_by_its_digest(relpath: str) -> None:
    path = VECTORS / "objects" / relpath
    assert fsverity.object_path(fsverity.digest_file(path)) == relpath
    assert fsverity.measure_file(path).hex() == relpath.replace("/", "")


@pytest.mark.parametrize("name", vector_names())
def test_vector_image_digest(name: str) -> None:
    expected = (VECTORS / name / "digest.txt").read_text().strip()
    assert fsverity.measure_file(VECTORS / name / "image.cfs").hex() == expected


@pytest.mark.parametrize("size", SIZES)
def test_matches_naive_model(size: int) -> None:
    data = hashlib.shake_256(str(size).encode()).digest(size)
    assert fsverity.digest_bytes(data) == naive_digest(data)


@pytest.mark.parametrize("chunk", [1, 100, 4095, 4096, 5000, 1 << 20])
def test_incremental_updates_do_not_matter(chunk: int) -> None:
    data = hashlib.shake_256(b"inc").digest(3 * 4096 * 130 + 17)
    h = fsverity.VerityHasher()
    for i in range(0, len(data), chunk):
        h.update(data[i : i + chunk])
    assert h.size == len(data)
    assert h.digest() == fsverity.digest_bytes(data)
    assert fsverity.digest_stream(io.BytesIO(data)) == h.digest()


def test_spec_worked_examples() -> None:
    # composefs-format.md §13: values that fsverity-utils 1.5 and composefs-info agree on.
    assert fsverity.digest_bytes(b"hello\n").hex() == (
        "9c76eecc7b76fcb46199cb27b90cf59a660e10575bb0412128905129d5b1c2aa"
    )
    assert fsverity.digest_bytes(b"A" * 4096).hex() == (
        "3fd7a78101899a79cd337b1b4e5414be8bcb376b133370156ef6e65026d930ed"
    )
    assert fsverity.digest_bytes(b"A" * 4097).hex() == (
        "7319937c445f61df1a8f310eb4d6da157618d80713972a78d70a7528fc1a6f32"
    )


def test_empty_data_conventions() -> None:
    kernel = fsverity.digest_bytes(b"")
    assert kernel == naive_digest(b"")  # root hash all zeros
    assert kernel.hex() == "3d248ca542a24fc62d1c43b916eae5016878e2533c88238480b26128a1f1af95"
    legacy = fsverity.digest_bytes(b"", legacy_empty=True)
    assert legacy.hex() == "cfc3391077edfd51859f6e5e16e03f82b1da3ee1a35d418b0d0b3b57740b4405"
    # the flag only ever changes empty input
    assert fsverity.digest_bytes(b"x", legacy_empty=True) == fsverity.digest_bytes(b"x")


def test_fd_and_file_agree(tmp_path) -> None:
    data = os.urandom(300_000)
    p = tmp_path / "f"
    p.write_bytes(data)
    fd = os.open(p, os.O_RDONLY)
    try:
        os.lseek(fd, 1234, os.SEEK_SET)  # the fd offset is not used
        assert fsverity.digest_fd(fd, len(data)) == fsverity.digest_bytes(data)
        assert os.lseek(fd, 0, os.SEEK_CUR) == 1234
        assert fsverity.digest_fd(fd) == fsverity.digest_bytes(data)
        with pytest.raises(ValueError, match="shrank"):
            fsverity.digest_fd(fd, len(data) + 1)
    finally:
        os.close(fd)
    assert fsverity.digest_file(p) == fsverity.measure_file(p) == fsverity.digest_bytes(data)


def test_object_path() -> None:
    d = bytes(range(32))
    assert fsverity.object_path(d) == "00/" + d.hex()[2:]
    with pytest.raises(ValueError):
        fsverity.object_path(b"short")


@pytest.mark.upstream
@pytest.mark.parametrize("size", [0, *SIZES[:9]])
def test_same_as_composefs_info_measure_file(composefs_info: str, tmp_path, size: int) -> None:
    data = hashlib.shake_256(b"m" + str(size).encode()).digest(size) if size else b""
    p = tmp_path / "f"
    p.write_bytes(data)
    out = subprocess.run([composefs_info, "measure-file", str(p)], capture_output=True, check=True)
    # composefs 1.0.8 computes empty files the legacy way (see fsverity module docstring)
    assert out.stdout.decode().strip() == fsverity.digest_bytes(data, legacy_empty=True).hex()
