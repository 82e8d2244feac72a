"""``apt-layer composefs mkcomposefs|info|mount``: drop-in front ends, without click.

They take exactly the arguments of the upstream tools (GNU getopt_long
rules: ``--opt=value`` or ``--opt value``, unique prefixes, options mixed
with operands) and exit with the same codes (0 success, 1 any error), so a
script can swap ``mkcomposefs`` for ``apt-layer composefs mkcomposefs``.
Messages keep upstream's wording where a script might match on it, and add
the file and line where upstream is vague. Never a traceback.

Nothing here imports click: :func:`aptlayer.cli.main` runs these before
click is loaded (the ``composefs`` group of :mod:`.compat` is for help
and for global options given first).
"""

from __future__ import annotations

import getopt
import os
import sys

MKCOMPOSEFS_USAGE = """\
Usage: mkcomposefs [OPTIONS] SOURCE IMAGE
Options:
  --digest-store=PATH   Store content files in this directory
  --use-epoch           Make all mtimes zero
  --skip-devices        Don't store device nodes
  --skip-xattrs         Don't store file xattrs
  --user-xattrs         Only store user.* xattrs
  --print-digest        Print the digest of the image
  --print-digest-only   Print the digest of the image, don't write image
  --from-file           The source is a dump file, not a directory
  --min-version=N       Use this minimal format version (default=0)
  --max-version=N       Use this maximum format version (default=1)
  --threads=N           Use this to override the default number of threads used to calculate digest and copy files (default={ncpu})
"""

INFO_USAGE = ("usage: composefs-info [--basedir=path] [--filter=name]... "
              "[ls|objects|dump|missing-objects|measure-file] IMAGES...\n")

MOUNT_USAGE = """\
usage: mount.composefs [-t type] [-o opt[,opts..]] IMAGE MOUNTPOINT
Example:
  mount.composefs -o basedir=/composefs/objects exampleimage.cfs /mnt/exampleimage
As the helper of mount(8):
  mount -t composefs -o basedir=/composefs/objects exampleimage.cfs /mnt/exampleimage

Supported options:
  basedir=PATH[:PATH]    Specify location of basedir(s)
  digest=DIGEST          Specify required image digest
  idmap=PATH             Specify path to a user namespace whose ID mapping should be used
  verity                 Require all files to have specified and valid fs-verity digests
  tryverity              If supported by kernel, require fs-verity
  ro                     Read only
  rw                     Read/write
  upperdir               Overlayfs upperdir
  workdir                Overlayfs workdir
"""


class Fail(Exception):
    """Exit 1 after printing ``message`` (and the usage when asked)."""

    def __init__(self, message: str, usage: str | None = None):
        super().__init__(message)
        self.usage = usage


def _err(prog: str, message: str) -> str:
    return f"{prog}: {message}"


def _strerror(e: OSError) -> str:
    return e.strerror or str(e)


# --- mkcomposefs ---------------------------------------------------------------

MK_LONG = ["digest-store=", "use-epoch", "skip-devices", "skip-xattrs", "user-xattrs",
           "print-digest", "print-digest-only", "from-file", "min-version=",
           "max-version=", "threads="]


def _int_arg(value: str, what: str) -> int:
    try:
        return int(value, 10)
    except ValueError:
        raise Fail(f"Invalid {what} {value}") from None


