"""This boot's identity: the kernel's random boot id, new at every boot."""

from __future__ import annotations


def boot_id() -> str | None:
    """The boot id as 32 hex digits (no dashes), or None where ``/proc`` does not give it."""
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as f:
            return f.read().strip().replace("-", "")
    except OSError:
        return None
