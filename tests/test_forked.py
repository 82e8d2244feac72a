"""The forked helper: two halves of work in two processes, and nothing left behind whatever fails."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from aptlayer.linux import forked

pytestmark = pytest.mark.skipif(not forked.helper_allowed(),
                                reason="a helper needs two CPUs and a single-threaded process")


def no_children() -> bool:
    try:
        os.waitpid(-1, os.WNOHANG)
    except ChildProcessError:
        return True
    return False


def test_both_halves_run_and_the_helper_is_another_process() -> None:
    fds = sorted(os.listdir("/proc/self/fd"))
    mine, theirs = forked.split(lambda: [os.getpid(), b"x" * 100_000, {b"k": (1, 2)}], os.getpid)
    assert mine == os.getpid()
    assert theirs[0] != os.getpid() and theirs[1:] == [b"x" * 100_000, {b"k": (1, 2)}]
    assert sorted(os.listdir("/proc/self/fd")) == fds and no_children()


@pytest.mark.parametrize("failure", ["raises", "unmarshallable", "killed"])
def test_a_failed_helper_gives_none(failure: str) -> None:
    def theirs():
        if failure == "raises":
            raise RuntimeError("helper")
        if failure == "killed":
            os.kill(os.getpid(), signal.SIGKILL)
        return object()

    assert forked.split(theirs, lambda: "mine") == ("mine", None)
    assert no_children()


def test_a_failure_here_reaps_the_helper() -> None:
    def mine():
        raise KeyError("mine")

    with pytest.raises(KeyError):
        forked.split(lambda: __import__("time").sleep(30), mine)
    assert no_children()  # killed and reaped at once, not after 30 s


def test_no_helper_beside_another_thread() -> None:
    import threading

    stop = threading.Event()
    thread = threading.Thread(target=stop.wait)
    thread.start()
    try:
        assert not forked.helper_allowed()
    finally:
        stop.set()
        thread.join()
    assert forked.helper_allowed()


@pytest.mark.parametrize("call", ["fork", "memfd_create"])
def test_without_a_helper_both_halves_run_here(monkeypatch, call: str) -> None:
    """The process limit reached (fork fails with EAGAIN), or no memory for the memfd."""
    import errno

    def refused(*args, **kwargs):
        raise OSError(errno.EAGAIN, os.strerror(errno.EAGAIN))

    monkeypatch.setattr(os, call, refused)
    assert forked.split(lambda: ("theirs", os.getpid()), lambda: "mine") == ("mine", ("theirs", os.getpid()))
    assert no_children()


def test_a_helper_works_where_sigchld_is_ignored() -> None:
    """A program embedding apt-layer may ignore SIGCHLD: the kernel then reaps the helper itself."""
    old = signal.signal(signal.SIGCHLD, signal.SIG_IGN)
    try:
        assert forked.split(lambda: [1, 2], lambda: "mine") == ("mine", [1, 2])
        assert forked.split(lambda: os.kill(os.getpid(), signal.SIGKILL), lambda: "mine") == ("mine", None)
    finally:
        signal.signal(signal.SIGCHLD, old)


def test_a_helper_outliving_its_parent_holds_no_lock_and_no_pipe(tmp_path: Path) -> None:
    """The parent takes an flock, starts a helper that runs on, and is killed: the lock is free at
    once, and the parent's stdout pipe reaches EOF, though the helper is still running."""
    import fcntl
    import select
    import subprocess
    import sys
    import time

    lock, helper_pid = tmp_path / "lock", tmp_path / "helper.pid"
    code = f"""
import fcntl, os, time
from aptlayer.linux import forked
fd = os.open({str(lock)!r}, os.O_RDWR | os.O_CREAT)
fcntl.flock(fd, fcntl.LOCK_EX)
def theirs():
    with open({str(helper_pid)!r}, "w") as f:
        f.write(str(os.getpid()))
    time.sleep(20)
def mine():
    while not os.path.exists({str(helper_pid)!r}):
        time.sleep(0.01)
    print("ready", flush=True)
    time.sleep(30)
forked.split(theirs, mine)
"""
    parent = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
    assert parent.stdout.readline() == b"ready\n"
    helper = int(helper_pid.read_text())
    try:
        parent.kill()
        parent.wait()
        os.kill(helper, 0)  # the helper still runs
        fd = os.open(lock, os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # but holds no lock
        finally:
            os.close(fd)
        ready, _, _ = select.select([parent.stdout], [], [], 2.0)
        assert ready and parent.stdout.read() == b""  # and no end of the pipe: EOF at once
    finally:
        os.kill(helper, signal.SIGKILL)
        time.sleep(0.05)