def mkcomposefs_main(argv: list[str]) -> int:
    usage = MKCOMPOSEFS_USAGE.format(ncpu=os.cpu_count() or 1)
    try:
        opts, args = getopt.gnu_getopt(argv, "", MK_LONG)
    except getopt.GetoptError as e:
        raise Fail(f"mkcomposefs: {e.msg}", usage) from None
    o = dict(digest_store=None, use_epoch=False, skip_devices=False, skip_xattrs=False,
             user_xattrs=False, print_digest=False, digest_only=False, from_file=False,
             threads=os.cpu_count() or 1)
    min_version: int | None = None
    max_version: int | None = None
    for key, value in opts:
        name = key[2:]
        if name == "digest-store":
            o["digest_store"] = value
        elif name == "min-version":
            min_version = _int_arg(value, "min version")
        elif name == "max-version":
            max_version = _int_arg(value, "max version")
        elif name == "threads":
            o["threads"] = _int_arg(value, "threads count")
            if o["threads"] < 1:
                raise Fail(f"Invalid threads count {value}")
        elif name == "print-digest-only":
            o["digest_only"] = True
        else:
            o[name.replace("-", "_")] = True
    if not args:
        raise Fail("No source path specified", usage)
    src = args[0]
    if not src:
        raise Fail(_err("mkcomposefs", "Empty source path specified"))
    if o["digest_only"]:
        if len(args) > 1:
            raise Fail("Cannot specify destination path with --print-digest-only", usage)
        dst = None
    else:
        if len(args) < 2:
            raise Fail("No destination path specified", usage)
        if len(args) > 2:
            raise Fail("Too many arguments", usage)
        dst = args[1]
        if dst == "-" and sys.stdout.isatty():
            raise Fail("Refusing to write image to a terminal", usage)
    # Only one of the two given: the other is 0, as upstream does.
    if min_version is None and max_version is None:
        min_version, max_version = 0, 1
    min_version = min_version or 0
    max_version = max(max_version or 0, min_version)

    from ..composefs import build
    from ..linux import fsops

    try:
        built = build.make_image(
            src, from_file=o["from_file"], digest_store=o["digest_store"],
            use_epoch=o["use_epoch"], skip_devices=o["skip_devices"],
            skip_xattrs=o["skip_xattrs"], user_xattrs=o["user_xattrs"],
            min_version=min_version, max_version=max_version, threads=o["threads"],
            strict=os.environ.get("CFS_PARSE_STRICT") == "1")
        if dst == "-":
            sys.stdout.buffer.write(built.image)
            sys.stdout.buffer.flush()
        elif dst is not None:
            fsops.write_file_atomic(dst, built.image)
    except build.BuildError as e:
        raise Fail(_err("mkcomposefs", str(e))) from None
    except OSError as e:
        # the destination, not the temporary file next to it that the error names
        raise Fail(_err("mkcomposefs", f"{dst}: {_strerror(e)}")) from None
    if o["print_digest"] or o["digest_only"]:
        print(built.digest.hex(), flush=True)
    return 0


# --- composefs-info --------------------------------------------------------------

INFO_COMMANDS = ("ls", "objects", "dump", "missing-objects", "measure-file")


def info_main(argv: list[str]) -> int:
    try:
        opts, args = getopt.gnu_getopt(argv, "", ["basedir=", "filter="])
    except getopt.GetoptError as e:
        raise Fail(f"composefs-info: {e.msg}", INFO_USAGE) from None
    basedirs = [v for k, v in opts if k == "--basedir"]
    filters = [v for k, v in opts if k == "--filter"]
    if not args:
        raise Fail("No command specified", INFO_USAGE)
    command, paths = args[0], args[1:]
    if not paths:
        raise Fail("No image path specified", INFO_USAGE)
    for name in filters:
        if "/" in name:
            raise Fail(_err("composefs-info", f"Filter must be a single name: {name}"))
    if command not in INFO_COMMANDS:
        raise Fail(_err("composefs-info", f"Unknown command '{command}'"))
    out = sys.stdout.buffer
    if command == "measure-file":
        return _measure_files(paths, out)

    from ..composefs import listing, reader

    for d in basedirs:
        if not os.path.isdir(d):
            raise Fail(_err("composefs-info", f"Can't open basedir `{d}`: No such file or directory"))
    roots = []
    for path in paths:
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError as e:
            raise Fail(_err("composefs-info", f"Failed to open '{path}': {_strerror(e)}")) from None
        try:
            root = reader.read_image(data)
        except reader.ImageFormatError as e:
            raise Fail(_err("composefs-info", f"Failed to load '{path}': {e}")) from None
        fbytes = [os.fsencode(n) for n in filters] or None
        if command == "ls":
            listing.write_ls(root, out, fbytes)
        elif command == "dump":
            from ..composefs import dumpfile

            dumpfile.format_dump(root, out, fbytes)
        else:
            roots.append(root)
    if command == "objects":
        listing.write_objects(roots, out)
    elif command == "missing-objects":
        listing.write_missing_objects(roots, basedirs, out)
    out.flush()
    return 0


