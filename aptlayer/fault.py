"""Named fault points, for crash testing with real processes.

The Store calls ``fault("create.after-objects")`` at each step between an
event and its effect. Normally that is a dictionary-free no-op. Two
environment variables turn it into a tool:

``APT_LAYER_FAULT=NAME[:N]``
    the process kills itself with SIGKILL at the Nth hit (default 1st) of the
    point NAME, exactly as a crash or ``kill -9`` would: no cleanup runs.
``APT_LAYER_FAULT_LOG=FILE``
    every point reached is appended to FILE, one name per line, so a test can
    discover the points an operation passes through instead of listing them.
"""

from __future__ import annotations

import os
import signal

_target = os.environ.get("APT_LAYER_FAULT")
_log = os.environ.get("APT_LAYER_FAULT_LOG")
_name, _, _nth = (_target or "").partition(":")
_remaining = int(_nth) if _nth.isdigit() and int(_nth) > 0 else 1


def fault(name: str) -> None:
    """Mark a point where a crash must be survivable."""
    global _remaining
    if _log:
        with open(_log, "a", encoding="utf-8") as f:
            f.write(name + "\n")
    if _target and name == _name:
        _remaining -= 1
        if _remaining == 0:
            os.kill(os.getpid(), signal.SIGKILL)
