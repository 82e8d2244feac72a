"""``apt-layer image ...``: create, list, inspect, delete, mount images."""

from __future__ import annotations

import os
import sys

import click

from ..store import CreateOptions
from .output import human_bytes, json_option, make_progress, plural, print_json, table

tx_option = click.option("--tx", metavar="ID", help="Stage the change in open transaction ID (see `tx begin`).")


def complete_image_names(ctx: click.Context, param: click.Parameter, incomplete: str) -> list[str]:
    """Shell completion: the store's live image names (nothing if it cannot be read)."""
    from .. import config, inventory
    from ..store import Store

    params = ctx.find_root().params
    try:  # the global options given after the command name win (see options.adopt)
        cfg = config.load(ctx.meta.get("apt_layer.config_path", params.get("config_path")),
                          ctx.meta.get("apt_layer.root_option", params.get("root")))
        store = Store.open(cfg.root, config=cfg, create=False)
        try:
            return [i["name"] for i in inventory.images(store) if i["name"].startswith(incomplete)]
        finally:
            store.close()
    except Exception:  # completion must never print an error into the shell
        return []


image_name = click.argument("name", shell_complete=complete_image_names)


@click.group()
def image() -> None:
    """Create, inspect, delete and mount images.

    \b
    Example:
      apt-layer image create /srv/rootfs base
      apt-layer image list
      apt-layer image ls base | head
    """


@image.command("create")
@click.argument("source")
@click.argument("name")
@click.option("--from-file", is_flag=True, help="SOURCE is a composefs-dump(5) file, not a directory.")
@click.option("--use-epoch", is_flag=True, help="Make all mtimes zero (reproducible images).")
@click.option("--skip-devices", is_flag=True, help="Leave out device nodes (and whiteouts).")
@click.option("--skip-xattrs", is_flag=True, help="Leave out all extended attributes.")
@click.option("--user-xattrs", is_flag=True, help="Keep only user.* extended attributes.")
@click.option("--min-version", type=click.IntRange(0, 1), default=0, show_default=True,
              help="Lowest composefs format version.")
@click.option("--max-version", type=click.IntRange(0, 1), default=1, show_default=True,
              help="Highest composefs format version.")
@click.option("--threads", type=click.IntRange(1), default=os.cpu_count() or 1, show_default=True,
              help="Threads for hashing and copying file contents.")
@click.option("--backend", type=click.Choice(["auto", "python", "upstream"]), default=None,
              help="Image builder: apt-layer's own, upstream mkcomposefs, or auto (a directory: apt-layer's own; "
                   "a dump: upstream when installed).")
@tx_option
@json_option
@click.pass_context
def create(ctx, source, name, from_file, use_epoch, skip_devices, skip_xattrs, user_xattrs,
           min_version, max_version, threads, backend, tx, as_json) -> None:
    """Build image NAME from the directory tree SOURCE.

    NAME is letters, digits and . _ + -, starting with a letter or digit,
    not ending in .composefs (the image's file adds that).

    File contents over 64 bytes go into the shared object store (each
    content once); the image records metadata and references. The image
    becomes visible only when its event is committed: a crash leaves
    nothing half-made.

    Rebuilding from nearly the same tree is fast: entries whose lstat is
    unchanged are not read again (ROOT/cache/digests), and a tree in which
    nothing changed reuses the bytes of the live image it gave last time
    (ROOT/cache/trees), once they are checked against its digest. Entries
    changed less than 2 s before a build are read again the next time.

    \b
    Example:
      apt-layer image create /srv/rootfs base
      apt-layer image create --from-file rootfs.dump base-from-dump
      apt-layer image create --tx $TX /srv/rootfs-next next
    """
    if skip_xattrs and user_xattrs:
        raise click.UsageError("--skip-xattrs and --user-xattrs conflict")
    settings = ctx.obj
    opts = CreateOptions(from_file=from_file, use_epoch=use_epoch, skip_devices=skip_devices,
                         skip_xattrs=skip_xattrs, user_xattrs=user_xattrs, min_version=min_version,
                         max_version=max(max_version, min_version), threads=threads,
                         backend=backend or settings.config.backend)
    progress = make_progress(ctx, f"creating {name}", as_json)

    def show(s) -> None:
        if s.files or not s.hash_ahead:
            progress(s.files, None, f"files, {human_bytes(s.bytes)}")
        else:  # files to read hashed ahead, on two cores, before the scan
            progress(f"{human_bytes(s.hashed_ahead)} of {human_bytes(s.hash_ahead)} hashed", None)

    # formatting for a hidden indicator cost ~2 us a file
    with progress:
        result = settings.store(create=True).create(source, name, opts, tx=tx,
                                                    progress=show if progress.enabled else None)
    if as_json:
        print_json(result)
    else:
        where = f" (staged in transaction {result['tx']})" if result["staged"] else ""
        same = f", tree unchanged since image {result['reused']}" if result["reused"] else ""
        if result["patched"]:
            changed = result["patched"]["changed"]
            same = (f", {changed} entr{'y' if changed == 1 else 'ies'} changed since image "
                    f"{result['patched']['from']} (patched)")
        click.echo(f"{result['name']}  {result['digest']}  {human_bytes(result['size'])}, "
                   f"{plural(result['objects'], 'object')}{same}{where}")
    if result["objects_missing"]:
        n = result["objects_missing"]
        click.echo(f"apt-layer: warning: image {result['name']!r} references {plural(n, 'object')} "
                   f"the store lacks; it cannot be deployed or mounted whole until they are added "
                   f"(see `apt-layer image missing-objects {result['name']}`)", err=True)


