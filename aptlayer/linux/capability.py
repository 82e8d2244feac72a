"""The capabilities this process holds, as ``/proc/self/status`` shows them."""

from __future__ import annotations

CAP_SYS_ADMIN = 21


def effective(cap: int) -> bool:
    """Whether ``cap`` (a ``CAP_*`` number) is in this process's effective set."""
    with open("/proc/self/status") as f:
        caps = next((line.split()[1] for line in f if line.startswith("CapEff:")), "0")
    return bool(int(caps, 16) >> cap & 1)
