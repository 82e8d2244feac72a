"""Named fault points, for crash and concurrency testing with real processes.

The Store calls ``fault("create.after-objects")`` at each step between an
event and its effect. Normally that is a dictionary-free no-op. Three
environment variables turn it into a tool:

``APT_LAYER_FAULT=NAME[:N]``
    the process kills itself with SIGKILL at the Nth hit (default 1st) of the
    point NAME, exactly as a crash or ``kill -9`` would: no cleanup runs.
``APT_LAYER_PAUSE=NAME[:N]``
    the process stops itself with SIGSTOP at the Nth hit of NAME, holding
    whatever locks it holds there, until it gets SIGCONT. A test sees it
    stopped (``waitpid`` with ``WUNTRACED``), runs another operation, and
    lets it go: two real processes interleaved at a named point.
``APT_LAYER_FAULT_LOG=FILE``
    every point reached is appended to FILE, one name per line, so a test can
    discover the points an operation passes through instead of listing them.
"""

from __future__ import annotations

import os
import signal


def _parse(value: str | None) -> tuple[str, int]:
    name, _, nth = (value or "").partition(":")
    return name, int(nth) if nth.isdigit() and int(nth) > 0 else 1


_log = os.environ.get("APT_LAYER_FAULT_LOG")
_kill, _kill_left = _parse(os.environ.get("APT_LAYER_FAULT"))
_pause, _pause_left = _parse(os.environ.get("APT_LAYER_PAUSE"))
_active = bool(_log or _kill or _pause)


def fault(name: str) -> None:
    """Mark a point where a crash, or another process running meanwhile, must be survivable."""
    global _kill_left, _pause_left
    if not _active:
        return
    if _log:
        with open(_log, "a", encoding="utf-8") as f:
            f.write(name + "\n")
    if name == _kill:
        _kill_left -= 1
        if _kill_left == 0:
            os.kill(os.getpid(), signal.SIGKILL)
    if name == _pause:
        _pause_left -= 1
        if _pause_left == 0:
            os.kill(os.getpid(), signal.SIGSTOP)
