"""Mounting and unmounting images, recorded in the journal.

A mount is write-ahead like every other operation: ``mounted`` is recorded
before the kernel call, so once the kernel holds the mount its objects are
already protected from gc; a mount that then fails is recorded as undone,
and one that never happened because the process was killed is marked lost
by the next recovery. Unmounting goes the other way (the kernel first).
"""

from __future__ import annotations

import errno
import os

from . import errors
from .fault import fault
from .journal import kinds
from .store import Store


def mount(store: Store, name: str, mountpoint: str, *, basedirs: tuple[str, ...] = (),
          upperdir: str | None = None, workdir: str | None = None, readonly: bool = False,
          verity: str = "off", idmap: str | None = None, backend: str = "python",
          allow_suid: bool = False, boot: bool = False, check_objects: bool = True,
          check_redirects: bool = True) -> dict:
    """Mount image ``name`` and record it; warns (in the result) about missing objects.

    ``backend`` "python" mounts natively, "upstream" through
    ``mount.composefs``, "auto" through it when installed. The mount is
    nosuid and nodev unless ``allow_suid``. ``boot``: the deployed image
    mounted at boot (the system itself: set-id bits honoured, and its
    redirects not read again, see ``composefs.mount.mount``). Without
    ``check_objects`` the warning is not looked for (it stats every object
    of the image; ``missing_objects`` is then None). Without
    ``check_redirects`` the image's redirects are not read before the mount
    (for an image the Store wrote itself and mounts for its own work).
    """
    allow_suid = allow_suid or boot
    from .composefs import mount as cfsmount, upstream

    target = os.path.realpath(mountpoint)
    if backend == "auto":
        backend = "upstream" if upstream.find_tool("mount.composefs") else "python"
    if backend == "upstream" and upstream.find_tool("mount.composefs") is None:
        raise errors.NotFound("--backend upstream: mount.composefs is not installed (install Debian's composefs "
                              "package, or use --backend python)")
    do_mount = upstream.mount_with_tool if backend == "upstream" else cfsmount.mount
    # The publish lock from reading the image to the kernel's mount: a commit that
    # replaces or places the file of that name cannot come in between.
    with store.writing(), store.publishing():
        path = store.image_file(name)
        image = store.journal.image(name)
        missing = store.missing_objects(name) if check_objects else None
        event = store.record(kinds.Mounted(subject=name, mountpoint=target, digest=image.digest,
                                           boot_id=store.boot_id, writable=upperdir is not None, backend=backend))
        fault("mount.after-event")
        try:
            do_mount(str(path), target, [str(store.layout.objects), *basedirs], upperdir=upperdir,
                     workdir=workdir, readonly=readonly, verity=verity, idmap=idmap,
                     nosuid=not allow_suid, nodev=not allow_suid, check_redirects=check_redirects and not boot)
        except BaseException as e:
            store.record(kinds.Unmounted(subject=name, mountpoint=target, reason=f"mount failed: {e}"[:500]), event.tx)
            if isinstance(e, cfsmount.MountError):
                raise errors.from_mount_error(e) from None
            raise
        fault("mount.after-kernel")
    return {"image": name, "mountpoint": target, "digest": image.digest, "missing_objects": missing}


def unmount(store: Store, mountpoint: str, lazy: bool = False, force: bool = False) -> dict:
    """Unmount a mount this store made (recorded in its journal); ``force`` for any other."""
    from .composefs import mount as cfsmount
    from .linux.mountinfo import is_mounted

    target = os.path.realpath(mountpoint)
    with store.writing(), store.publishing():  # not between a mount's event and its kernel call
        row = store.journal.mount(target)
        if is_mounted(target):
            if row is None and not force:
                raise errors.Conflict(f"{target} is not a mount of this store (its journal has no record of it); "
                                      "pass --force to unmount it anyway")
            try:
                cfsmount.unmount(target, lazy=lazy)
            except cfsmount.MountError as e:
                if e.errno == errno.EBUSY:
                    raise errors.Conflict(f"{target} is busy: a process has files open or its working directory "
                                          "there (`apt-layer image unmount --lazy` detaches it anyway)") from None
                raise errors.from_mount_error(e) from None
        elif row is None:
            raise errors.NotFound(f"{target} is not mounted")
        elif row.state == "mounted" and target in cfsmount.composefs_mount_points_elsewhere():
            raise errors.Conflict(f"{target} is mounted in another mount namespace; unmount it there")
        fault("unmount.after-kernel")
        if row is not None:
            store.record(kinds.Unmounted(subject=row.image, mountpoint=target))
    return {"mountpoint": target, "image": row.image if row else None}