def _measure_files(paths: list[str], out) -> int:
    from ..composefs import fsverity

    for path in paths:
        try:
            digest = fsverity.measure_file(path)
        except IsADirectoryError:
            raise Fail(f"failed to measure '{path}': No data available") from None
        except OSError as e:
            raise Fail(_err("composefs-info", f"Failed to open '{path}': {_strerror(e)}")) from None
        out.write(digest.hex().encode() + b"\n")
    out.flush()
    return 0


# --- mount.composefs -------------------------------------------------------------

#: options that mount(8) passes on but that are meant for mount(8) itself (fstab's
#: ``nofail``, ``_netdev``, ...): the helper accepts and ignores them
MOUNT8_OPTIONS = frozenset({"defaults", "auto", "noauto", "nofail", "_netdev", "user", "nouser",
                            "users", "owner", "group", "loud", "silent"})


def mount_main(argv: list[str]) -> int:
    """mount.composefs: ``[-t composefs] [-o OPTS] IMAGE MOUNTPOINT``, also as mount(8)'s helper.

    mount(8) runs ``/sbin/mount.composefs IMAGE MOUNTPOINT [-sfnv] [-N NS]
    [-o OPTS]`` (util-linux's helper convention), adding ``rw`` or ``ro`` to
    the options and passing fstab options such as ``nofail`` on. So on top
    of upstream's ``-t`` and ``-o`` this takes ``-s`` (sloppy: ignore
    unknown options), ``-f`` (fake: check everything, mount nothing), ``-n``
    (no mtab: there is none to write), ``-v`` (say what was mounted) and
    ``-N NS`` (mount in the mount namespace NS, a path or a pid).
    """
    if "-h" in argv or "--help" in argv:
        sys.stderr.write(MOUNT_USAGE)
        return 0
    try:
        opts, args = getopt.gnu_getopt(argv, "t:o:hsfnvN:")
    except getopt.GetoptError as e:
        raise Fail(f"mount.composefs: {e.msg}", MOUNT_USAGE) from None
    options: list[str] = []
    flags = {key for key, _ in opts}
    namespace = None
    for key, value in opts:
        if key == "-t" and value != "composefs":
            raise Fail(_err("mount.composefs", f"Unsupported fs type '{value}'"))
        if key == "-o":
            options.extend(p for p in value.split(",") if p)
        if key == "-N":
            namespace = value
    if len(args) != 2:
        raise Fail("Expected IMAGE and MOUNTPOINT", MOUNT_USAGE)
    image, target = args

    from ..composefs import mount

    kwargs = mount_options(options, sloppy="-s" in flags)
    basedirs = kwargs.pop("basedirs")
    if "-f" in flags:
        return 0
    if namespace is not None:
        # setns(2) moves the working directory to the namespace's root: paths first.
        image, target = os.path.abspath(image), os.path.abspath(target)
        kwargs = {k: os.path.abspath(v) if k in ("upperdir", "workdir", "idmap") else v
                  for k, v in kwargs.items()}
        basedirs = [os.path.abspath(d) for d in basedirs]
        _enter_mount_namespace(namespace)
    try:
        mount.mount(image, target, basedirs, **kwargs)
    except mount.MountError as e:
        raise Fail(_err("mount.composefs", f"Failed to mount composefs {image}: {e.strerror or e}")) from None
    if "-v" in flags:
        print(f"mount.composefs: {image} mounted on {target}", flush=True)
    return 0


