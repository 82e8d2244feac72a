"""Base images: bootstrapped with mmdebstrap, imported from a tarball or squashfs, exported back.

Each makes a directory tree in a staging folder of the store (removed by
the next ``recover`` if the process dies; the store lock is held shared
meanwhile, so recovery cannot run underneath) and builds it with
``Store.create``, recording where it came from (``origin``). Export mounts
the image read-only and archives the mount.

What survives a round trip: owners, modes, xattrs, hard links, symlinks
and device nodes, with ``tar`` (POSIX format, which also keeps nanosecond
mtimes) and with squashfs, whose mtimes are whole seconds: an image whose
mtimes have nanoseconds comes back from squashfs with other mtimes, so
another digest.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from . import errors, mounts
from .builder import CreateOptions
from .linux import fsops
from .layout import new_id
from .store import Store

TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.xz", ".txz", ".tar.zst", ".tzst")
SQUASHFS_SUFFIXES = (".squashfs", ".sqfs", ".sfs")
#: tar keeps every xattr (security.*, trusted.*, user.*) and numeric owners
_TAR_XATTRS = ("--xattrs", "--xattrs-include=*", "--acls")


def _tree(store: Store) -> Path:
    """A fresh staging folder for a tree (a transaction id nobody records: recovery removes it if left)."""
    path = store.staging_path(new_id())
    fsops.mkdir(str(path), 0o755)
    return path


def _create(store: Store, tree: Path, name: str, origin: dict, progress, folder: Path | None = None) -> dict:
    """Build ``tree`` into image ``name``, then remove its staging ``folder`` (the tree itself by default)."""
    try:
        return store.create(str(tree), name, CreateOptions(backend="python"), progress=progress,
                            about={"origin": origin})
    finally:
        fsops.remove_tree(str(folder or tree))


def _run(argv: list[str], what: str) -> None:
    proc = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        if any("No space left on device" in line for line in lines):
            raise errors.NoSpace(f"{what}: no space left on device")
        raise errors.AptLayerError(f"{what}: {lines[-1] if lines else f'{argv[0]} failed ({proc.returncode})'}")


def bootstrap(store: Store, suite: str, name: str, *, variant: str = "minbase", include: tuple[str, ...] = (),
              components: tuple[str, ...] = (), mirror: str | None = None, arch: str | None = None,
              progress=None) -> dict:
    """A base image from ``mmdebstrap SUITE``, the archive the host's apt names unless ``mirror``."""
    from .packages import bootstrap as mm

    request = mm.BootstrapRequest(suite=suite, variant=variant, include=tuple(include),
                                  components=tuple(components) or ("main",), mirror=mirror, arch=arch)
    request.validate()
    with store.writing():
        store.check_name_free(name)
        folder = _tree(store)
        tree = folder / "root"  # mmdebstrap makes its target itself
        try:
            mm.bootstrap(request, tree)
        except BaseException:
            fsops.remove_tree(str(folder))
            raise
        origin = {"bootstrap": {"suite": suite, "variant": variant, "include": list(include),
                                "components": list(request.components), "mirror": mm.resolve_mirror(request)[0],
                                "arch": arch}}
        return _create(store, tree, name, origin, progress, folder)


def import_file(store: Store, path: str, name: str, progress=None) -> dict:
    """A base image from a tarball (``.tar``, ``.tar.gz``, ``.tar.xz``, ``.tar.zst``) or a squashfs file."""
    source = Path(path)
    if not source.is_file():
        raise errors.NotFound(f"{path}: no such file")
    kind = _kind(source.name)
    with store.writing():
        store.check_name_free(name)
        tree = _tree(store)
        try:
            if kind == "squashfs":
                # -d needs a directory that does not exist yet
                os.rmdir(tree)
                _run(["unsquashfs", "-no-progress", "-d", str(tree), str(source)], f"importing {path}")
            else:
                _run(["tar", "--extract", "--file", str(source), "--directory", str(tree), "--numeric-owner",
                      "--same-owner", "--same-permissions", *_TAR_XATTRS], f"importing {path}")
        except BaseException:
            if tree.exists():
                fsops.remove_tree(str(tree))
            raise
        return _create(store, tree, name, {"import": {"file": os.path.abspath(path), "format": kind}}, progress)


def export_file(store: Store, name: str, path: str, fmt: str | None = None) -> dict:
    """Image ``name`` as a tarball or a squashfs file at ``path`` (the format from its name unless ``fmt``)."""
    kind = fmt or _kind(os.path.basename(path))
    if kind not in ("tar", "squashfs"):
        raise errors.InvalidInput(f"--format must be tar or squashfs, not {kind!r}")
    target = Path(path)
    if target.exists():
        raise errors.Conflict(f"{path} exists: apt-layer does not overwrite it")
    store.image_file(name)
    mnt = _tree(store)
    try:
        mounts.mount(store, name, str(mnt), readonly=True)
        try:
            if kind == "squashfs":
                _run(["mksquashfs", str(mnt), str(target), "-noappend", "-no-progress", "-xattrs", "-quiet"],
                     f"exporting {name}")
            else:
                _run(["tar", "--create", "--file", str(target), "--directory", str(mnt), "--format=posix",
                      "--numeric-owner", *_TAR_XATTRS, *_compression(target.name), "."], f"exporting {name}")
        finally:
            mounts.unmount(store, str(mnt))
    finally:
        os.rmdir(mnt)
    return {"image": name, "file": os.path.abspath(path), "format": kind, "size": target.stat().st_size}


def _kind(filename: str) -> str:
    if filename.endswith(SQUASHFS_SUFFIXES):
        return "squashfs"
    if filename.endswith(TAR_SUFFIXES):
        return "tar"
    raise errors.InvalidInput(f"{filename}: not a tarball ({', '.join(TAR_SUFFIXES)}) nor a squashfs file "
                              f"({', '.join(SQUASHFS_SUFFIXES)})")


def _compression(filename: str) -> tuple[str, ...]:
    for suffixes, option in (((".tar.gz", ".tgz"), "--gzip"), ((".tar.xz", ".txz"), "--xz"),
                             ((".tar.zst", ".tzst"), "--zstd")):
        if filename.endswith(suffixes):
            return (option,)
    return ()
