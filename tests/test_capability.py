"""Capabilities as /proc/self/status shows them: root has CAP_SYS_ADMIN, nobody has not."""

from __future__ import annotations

import os

from aptlayer.linux import capability


def test_effective_follows_the_process(as_root: None) -> None:
    assert capability.effective(capability.CAP_SYS_ADMIN)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            os.close(r)
            os.setgroups([])
            os.setresgid(65534, 65534, 65534)
            os.setresuid(65534, 65534, 65534)
            os.write(w, b"yes" if capability.effective(capability.CAP_SYS_ADMIN) else b"no")
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        said = f.read()
    os.waitpid(pid, 0)
    assert said == b"no"
