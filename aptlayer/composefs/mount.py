"""Mounting composefs images natively, through the kernel's mount API.

A composefs mount is two file systems stacked (composefs-tools.md §2):

1. the image, mounted read-only as **erofs**.  Kernels with
   ``CONFIG_EROFS_FS_BACKED_BY_FILE`` (6.12+) mount the file itself; older
   ones answer ENOTBLK and get a read-only loop device instead;
2. an **overlayfs** with the erofs mount as its only lower layer and every
   basedir (object store) as a data-only lower layer, ``metacopy=on`` and
   ``redirect_dir=on``, so that each external file's metadata comes from the
   image and its data from ``BASEDIR/xx/yyyy...``.

Only the overlay stays visible.  ``mount.composefs`` puts the erofs mount on
a temporary directory, gives the overlay that path and then detaches it.
Since Linux 6.13 overlayfs also takes its layers as file descriptors, so here
the detached erofs mount (the fd from ``fsmount``) is handed over directly:
no temporary directory, nothing to clean up after a crash.  Measured on 6.18:
the fd is accepted and mountinfo then shows ``lowerdir+=/``.

Older kernels are served by fallbacks, each tried only when the kernel
refuses the step before it (see ``_Plan``): a loop device, a temporary
directory for the erofs mount, and finally the legacy ``mount(2)`` option
string ``lowerdir=TMP::BASE1::BASE2`` (or ``TMP:BASE1:...`` before data-only
layers existed, Linux < 6.5, where the 256 root whiteouts of the image hide
the stores' ``xx/`` directories).

This module is the plan: which mounts, with which options, the checks and
the errors that explain a refusal.  The system calls, loop devices and
mountinfo are ``aptlayer.linux``'s; ``is_composefs()`` tells a composefs
overlay among the mounts it lists.
"""

from __future__ import annotations

import dataclasses
import errno
import os
import re
import stat
import tempfile
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Literal, TypeAlias

from aptlayer.composefs.format import COMPOSEFS_FLAGS_HAS_ACL, COMPOSEFS_HEADER, COMPOSEFS_MAGIC
from aptlayer.composefs.imageview import ImageFormatError
from aptlayer.composefs.reader import UnsafeRedirect, check_redirects
from aptlayer.linux import capability, loop, mountapi, mountinfo, verity
from aptlayer.linux.mountinfo import MountInfo

StrPath: TypeAlias = str | os.PathLike[str]
Verity = Literal["off", "try", "require"]

#: ``source`` shown in mountinfo for every composefs overlay
SOURCE = "composefs"
#: prefix of temporary erofs mount points (only used by the fallbacks)
TEMP_PREFIX = ".composefs."


class MountError(OSError):
    """A composefs mount or unmount failed.

    ``errno`` is the underlying error; ``str()`` is a sentence naming the
    cause and, where there is one, what to do about it.
    """

    def __str__(self) -> str:
        return str(self.strerror)


# --- which mounts are composefs ------------------------------------------------------


def is_composefs(m: MountInfo) -> bool:
    """Whether a mount is a composefs overlay (by the ``source`` every one of them shows)."""
    return m.fstype == "overlay" and m.source == SOURCE


def composefs_mount_points_elsewhere() -> set[str]:
    """Mount points of the composefs mounts in every other mount namespace this process can see.

    A mount made inside ``unshare -m``, a unit with ``PrivateMounts=`` or a
    container is absent from this process's mountinfo yet keeps using its
    objects.
    """
    return mountinfo.mount_points_elsewhere(is_composefs)


# --- the request ----------------------------------------------------------------


@dataclass(frozen=True)
class _Request:
    """Checked, absolute arguments of one mount."""

    image: str
    target: str
    basedirs: tuple[str, ...]
    digest: str | None
    verity: Verity
    upperdir: str | None
    workdir: str | None
    idmap: str | None
    readonly: bool
    nosuid: bool = False
    nodev: bool = False
    check_redirects: bool = True

    @property
    def writable(self) -> bool:
        return self.upperdir is not None


_NOT_ROOT = "mounting composefs needs root (CAP_SYS_ADMIN in the initial user namespace)"


