"""The boot id, as the kernel gives it."""

from __future__ import annotations

import re
from pathlib import Path

from aptlayer.linux import boot


def test_boot_id_is_the_kernels_without_dashes() -> None:
    got = boot.boot_id()
    assert got is not None and re.fullmatch(r"[0-9a-f]{32}", got)
    assert got == Path("/proc/sys/kernel/random/boot_id").read_text().strip().replace("-", "")
