"""``apt-layer push`` and ``apt-layer pull``: images as OCI images, to and from layouts and registries."""

from __future__ import annotations

import click

from .output import human_bytes, json_option, make_progress, print_json

tls_option = click.option("--tls-verify", type=click.BOOL, default=True, show_default=True, metavar="BOOL",
                          help="Check the registry's TLS certificate and use HTTPS (--tls-verify=false: "
                               "plain HTTP, for a test registry).")


def _layers(progress):
    """The transfer's progress callback on a terminal (layers done, bytes, phase); None otherwise."""
    def show(phase: str, done: int, total: int, nbytes: int) -> None:
        progress(done, total or None, f"layers, {human_bytes(nbytes)} ({phase})" if total else phase)

    return show if progress.enabled else None


@click.command()
@click.argument("name")
@click.argument("dest")
@tls_option
@click.option("--single-layer", is_flag=True, help="One layer for the whole tree instead of one per package "
                                                   "group (for comparison).")
@json_option
@click.pass_context
def push(ctx, name, dest, tls_verify, single_layer, as_json) -> None:
    """Publish image NAME as an OCI image at DEST.

    DEST is oci:DIR[:TAG] (an OCI image layout, written by apt-layer itself)
    or docker://HOST[:PORT]/REPO:TAG (a registry, through skopeo, which
    reads its credentials from containers' auth.json). The tree is split
    into tar layers by Debian package, so a new version of the image that
    changes a few packages shares every other layer with the last one.
    The manifest records the image's digest: a pull gives back exactly it.

    \b
    Example:
      apt-layer push base oci:/srv/oci/base:v1
      apt-layer push base docker://registry.example.org/fleet/base:v1
      apt-layer push base docker://127.0.0.1:5000/base:v1 --tls-verify=false
    """
    from ..oci import distribute

    with make_progress(ctx, f"pushing {name}", as_json) as progress:
        result = distribute.push(ctx.obj.store(), name, dest, tls_verify=tls_verify, chunked=not single_layer,
                                 progress=_layers(progress))
    if as_json:
        print_json(result)
    else:
        click.echo(f"{name}  {result['digest']}  -> {dest}  {result['manifest_digest']}, "
                   f"{result['layers']} layers, {human_bytes(result['bytes'])}")


@click.command()
@click.argument("src")
@click.argument("name")
@tls_option
@json_option
@click.pass_context
def pull(ctx, src, name, tls_verify, as_json) -> None:
    """Make image NAME from the OCI image SRC.

    SRC is oci:DIR[:TAG] or docker://HOST[:PORT]/REPO:TAG, any OCI or
    Docker image (for a multi-platform one, the host's platform). Layers
    read before (ROOT/cache/oci) are not read again, blobs fetched before
    not fetched again, files already in the store not written again; an
    interrupted pull resumes. An image apt-layer pushed must come back with
    the digest it had, or nothing is made. Exit 12 if the registry
    transfer fails.

    \b
    Example:
      apt-layer pull oci:/srv/oci/base:v1 base
      apt-layer pull docker://registry.example.org/fleet/base:v2 base-v2
      apt-layer pull docker://docker.io/library/debian:trixie trixie
    """
    from ..oci import distribute

    with make_progress(ctx, f"pulling {name}", as_json) as progress:
        result = distribute.pull(ctx.obj.store(create=True), src, name, tls_verify=tls_verify,
                                 progress=_layers(progress))
    if as_json:
        print_json(result)
    else:
        fetched = (f", {result['fetched_layers']} fetched ({human_bytes(result['fetched_bytes'])})"
                   if "fetched_layers" in result else "")
        click.echo(f"{name}  {result['digest']}  <- {src}  {result['layers']} layers, "
                   f"{result['layers_read']} read{fetched}{', digest checked' if result['verified'] else ''}")