def _require_cap_sys_admin() -> None:
    """Fail early, before any path is looked at, when the caller cannot mount at all."""
    if not capability.effective(capability.CAP_SYS_ADMIN):
        raise MountError(errno.EPERM, _NOT_ROOT)


def _existing_dir(path: StrPath, role: str) -> str:
    p = os.path.abspath(os.fspath(path))
    try:
        st = os.stat(p)
    except FileNotFoundError:
        raise MountError(errno.ENOENT, f"{role} {p} does not exist") from None
    except OSError as e:
        raise MountError(e.errno, f"{role} {p}: {e.strerror}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise MountError(errno.ENOTDIR, f"{role} {p} is not a directory")
    return p


def _request(
    image: StrPath,
    target: StrPath,
    basedirs: Sequence[StrPath],
    digest: str | None,
    verity: Verity,
    upperdir: StrPath | None,
    workdir: StrPath | None,
    idmap: StrPath | None,
    readonly: bool,
    overmount: bool,
    nosuid: bool = False,
    nodev: bool = False,
    check_redirects: bool = True,
) -> _Request:
    _require_cap_sys_admin()
    if verity not in ("off", "try", "require"):
        raise MountError(errno.EINVAL, f"verity must be 'off', 'try' or 'require', not {verity!r}")
    if not basedirs:
        raise MountError(errno.EINVAL,
                         "no basedir given: a composefs mount needs at least one object directory")
    if (upperdir is None) != (workdir is None):
        raise MountError(errno.EINVAL, "upperdir and workdir must be given together")
    if digest is not None and not re.fullmatch(r"[0-9a-fA-F]{64}|[0-9a-fA-F]{128}", digest):
        raise MountError(errno.EINVAL,
                         f"digest {digest!r} is not a hex fs-verity digest (64 or 128 hex digits)")
    target_dir = _existing_dir(target, "mount point")
    if not overmount and mountinfo.is_mounted(target_dir):
        raise MountError(errno.EBUSY,
                         f"{target_dir} is already a mount point; unmount it first or pass overmount=True")
    if digest is not None and verity == "off":
        verity = "require"  # a trusted image is worth little if its objects are not checked
    return _Request(
        image=os.path.abspath(os.fspath(image)),
        target=os.path.realpath(target_dir),
        basedirs=tuple(_existing_dir(b, "basedir") for b in basedirs),
        digest=digest.lower() if digest else None,
        verity=verity,
        upperdir=_existing_dir(upperdir, "upperdir") if upperdir is not None else None,
        workdir=_existing_dir(workdir, "workdir") if workdir is not None else None,
        idmap=os.fspath(idmap) if idmap is not None else None,
        readonly=readonly,
        nosuid=nosuid,
        nodev=nodev,
        check_redirects=check_redirects,
    )


# --- checks on the image ----------------------------------------------------------


def _open_image(path: str) -> int:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise MountError(errno.ENOENT, f"image {path} does not exist") from None
    except OSError as e:
        raise MountError(e.errno, f"cannot open image {path}: {e.strerror}") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise MountError(errno.EINVAL, f"image {path} is not a regular file")
    return fd


def check_image_redirects(path: StrPath) -> None:
    """:func:`reader.check_redirects` of the image file at ``path``, as a MountError."""
    fd = _open_image(os.fspath(path))
    try:
        _image_has_acl(fd, os.fspath(path))
        _check_redirects(fd, os.fspath(path))
    finally:
        os.close(fd)


def _check_redirects(fd: int, path: str) -> None:
    """Refuse, before any mount, an image whose redirects could reach outside the basedirs."""
    size = os.fstat(fd).st_size
    data = bytearray()
    while len(data) < size:
        chunk = os.pread(fd, min(size - len(data), 1 << 24), len(data))
        if not chunk:
            break
        data += chunk
    try:
        check_redirects(bytes(data))
    except UnsafeRedirect as e:
        raise MountError(errno.EBADMSG, f"{path} is refused: {e}") from None
    except ImageFormatError as e:  # what cannot be read cannot be checked: not mounted either
        raise MountError(errno.EINVAL, f"{path} is not a valid composefs image: {e}") from None


def _image_has_acl(fd: int, path: str) -> bool:
    """Check the composefs header; True if some inode carries a POSIX ACL.

    Without ACLs the erofs mount gets ``noacl``, which spares the kernel an
    ACL lookup on every permission check.
    """
    header = os.pread(fd, COMPOSEFS_HEADER.size, 0)
    if len(header) < COMPOSEFS_HEADER.size:
        raise MountError(errno.EINVAL, f"{path} is not a composefs image: only {len(header)} bytes long")
    magic, _version, flags, _cfs_version = COMPOSEFS_HEADER.unpack(header)
    if magic != COMPOSEFS_MAGIC:
        raise MountError(errno.EINVAL, f"{path} is not a composefs image (bad magic {magic:#010x})")
    return bool(flags & COMPOSEFS_FLAGS_HAS_ACL)


def _verity_unsupported_reason(path: str) -> str:
    if verity.kernel_lacks_fsverity():
        return "this kernel was built without fs-verity (CONFIG_FS_VERITY is not set)"
    return f"the file system holding {path} does not support fs-verity"


def _measure(fd: int) -> tuple[int, str]:
    """(errno, hex digest) of the kernel's fs-verity measure: errno 0 when it has a digest."""
    try:
        _alg, digest = verity.measure_raw(fd)
    except OSError as e:
        return e.errno or errno.EIO, ""
    return 0, digest.hex()


def _check_digest(fd: int, path: str, expected: str) -> None:
    """``digest=``: the image's own fs-verity digest must be the one given."""
    err, got = _measure(fd)
    if err in (errno.ENOTTY, errno.EOPNOTSUPP):
        raise MountError(errno.EOPNOTSUPP,
                         f"cannot check digest= of {path}: {_verity_unsupported_reason(path)}")
    if err == errno.ENODATA:
        raise MountError(errno.ENODATA,
                         f"cannot check digest= of {path}: the image has no fs-verity enabled "
                         f"(enable it with 'fsverity enable {path}')")
    if err:
        raise MountError(err, f"cannot measure the fs-verity digest of {path}: {os.strerror(err)}")
    if got != expected:
        raise MountError(errno.EILSEQ, f"image {path} has fs-verity digest {got}, expected {expected}")


def _verity_supported(directory: str) -> bool:
    """Whether the file system of ``directory`` answers fs-verity queries at all."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        return _measure(fd)[0] not in (errno.ENOTTY, errno.EOPNOTSUPP)
    finally:
        os.close(fd)


def _use_verity(req: _Request) -> bool:
    """Decide ``verity=require`` for the overlay.

    With verity required, overlayfs refuses (EIO) to read any object that
    lacks fs-verity, so a mount over stores that cannot have it would be
    useless: ``require`` fails up front and ``try`` goes on without.
    """
    if req.verity == "off":
        return False
    unsupported = [b for b in req.basedirs if not _verity_supported(b)]
    if not unsupported:
        return True
    if req.verity == "try":
        return False
    raise MountError(errno.EOPNOTSUPP,
                     f"verity=require: basedir {unsupported[0]} cannot have fs-verity: "
                     f"{_verity_unsupported_reason(unsupported[0])}; every external file would "
                     "fail to read with EIO (mount with verity 'try' or 'off')")


# --- how to mount: the plan and its fallbacks ----------------------------------------


@dataclass(frozen=True)
class _Plan:
    """One way of mounting; ``mount()`` starts with the default and falls back.

    ``backing``: erofs on the image file itself, or on a loop device.
    ``lower``: hand the detached erofs mount to overlayfs as an fd, or mount
    it on a temporary directory and give that path.
    ``api``: ``fsopen``/``fsconfig``, or the legacy ``mount(2)`` option
    string (which needs ``lower="tmpdir"``); ``data_only`` chooses its
    ``IMG::BASE`` form over ``IMG:BASE``.
    """

    backing: Literal["file", "loop"] = "file"
    lower: Literal["fd", "tmpdir"] = "fd"
    api: Literal["new", "legacy"] = "new"
    data_only: bool = True


class _Fallback(Exception):
    """The kernel refused a step of the current plan; try ``plan`` instead."""

    def __init__(self, plan: _Plan) -> None:
        super().__init__(plan)
        self.plan = plan


def _context(fstype: str, plan: _Plan) -> mountapi.FsContext:
    try:
        return mountapi.FsContext(fstype)
    except OSError as e:
        if e.errno == errno.ENOSYS:
            raise _Fallback(dataclasses.replace(plan, lower="tmpdir", api="legacy")) from None
        if e.errno == errno.EPERM:
            raise MountError(errno.EPERM, _NOT_ROOT) from None
        if e.errno == errno.ENODEV:
            raise MountError(errno.ENODEV, _no_fs_message(fstype)) from None
        raise MountError(e.errno, f"fsopen({fstype}): {e.strerror}") from None


def _no_fs_message(fstype: str) -> str:
    config = {"erofs": "CONFIG_EROFS_FS", "overlay": "CONFIG_OVERLAY_FS"}[fstype]
    return (f"the kernel has no {fstype} file system (not in /proc/filesystems and not loadable): "
            f"load its module ('modprobe {fstype}') or use a kernel with {config}")


def _attach_loop(image_fd: int, stack: ExitStack) -> str:
    """Attach the image to a free loop device, which goes once the erofs mount and our fd
    (closed by ``stack``) let go of it."""
    try:
        path, loop_fd = loop.attach_read_only(image_fd)
    except loop.ConfigureError as e:
        if e.errno == errno.EBUSY:
            raise MountError(errno.EBUSY, "no free loop device for the image") from None
        raise MountError(e.errno, f"cannot set up a loop device for the image: {e.strerror}") from None
    stack.callback(os.close, loop_fd)
    return path


def _erofs_source(image_fd: int, plan: _Plan, stack: ExitStack) -> str:
    if plan.backing == "loop":
        return _attach_loop(image_fd, stack)
    return f"/proc/self/fd/{image_fd}"


def _erofs_failed(req: _Request, plan: _Plan, e: OSError, log: str = "") -> Exception:
    """The error for a failed erofs mount, or the fallback to a loop device."""
    if e.errno == errno.ENOTBLK and plan.backing == "file":
        return _Fallback(dataclasses.replace(plan, backing="loop"))
    detail = f" ({log})" if log else ""
    if e.errno == errno.EINVAL:
        return MountError(errno.EINVAL, f"{req.image} is not a valid composefs image: the kernel's erofs "
                          f"driver rejected it{detail}")
    if e.errno == errno.EPERM:
        return MountError(errno.EPERM, _NOT_ROOT)
    if e.errno == errno.ENODEV:
        return MountError(errno.ENODEV, _no_fs_message("erofs"))
    return MountError(e.errno, f"mounting {req.image} as erofs failed: {e.strerror}{detail}")


def _open_userns(path: str) -> int:
    try:
        return os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        raise MountError(e.errno, f"idmap: cannot open user namespace {path}: {e.strerror}") from None


def _idmap(mnt: int, req: _Request, stack: ExitStack) -> None:
    """Apply ``idmap=`` to the detached erofs mount, as mount.composefs does.

    The overlay inherits the mapping for everything the image describes;
    object data carries no ownership, and an upper layer stays unmapped.
    """
    if req.idmap is None:
        return
    userns = _open_userns(req.idmap)
    stack.callback(os.close, userns)
    try:
        mountapi.set_idmap(mnt, userns)
    except OSError as e:
        not_userns = e.errno in (errno.EINVAL, errno.EPERM)
        hint = " (is it a user namespace with a uid and gid map?)" if not_userns else ""
        raise MountError(e.errno, f"idmap={req.idmap}: {e.strerror}{hint}") from None


def _erofs_new(req: _Request, image_fd: int, has_acl: bool, plan: _Plan, stack: ExitStack) -> int:
    """Mount the image as erofs, detached; returns the mount fd."""
    source = _erofs_source(image_fd, plan, stack)
    ctx = _context("erofs", plan)
    stack.callback(ctx.close)
    try:
        ctx.string("source", source)
        ctx.flag("ro")
        if not has_acl:
            ctx.flag("noacl")
        ctx.create()
        mnt = ctx.mount(mountapi.MOUNT_ATTR_RDONLY)
    except OSError as e:
        raise _erofs_failed(req, plan, e, ctx.log()) from None
    stack.callback(os.close, mnt)
    _idmap(mnt, req, stack)
    return mnt


def _temp_mountpoint(stack: ExitStack) -> str:
    """A private directory for the erofs mount, removed (and unmounted) by ``stack``."""
    path = tempfile.mkdtemp(prefix=f"{TEMP_PREFIX}{os.getpid()}.", dir="/tmp")
    stack.callback(os.rmdir, path)
    return path


def _detach_on_exit(path: str, stack: ExitStack) -> None:
    stack.callback(mountapi.umount, path, mountapi.MNT_DETACH)


def _erofs_legacy(req: _Request, image_fd: int, has_acl: bool, plan: _Plan, stack: ExitStack) -> str:
    """Mount the image as erofs with ``mount(2)`` on a temporary directory."""
    if req.idmap is not None:
        raise MountError(errno.EOPNOTSUPP, "idmap= needs the kernel's new mount API (fsopen, mount_setattr), "
                         "which is not available here")
    tmp = _temp_mountpoint(stack)
    source = _erofs_source(image_fd, plan, stack)
    try:
        mountapi.legacy_mount(source, tmp, "erofs", mountapi.MS_RDONLY, "" if has_acl else "noacl")
    except OSError as e:
        raise _erofs_failed(req, plan, e) from None
    _detach_on_exit(tmp, stack)
    return tmp


def _legacy_escape(path: str) -> str:
    """Escape a layer path for overlayfs's option string (``\\`` before ``\\ : ,``)."""
    return re.sub(r"([\\:,])", r"\\\1", path)


def _legacy_options(req: _Request, lower: str, plan: _Plan, verity: bool) -> str:
    sep = "::" if plan.data_only else ":"
    layers = sep.join(_legacy_escape(p) for p in (lower, *req.basedirs))
    opts = [f"lowerdir={layers}", "metacopy=on", "redirect_dir=on"]
    if verity:
        opts.append("verity=require")
    if req.writable:
        opts.append(f"upperdir={_legacy_escape(req.upperdir or '')}")
        opts.append(f"workdir={_legacy_escape(req.workdir or '')}")
    return ",".join(opts)


def _mount_flags(req: _Request) -> int:
    """The ``MS_*`` flags of the overlay (legacy ``mount(2)``)."""
    return ((mountapi.MS_RDONLY if req.readonly else 0) | (mountapi.MS_NOSUID if req.nosuid else 0)
            | (mountapi.MS_NODEV if req.nodev else 0))


def _mount_attrs(req: _Request) -> int:
    """The ``MOUNT_ATTR_*`` of the overlay (``fsmount``)."""
    return ((mountapi.MOUNT_ATTR_RDONLY if req.readonly else 0)
            | (mountapi.MOUNT_ATTR_NOSUID if req.nosuid else 0) | (mountapi.MOUNT_ATTR_NODEV if req.nodev else 0))


def _overlay_legacy(req: _Request, lower: str, plan: _Plan, verity: bool) -> None:
    flags = _mount_flags(req)
    try:
        mountapi.legacy_mount(SOURCE, req.target, "overlay", flags, _legacy_options(req, lower, plan, verity))
    except OSError as e:
        if e.errno == errno.EINVAL and plan.data_only:
            raise _Fallback(dataclasses.replace(plan, data_only=False)) from None
        if e.errno == errno.EINVAL:
            raise MountError(errno.EINVAL, "overlayfs refused the composefs layers: this kernel's overlayfs "
                             "lacks data-only lower layers (Linux 6.5+) or metacopy/redirect_dir") from None
        raise _overlay_failed(req, e) from None


def _overlay_failed(req: _Request, e: OSError, log: str = "") -> MountError:
    detail = f" ({log})" if log else ""
    if e.errno == errno.ENODEV:
        return MountError(errno.ENODEV, _no_fs_message("overlay"))
    if e.errno == errno.EPERM:
        return MountError(errno.EPERM, _NOT_ROOT)
    return MountError(e.errno, f"mounting the composefs overlay on {req.target} failed: {e.strerror}{detail}")


def _overlay_param(ctx: mountapi.FsContext, key: str, value: str, req: _Request) -> None:
    try:
        ctx.string(key, value)
    except OSError as e:
        log = ctx.log()
        if key == "datadir+" and e.errno == errno.EINVAL:
            raise MountError(errno.EINVAL, "this kernel's overlayfs has no data-only lower layers "
                             f"('datadir+' rejected; needs Linux 6.5+){f' ({log})' if log else ''}") from None
        if e.errno == errno.ENOENT:
            raise MountError(errno.ENOENT, f"overlay {key.rstrip('+')} {value} does not exist") from None
        raise MountError(e.errno or errno.EIO, f"overlay option {key}={value}: {e.strerror}"
                         f"{f' ({log})' if log else ''}") from None


def _overlay_verity(ctx: mountapi.FsContext, req: _Request) -> None:
    """``verity=require``; with ``verity="try"`` an overlayfs without that option is fine."""
    try:
        ctx.string("verity", "require")
    except OSError as e:
        ctx.log()
        if e.errno != errno.EINVAL:
            raise _overlay_failed(req, e) from None
        if req.verity == "require":
            raise MountError(errno.EINVAL,
                             "this kernel's overlayfs has no 'verity' option (Linux 6.6+)") from None


def _overlay_lower(ctx: mountapi.FsContext, req: _Request, erofs: int, plan: _Plan, stack: ExitStack) -> None:
    """Give overlayfs its lower layer: the erofs mount fd, or a temp directory path."""
    if plan.lower == "fd":
        try:
            ctx.fd_param("lowerdir+", erofs)
        except OSError as e:
            if e.errno == errno.EINVAL:
                raise _Fallback(dataclasses.replace(plan, lower="tmpdir")) from None
            raise _overlay_failed(req, e, ctx.log()) from None
        return
    tmp = _temp_mountpoint(stack)
    mountapi.move_mount(erofs, tmp)
    _detach_on_exit(tmp, stack)
    try:
        ctx.string("lowerdir+", tmp)
    except OSError as e:
        if e.errno == errno.EINVAL:
            raise _Fallback(dataclasses.replace(plan, api="legacy")) from None
        raise _overlay_failed(req, e, ctx.log()) from None


def _overlay_new(req: _Request, erofs: int, plan: _Plan, verity: bool, stack: ExitStack) -> None:
    ctx = _context("overlay", plan)
    stack.callback(ctx.close)
    try:
        # Before 6.5 overlayfs took fsconfig keys blindly and parsed them only
        # at create time: accepting a bogus key marks such a kernel.
        ctx.string("composefs-probe", "x")
    except OSError:
        ctx.log()  # drop the kernel's "Unknown parameter" note
    else:
        raise _Fallback(dataclasses.replace(plan, lower="tmpdir", api="legacy"))
    _overlay_param(ctx, "source", SOURCE, req)
    _overlay_param(ctx, "metacopy", "on", req)
    _overlay_param(ctx, "redirect_dir", "on", req)
    if verity:
        _overlay_verity(ctx, req)
    _overlay_lower(ctx, req, erofs, plan, stack)
    for basedir in req.basedirs:
        _overlay_param(ctx, "datadir+", basedir, req)
    if req.writable:
        _overlay_param(ctx, "upperdir", req.upperdir or "", req)
        _overlay_param(ctx, "workdir", req.workdir or "", req)
    try:
        ctx.create()
        mnt = ctx.mount(_mount_attrs(req))
    except OSError as e:
        if e.errno == errno.EINVAL and plan.lower == "fd":
            # a kernel may take layer fds yet refuse to stack on a detached
            # mount; a directory is the way mount.composefs always goes
            raise _Fallback(dataclasses.replace(plan, lower="tmpdir")) from None
        raise _overlay_failed(req, e, ctx.log()) from None
    stack.callback(os.close, mnt)
    try:
        mountapi.move_mount(mnt, req.target)
    except OSError as e:
        raise _overlay_failed(req, e) from None


def _mount_with(req: _Request, plan: _Plan) -> None:
    """One attempt: every fd, temp mount and temp dir is gone when it returns or raises."""
    with ExitStack() as stack:
        image_fd = _open_image(req.image)
        stack.callback(os.close, image_fd)
        has_acl = _image_has_acl(image_fd, req.image)
        if req.check_redirects:
            _check_redirects(image_fd, req.image)
        if req.digest is not None:
            _check_digest(image_fd, req.image, req.digest)
        verity = _use_verity(req)
        if plan.api == "legacy":
            lower = _erofs_legacy(req, image_fd, has_acl, plan, stack)
            _overlay_legacy(req, lower, plan, verity)
        else:
            erofs = _erofs_new(req, image_fd, has_acl, plan, stack)
            _overlay_new(req, erofs, plan, verity, stack)


def _mount(req: _Request, plan: _Plan) -> _Plan:
    """Mount following ``plan`` and its fallbacks; returns the plan that worked."""
    while True:
        try:
            _mount_with(req, plan)
            return plan
        except _Fallback as f:
            plan = f.plan


def mount(
    image: StrPath,
    target: StrPath,
    basedirs: Sequence[StrPath],
    *,
    digest: str | None = None,
    verity: Verity = "off",
    upperdir: StrPath | None = None,
    workdir: StrPath | None = None,
    idmap: StrPath | None = None,
    readonly: bool = False,
    overmount: bool = False,
    nosuid: bool = False,
    nodev: bool = False,
    check_redirects: bool = True,
) -> None:
    """Mount the composefs ``image`` on ``target``, with objects from ``basedirs``.

    The options are those of ``mount.composefs``: ``basedirs`` are searched
    in order for each object; ``digest`` is the hex fs-verity digest the
    image file must have, and implies ``verity="require"`` as in
    ``mount.composefs``; ``verity="require"`` makes overlayfs check every
    object against the digest recorded in the image, ``"try"`` does so only
    where the stores support fs-verity; ``upperdir``/``workdir`` make the
    mount writable; ``idmap`` is a user namespace file (``/proc/PID/ns/user``)
    whose mapping shifts the owners; ``readonly`` sets the mount read-only.
    A ``target`` that is already a mount point is refused unless
    ``overmount``. ``nosuid`` and ``nodev`` make the kernel ignore set-id
    bits and device nodes in the image (an image from elsewhere).

    Every overlay redirect of the image must name a path below the
    basedirs (:func:`reader.check_redirects`); an image with one that does
    not is refused before anything is mounted. The check reads the whole
    image (about 4 s for 120,000 files on a loaded machine), so the boot
    mount of a deployed image, whose object paths the Store checked when it
    was made, passes ``check_redirects=False``.

    Raises ``MountError``; a failed mount leaves no mount and no temporary
    directory behind.

    Example:
        mount("/var/lib/apt-layer/images/abc.cfs", "/mnt/root", ["/var/lib/apt-layer/objects"])
    """
    req = _request(image, target, basedirs, digest, verity, upperdir, workdir, idmap, readonly, overmount,
                   nosuid, nodev, check_redirects)
    _mount(req, _Plan())


def unmount(target: StrPath, *, lazy: bool = False) -> None:
    """Unmount the composefs mounted on ``target`` (the topmost mount there).

    The erofs layer and any loop device go with it.  Refuses, with
    ``MountError``, a target that is not mounted or whose topmost mount is not
    a composefs overlay.  ``lazy`` detaches it even while busy (MNT_DETACH).
    """
    path = os.path.realpath(os.fspath(target))
    mounts = mountinfo.mounts_at(path)
    if not mounts:
        raise MountError(errno.EINVAL, f"{path} is not mounted")
    top = mountinfo.topmost(mounts)
    if not is_composefs(top):
        raise MountError(errno.EINVAL,
                         f"{path} is not a composefs mount (it is {top.fstype} from {top.source})")
    try:
        mountapi.umount(path, mountapi.MNT_DETACH if lazy else 0)
    except OSError as e:
        if e.errno == errno.EBUSY:
            raise MountError(errno.EBUSY, f"{path} is busy: a process has files open or its working "
                             "directory there (a lazy unmount detaches it anyway)") from None
        if e.errno == errno.EPERM:
            raise MountError(errno.EPERM, "unmounting composefs needs root (CAP_SYS_ADMIN)") from None
        raise MountError(e.errno, f"unmounting {path} failed: {e.strerror}") from None

