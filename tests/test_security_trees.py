"""Rule 3 of docs/security.md: hostile source trees.

A scan never opens a FIFO, socket or device node for reading (a FIFO must
not hang a build), never follows a symlink, and a file swapped between its
``lstat`` and its ``open`` (for a symlink to a secret, or a directory for a
symlink to a directory of secrets) fails the build or is read again: the
secret's content never reaches the store. A thread swaps entries in a loop
while builds run.
"""

from __future__ import annotations

import ctypes
import os
import socket
import stat
import subprocess
import threading
from pathlib import Path

import pytest

from aptlayer import errors
from aptlayer.composefs import fsverity
from aptlayer.composefs.reader import read_path
from aptlayer.store import CreateOptions, Store

from crashkit import cli_args, cli_env

SECRET = b"S3CRET " * 1000
HONEST = b"honest " * 1000  # the same size as the secret: only the identity check tells them apart


def test_fifos_sockets_and_devices_in_a_tree_are_recorded_not_opened(tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "run").mkdir(parents=True)
    os.mkfifo(src / "run" / "fifo")  # opening it for reading would block until a writer came
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(src / "run" / "sock"))
    if os.geteuid() == 0:
        os.mknod(src / "run" / "null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    proc = subprocess.run(cli_args(tmp_path / "store", "image", "create", str(src), "odd"), env=cli_env(),
                          capture_output=True, text=True, timeout=300)  # a guard: a hang fails, not a timing
    sock.close()
    assert proc.returncode == 0, proc.stderr
    image = tmp_path / "store" / "images" / "odd.composefs"
    assert stat.S_ISFIFO(read_path(str(image), b"/run/fifo").mode)
    assert stat.S_ISSOCK(read_path(str(image), b"/run/sock").mode)
    if os.geteuid() == 0:
        node = read_path(str(image), b"/run/null")
        assert stat.S_ISCHR(node.mode) and node.rdev == os.makedev(1, 3)


_libc = ctypes.CDLL(None, use_errno=True)
_AT_FDCWD, _RENAME_EXCHANGE = -100, 2


def _exchange(a: Path, b: Path) -> None:
    """``renameat2(RENAME_EXCHANGE)``: the two names trade places at once, whatever their types."""
    if _libc.renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def _swap_forever(path: Path, target: Path, stop: threading.Event, counter: list[int]) -> None:
    """Alternate ``path`` between the honest entry and a symlink to ``target``, as fast as it goes."""
    link = path.with_name(".swap-link")
    os.symlink(target, link)
    while not stop.is_set():
        _exchange(path, link)  # a symlink to the secret in its place
        _exchange(path, link)  # the honest entry back
        counter[0] += 1


@pytest.mark.parametrize("what", ["file", "directory"])
@pytest.mark.parametrize("threads", [1, 2])
def test_entries_swapped_for_symlinks_during_builds_never_store_the_target(tmp_path: Path, what: str,
                                                                              threads: int) -> None:
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    (secrets / "victim").write_bytes(SECRET)
    src = tmp_path / "src"
    (src / "dir").mkdir(parents=True)
    (src / "dir" / "victim").write_bytes(HONEST)
    for i in range(40):  # company for the victim, so that the scan takes a while
        (src / "dir" / f"other{i}").write_bytes(b"%d" % i * 300)
    path, target = (src / "dir" / "victim", secrets / "victim") if what == "file" else (src / "dir", secrets)
    secret, honest = fsverity.digest_bytes(SECRET), fsverity.digest_bytes(HONEST)
    store = Store.open(tmp_path / "store")
    stop, counter = threading.Event(), [0]
    swapper = threading.Thread(target=_swap_forever, args=(path, target, stop, counter),
                               daemon=True)
    built = refused = as_file = 0
    swapper.start()
    try:
        for i in range(25):
            try:
                store.create(str(src), f"img{i}", CreateOptions(threads=threads))
            except errors.AptLayerError:
                refused += 1
                continue
            built += 1
            victim = read_path(str(store.image_path(f"img{i}")), b"/dir/victim", follow_symlinks=False)
            if victim is not None and stat.S_ISREG(victim.mode):
                assert victim.digest == honest, f"img{i} stored something else than the honest file"
                as_file += 1
    finally:
        stop.set()
        swapper.join()
        store.close()
    assert counter[0] > 0 and built + refused == 25
    objects = tmp_path / "store" / "images" / "objects"
    assert not (objects / fsverity.object_path(secret)).exists()
    # The honest content may be stored by a build that is then refused (its object is garbage
    # for gc); what matters is that an image holding the file as a file has it.
    if as_file:
        assert (objects / fsverity.object_path(honest)).exists()