def _enter_mount_namespace(name: str) -> None:
    """setns(2) into the mount namespace at path ``name``, or of process ``name``."""
    path = f"/proc/{name}/ns/mnt" if name.isdigit() else name
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        raise Fail(_err("mount.composefs", f"Failed to open namespace {path}: {_strerror(e)}")) from None
    try:
        if hasattr(os, "setns"):  # Python 3.12+
            os.setns(fd, os.CLONE_NEWNS)
        else:
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            if libc.setns(fd, 0x00020000) != 0:  # CLONE_NEWNS
                err = ctypes.get_errno()
                raise OSError(err, os.strerror(err))
    except OSError as e:
        raise Fail(_err("mount.composefs", f"Failed to enter namespace {path}: {_strerror(e)}")) from None
    finally:
        os.close(fd)


def mount_options(options: list[str], sloppy: bool = False) -> dict:
    """mount.composefs ``-o`` options as keyword arguments of ``mount.mount``.

    The last of ``ro`` and ``rw`` wins (mount(8) puts its own first). With
    ``sloppy``, options this helper does not know are ignored, as mount(8)'s
    ``-s`` asks.
    """
    kw: dict = {"basedirs": []}
    for opt in options:
        key, has_value, value = opt.partition("=")
        if key == "basedir" and has_value:
            kw["basedirs"].extend(p for p in value.split(":") if p)
        elif key == "digest" and has_value:
            kw["digest"] = value
        elif key in ("upperdir", "workdir", "idmap") and has_value:
            kw[key] = value
        elif key == "verity" and not has_value:
            kw["verity"] = "require"
        elif key == "tryverity" and not has_value:
            kw["verity"] = "try"
        elif key in ("ro", "rw") and not has_value:
            kw["readonly"] = key == "ro"
        elif opt in MOUNT8_OPTIONS or key == "comment" or key.startswith("x-"):
            continue
        elif not sloppy:
            raise Fail(_err("mount.composefs", f"Unsupported option {opt}"))
    if not kw["basedirs"]:
        raise Fail("No object dirs specified", MOUNT_USAGE)
    if ("upperdir" in kw) != ("workdir" in kw):
        raise Fail(_err("mount.composefs", "Both workdir and upperdir must be specified if used"))
    return kw


#: what a drop-in adds when it refuses ``--help`` as upstream does
HELP_POINTER = "This is apt-layer's drop-in: see `apt-layer composefs --help` and {page}.\n"
MAN_PAGES = {"mkcomposefs": "mkcomposefs(1)", "info": "composefs-info(1)", "mount": "mount.composefs(8)"}

#: the drop-in tools by the name they take after ``apt-layer composefs``
TOOLS = {"mkcomposefs": mkcomposefs_main, "info": info_main, "mount": mount_main}


def run(tool: str, argv: list[str]) -> int:
    """Run a drop-in tool as upstream would; its exit code (0, or 1 for any error)."""
    try:
        return TOOLS[tool](argv)
    except Fail as e:
        sys.stdout.flush()
        sys.stderr.write(str(e) + "\n")
        if e.usage:
            sys.stderr.write(e.usage)
        if "--help" in argv or "-h" in argv:  # refused as upstream does (scripts may rely on it), but a pointer
            sys.stderr.write(HELP_POINTER.format(page=MAN_PAGES[tool]))
        return 1
    except BrokenPipeError:  # the reader went away (``| head``): not an error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except Exception as e:  # never a traceback from a drop-in tool
        if os.environ.get("APT_LAYER_DEBUG"):
            raise
        sys.stderr.write(f"internal error: {type(e).__name__}: {e}\n")
        return 1
