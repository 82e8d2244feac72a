"""Boot counting: a new deployment has a number of tries to complete a boot.

The initramfs counts: booting ``current`` whose image is not the one in
``boot/good``, it reads ``boot/attempts`` ("NAME COUNT"), boots the
previous deployment instead when COUNT reached the tries
(``apt-layer.tries=N``, default 3), and otherwise writes COUNT + 1 there
first. When the boot reaches ``multi-user.target``,
``apt-layer-boot-complete.service`` runs ``apt-layer boot complete``:
:func:`complete` names the booted image in ``boot/good`` and removes
``boot/attempts``. Both files are replaced by rename, so a power cut leaves
the old content or the new.

Counting in the initramfs works for every way of booting (GRUB, systemd-boot,
a kernel booted directly) since it needs nothing from the boot loader.
"""

from __future__ import annotations

from ..linux import fsops
from ..store import Store
from .booted import this_boot


def complete(store: Store) -> dict:
    """Mark the running deployment as one that completes a boot; returns what changed."""
    ev = this_boot(store)
    if ev is None:
        return {"good": None, "reason": "this boot did not come from a deployment of this store "
                                        "(no booted event: recover --boot records it)"}
    boot = store.layout.boot
    good = boot / "good"
    try:
        before = good.read_text().strip()
    except FileNotFoundError:
        before = None
    if before != ev.subject:
        fsops.write_file_atomic(good, f"{ev.subject}\n".encode())
    attempts = boot / "attempts"
    counted = attempts.exists()
    if counted:
        fsops.unlink(attempts)
        fsops.fsync_dir(boot)
    return {"good": ev.subject, "changed": before != ev.subject or counted}