@image.command("list")
@json_option
@click.pass_context
def list_(ctx, as_json) -> None:
    """List live images.

    \b
    Example:
      apt-layer image list --json | jq -r '.[].name'
    """
    from .. import inventory

    images = inventory.images(ctx.obj.store())
    if as_json:
        print_json(images)
        return
    click.echo(table(((i["name"], i["digest"][:16], human_bytes(i["size"]), i["objects"],
                       human_bytes(i["content_bytes"]), ", ".join(i["deployed"]) or None, i["created_at"][:19])
                      for i in images),
                     ("name", "digest", "size", "objects", "content", "deployed", "created")))


@image.command("info")
@image_name
@json_option
@click.pass_context
def info(ctx, name, as_json) -> None:
    """Show one image: digest, sizes, objects, deployment, mounts, creator.

    \b
    Example:
      apt-layer image info base
    """
    from .. import inventory

    data = inventory.image_info(ctx.obj.store(), name)
    if as_json:
        print_json(data)
        return
    for key in ("name", "digest", "path", "size", "objects", "content_bytes", "created_at",
                "created_by", "source", "tx", "deployed", "mounts"):
        value = data.get(key)
        if isinstance(value, list):
            value = ", ".join(value) or "-"
        elif isinstance(value, dict):
            value = " ".join(f"{k}={v}" for k, v in value.items())
        elif value is None:
            value = "-"
        click.echo(f"{key + ':':15} {value}")


@image.command("delete")
@image_name
@tx_option
@json_option
@click.pass_context
def delete(ctx, name, tx, as_json) -> None:
    """Delete image NAME (its objects go at the next `gc`).

    A deployed or mounted image is refused.

    \b
    Example:
      apt-layer image delete old && apt-layer gc
    """
    result = ctx.obj.store().delete(name, tx=tx)
    if as_json:
        print_json(result)
    else:
        click.echo(f"delete of {name} staged in transaction {tx}" if tx else f"deleted {name}")


def _listing(ctx, name: str, what: str, filters: tuple[str, ...] = (), as_json: bool = False) -> None:
    from ..composefs import dumpfile, listing, reader

    store = ctx.obj.store()
    path = store.image_file(name)
    fbytes = [os.fsencode(f) for f in filters] or None
    try:
        root = reader.read_image(str(path), filters=fbytes)
    except reader.ImageFormatError as e:
        from ..errors import StoreCorrupt

        raise StoreCorrupt(f"image {name!r} ({path}): {e}") from None
    if as_json:
        print_json(listing.objects_list([root]) if what == "objects" else list(listing.entry_records(root)))
        return
    out = sys.stdout.buffer
    if what == "ls":
        listing.write_ls(root, out)
    elif what == "dump":
        dumpfile.format_dump(root, out)
    else:
        listing.write_objects([root], out)
    out.flush()


filter_option = click.option("--filter", "filters", multiple=True, metavar="NAME",
                             help="Only this top-level entry (repeatable).")


@image.command("ls")
@image_name
@filter_option
@json_option
@click.pass_context
def ls(ctx, name, filters, as_json) -> None:
    """List the files of image NAME (as `composefs-info ls`).

    \b
    Example:
      apt-layer image ls base --filter etc
    """
    _listing(ctx, name, "ls", filters, as_json)


@image.command("dump")
@image_name
@filter_option
@json_option
@click.pass_context
def dump(ctx, name, filters, as_json) -> None:
    """Print image NAME as composefs-dump(5) text (as `composefs-info dump`).

    With --json, the entries as `image ls --json` prints them (every field
    of the dump but inline file contents).

    \b
    Example:
      apt-layer image dump base > base.dump
    """
    _listing(ctx, name, "dump", filters, as_json)


@image.command("objects")
@image_name
@json_option
@click.pass_context
def objects(ctx, name, as_json) -> None:
    """List the backing objects image NAME needs (as `composefs-info objects`).

    \b
    Example:
      apt-layer image objects base | wc -l
    """
    _listing(ctx, name, "objects", as_json=as_json)


@image.command("missing-objects")
@image_name
@json_option
@click.pass_context
def missing_objects(ctx, name, as_json) -> None:
    """List objects image NAME needs that are not in the store (exit 10 if any).

    \b
    Example:
      apt-layer image missing-objects base
    """
    missing = ctx.obj.store().missing_objects(name)
    if as_json:
        print_json(missing)
    else:
        for obj in missing:
            click.echo(obj)
    if missing:
        ctx.exit(10)


@image.command("mount")
@image_name
@click.argument("mountpoint", type=click.Path(file_okay=False))
@click.option("--basedir", "basedirs", multiple=True, metavar="DIR",
              help="Extra object directory searched after the store's (repeatable).")
@click.option("--upperdir", metavar="DIR", help="Make the mount writable: changes go here.")
@click.option("--workdir", metavar="DIR", help="Overlayfs work directory (with --upperdir).")
@click.option("--ro", "readonly", is_flag=True, help="Mount read-only.")
@click.option("--verity", type=click.Choice(["off", "try", "require"]), default="off", show_default=True,
              help="Check file contents against their fs-verity digests.")
@click.option("--idmap", metavar="USERNS", help="Shift owners by the mapping of this user namespace file.")
@click.option("--backend", type=click.Choice(["python", "upstream", "auto"]), default="python",
              show_default=True, help="Mount natively, or through upstream mount.composefs, or auto (upstream "
                                      "when installed). The configuration's backend is for building images only: "
                                      "mounts are apt-layer's own unless asked.")
@click.option("--allow-suid", is_flag=True,
              help="Honour set-id bits and device nodes in the image (the mount is nosuid,nodev without it).")
@json_option
@click.pass_context
def mount(ctx, name, mountpoint, basedirs, upperdir, workdir, readonly, verity, idmap, backend, allow_suid,
          as_json) -> None:
    """Mount image NAME on MOUNTPOINT (needs root).

    The mount is nosuid,nodev unless --allow-suid; an image whose overlay
    redirects point outside the object directories is refused (exit 2).

    \b
    Example:
      apt-layer image mount base /mnt/base
      apt-layer image mount base /mnt/rw --upperdir /var/tmp/up --workdir /var/tmp/work
    """
    if (upperdir is None) != (workdir is None):
        raise click.UsageError("--upperdir and --workdir go together")
    from .. import mounts

    result = mounts.mount(ctx.obj.store(), name, mountpoint, basedirs=basedirs, upperdir=upperdir,
                          workdir=workdir, readonly=readonly, verity=verity, idmap=idmap, backend=backend,
                          allow_suid=allow_suid)
    if as_json:
        print_json(result)
        return
    if result["missing_objects"]:
        click.echo(f"apt-layer: warning: {plural(len(result['missing_objects']), 'object')} of image {name!r} "
                   f"missing from the store; reading those files will fail (see `apt-layer image missing-objects "
                   f"{name}`)", err=True)
    click.echo(f"mounted {name} on {result['mountpoint']}")


@image.command("unmount")
@click.argument("mountpoint", type=click.Path(file_okay=False))
@click.option("--lazy", is_flag=True, help="Detach even if busy.")
@click.option("--force", is_flag=True, help="Unmount even a mount this store did not make.")
@json_option
@click.pass_context
def unmount(ctx, mountpoint, lazy, force, as_json) -> None:
    """Unmount an image mounted with `image mount`.

    A mount point this store did not mount (no record in its journal: made
    by `mount.composefs`, or by another store) is refused unless --force.

    \b
    Example:
      apt-layer image unmount /mnt/base
    """
    from .. import mounts

    result = mounts.unmount(ctx.obj.store(), mountpoint, lazy=lazy, force=force)
    if as_json:
        print_json(result)
    else:
        click.echo(f"unmounted {result['mountpoint']}")


@image.command("import")
@click.argument("file", type=click.Path(dir_okay=False))
@click.argument("name")
@json_option
@click.pass_context
def import_(ctx, file, name, as_json) -> None:
    """Make image NAME from a tarball or a squashfs file (a base for layering).

    FILE is .tar, .tar.gz, .tar.xz, .tar.zst (extracted with tar, owners,
    modes, xattrs, hard links and device nodes kept) or .squashfs
    (unsquashfs). `image export` writes them back.

    \b
    Example:
      apt-layer image import rootfs.tar.zst base
      apt-layer image import filesystem.squashfs live-base
    """
    from .. import bases

    result = bases.import_file(ctx.obj.store(create=True), file, name)
    if as_json:
        print_json(result)
    else:
        click.echo(f"{result['name']}  {result['digest']}  {human_bytes(result['size'])}, "
                   f"{plural(result['objects'], 'object')}")


@image.command("export")
@image_name
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--format", "fmt", type=click.Choice(["tar", "squashfs"]),
              help="Archive format (default: from FILE's name).")
@json_option
@click.pass_context
def export(ctx, name, file, fmt, as_json) -> None:
    """Write image NAME's tree to FILE as a tarball or a squashfs file (needs root: the image is mounted).

    A tarball is POSIX (pax) format with numeric owners, xattrs and
    nanosecond mtimes, compressed as its name says (.gz, .xz, .zst):
    importing it gives an image with the same digest. squashfs keeps
    mtimes in whole seconds.

    \b
    Example:
      apt-layer image export base base.tar.zst
      apt-layer image export base base.squashfs
    """
    from .. import bases

    result = bases.export_file(ctx.obj.store(), name, file, fmt)
    if as_json:
        print_json(result)
    else:
        click.echo(f"wrote {result['file']} ({result['format']}, {human_bytes(result['size'])})")
