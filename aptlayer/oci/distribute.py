"""Push an image as an OCI image, pull an OCI image as an image: through the Store.

Push reads the image's tree, plans its layers by package
(:mod:`.chunking`), writes each as a gzip-compressed tar blob into an OCI
layout (the destination's own for ``oci:``, one in staging for a
registry, then ``skopeo copy``), with a config and a manifest whose
annotation ``org.apt-layer.composefs.digest`` is the image's digest. The
same image gives the same blobs, so the same manifest digest.

Pull gets the image into a layout (a registry's through ``skopeo copy``
into a layout in staging whose blobs live in ``cache/oci/blobs``), then
reads each layer it has not read before (checking its digest and its
uncompressed digest against the config's ``diff_ids``), importing the
files into the digest store, and applies the layers in order to a tree
that :meth:`Store.create` records, with an ``image.pulled`` event in the
same transaction. A manifest with apt-layer's annotation must give back
that very digest, or nothing is recorded. The store lock is held shared
throughout, so gc cannot take objects a pull has imported but not yet
recorded; a pull that fails records no image (objects it imported stay
for the next attempt, and are garbage to gc if none comes).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import zlib
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

from .. import errors, names
from ..builder import CreateOptions, TreeSource
from ..composefs import fsverity
from ..composefs.objectstore import ObjectStore
from ..composefs.imageview import ImageView
from ..composefs.reader import read_image
from ..composefs.tree import Node
from ..fault import fault
from ..journal.kinds import ImagePulled
from ..layout import new_id
from ..linux import fsops
from ..lock import locked
from ..store import Store
from . import chunking, tarlayer, transport
from .cache import PullCache
from .layout import (DOCKER_LAYER_GZIP, GO_ARCH, MEDIA_CONFIG, MEDIA_LAYER, MEDIA_LAYER_GZIP, MEDIA_MANIFEST,
                     BlobMismatch, LayoutError, MissingBlob, NoSuchImage, OciLayout, Verified, host_arch)

#: the manifest annotation that carries the composefs image's digest
DIGEST_ANNOTATION = "org.apt-layer.composefs.digest"
#: ... and its composefs format version, which the pull renders it with
VERSION_ANNOTATION = "org.apt-layer.composefs.version"
#: a layer's annotation: what the layer holds (a package, a bucket of them, ...)
LAYER_ANNOTATION = "org.apt-layer.layer"
GZIP_LEVEL = 6
_GZIP_LAYERS = (MEDIA_LAYER_GZIP, DOCKER_LAYER_GZIP)

Progress = Callable[[str, int, int, int], None]


def _canonical(value: dict) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":")).encode()


# --- push ------------------------------------------------------------------------------------


def push(store: Store, name: str, dest: str, *, tls_verify: bool = True, chunked: bool = True,
         progress: Progress | None = None) -> dict:
    """Image ``name`` as an OCI image at ``dest`` (``oci:DIR[:TAG]`` or ``docker://...``)."""
    ref = transport.parse(dest)
    names.check_image_name(name)
    if ref.is_remote:
        transport.skopeo()
    with store.writing():
        image_file = store.image_file(name)
        data = image_file.read_bytes()
        root = read_image(data)
        owners, arch = _packages(image_file, store, root)
        chunks = chunking.plan(root, owners, chunked)
        with _scratch(store) as scratch:
            if ref.is_remote:
                layout, tag = OciLayout(scratch / "layout"), transport.DEFAULT_TAG
            else:
                layout, tag = OciLayout(ref.path), ref.tag or transport.DEFAULT_TAG
            try:
                layout.init()
                built = _write_image(layout, store, root, chunks, arch, progress, {
                    DIGEST_ANNOTATION: fsverity.digest_bytes(data).hex(),
                    VERSION_ANNOTATION: str(ImageView(data).composefs_version)})
                layout.tag(tag, built["manifest"])
            except OSError as e:
                raise errors.from_os_error(e, f"writing {layout.path}") from None
            if ref.is_remote:
                if progress is not None:
                    progress("copying to the registry", 0, 0, 0)
                transport.copy(f"oci:{layout.path}:{tag}", dest, what=f"pushing to {dest}", tls_verify=tls_verify)
    layers = built["layers"]
    return {"image": name, "digest": built["digest"], "destination": dest,
            "manifest_digest": built["manifest"]["digest"], "layers": len(layers),
            "bytes": sum(d["size"] for d in layers),
            "layer_list": [{"digest": d["digest"], "size": d["size"],
                            "holds": d["annotations"][LAYER_ANNOTATION]} for d in layers]}


def _packages(image_file: Path, store: Store, tree: Node) -> tuple[dict[bytes, str], str]:
    """path -> package from the image's dpkg database, and the image's architecture (OCI's name)."""
    from ..packages import dpkgdb
    from ..packages.rootfs import ImageRoot

    root = ImageRoot(image_file, store.objects_dir)
    try:
        db = dpkgdb.read_database(root)
    except dpkgdb.NoDpkgDatabase:
        return {}, host_arch()
    owners = chunking.owners_from_lists(tree, dpkgdb.read_file_lists(root, db.installed))
    archs = sorted({p.architecture for p in db.installed} - {"all"})
    debian_arch = next((a for a in archs if a in GO_ARCH), None)
    return owners, GO_ARCH[debian_arch][0] if debian_arch else host_arch()


def _write_image(layout: OciLayout, store: Store, root: Node, chunks, arch: str, progress: Progress | None,
                 annotations: dict[str, str]) -> dict:
    first_names: dict[int, bytes] = {}
    for path, node in root.walk():
        if node.link is None and not node.is_dir:
            first_names.setdefault(id(node), path)
    objects = store.objects_dir

    def open_object(obj: str):
        return open(os.path.join(objects, obj), "rb")

    layers, diff_ids = [], []
    written = 0
    for i, chunk in enumerate(chunks):
        with layout.new_blob() as blob:
            diff = _Hashing(gzip.GzipFile(filename="", mode="wb", fileobj=blob, compresslevel=GZIP_LEVEL, mtime=0))
            tarlayer.write_layer(chunk.ordered(), diff, open_object, first_names)
            diff.close()
        written += blob.size
        layers.append(blob.descriptor(MEDIA_LAYER_GZIP, {LAYER_ANNOTATION: _holds(chunk)}))
        diff_ids.append("sha256:" + diff.hash.hexdigest())
        if progress is not None:
            progress("writing layers", i + 1, len(chunks), written)
    config = {"architecture": arch, "os": "linux", "config": {},
              "rootfs": {"type": "layers", "diff_ids": diff_ids}}
    config_desc = layout.write_blob(_canonical(config), MEDIA_CONFIG)
    manifest = {"schemaVersion": 2, "mediaType": MEDIA_MANIFEST, "config": config_desc, "layers": layers,
                "annotations": annotations}
    return {"manifest": layout.write_blob(_canonical(manifest), MEDIA_MANIFEST), "layers": layers,
            "digest": annotations[DIGEST_ANNOTATION]}


def _holds(chunk: chunking.Chunk) -> str:
    if chunk.packages and chunk.label.startswith("packages "):
        return f"{chunk.label}: {' '.join(chunk.packages)}"[:4000]
    return chunk.label


class _Hashing:
    """A writer that hashes what passes through to a gzip stream (the layer's uncompressed digest)."""

    def __init__(self, gz: gzip.GzipFile):
        self.gz = gz
        self.hash = hashlib.sha256()

    def write(self, data) -> int:
        self.hash.update(data)
        return self.gz.write(data)

    def close(self) -> None:
        self.gz.close()


# --- pull ------------------------------------------------------------------------------------


def pull(store: Store, src: str, name: str, *, tls_verify: bool = True, progress: Progress | None = None) -> dict:
    """The OCI image ``src`` as image ``name`` (see the module docstring)."""
    ref = transport.parse(src)
    names.check_image_name(name)
    if ref.is_remote:
        transport.skopeo()
    cache = PullCache(store.layout.cache_file("oci"))
    with store.writing():
        store.check_name_free(name)
        try:
            cache.prepare()
        except OSError as e:
            raise errors.from_os_error(e, f"preparing {cache.path}") from None
        with locked(cache.lock, exclusive=False), _scratch(store) as scratch:
            fetched: dict[str, int] = {}
            if ref.is_remote:
                layout, tag = OciLayout(scratch / "layout", blobs=cache.blobs), transport.DEFAULT_TAG
                before = cache.blob_sizes()
                fault("pull.before-fetch")
                if progress is not None:
                    progress("fetching", 0, 0, 0)
                transport.copy(src, f"oci:{layout.path}:{tag}", what=f"pulling {src}", tls_verify=tls_verify,
                               dest_blobs=str(cache.blobs))
                fetched = {d: s for d, s in cache.blob_sizes().items() if d not in before}
            else:
                layout, tag = OciLayout(ref.path), ref.tag
                if not layout.exists():
                    raise errors.NotFound(f"{ref.path}: not an OCI image layout (no oci-layout file)")
            try:
                result = _pull_layout(store, cache, layout, tag, src, name, scratch, progress)
            except BlobMismatch as e:
                raise errors.IntegrityError(str(e)) from None
            except MissingBlob as e:
                raise errors.IntegrityError(f"{e} (the manifest names a blob the image does not have)") from None
            except NoSuchImage as e:
                raise errors.NotFound(str(e)) from None
            except (LayoutError, tarlayer.LayerError) as e:
                raise errors.InvalidInput(f"{src}: {e}") from None
            if ref.is_remote:
                cache.remember(name, result["blobs"])
        if ref.is_remote:
            fetched_layers = [d for d in result["layer_digests"] if d in fetched]
            result.update(fetched_layers=len(fetched_layers), fetched_bytes=sum(fetched[d] for d in fetched_layers))
            cache.prune(lambda image: store.image_path(image).is_file())
        del result["blobs"], result["layer_digests"]
    return result


def _pull_layout(store: Store, cache: PullCache, layout: OciLayout, tag: str | None, src: str, name: str,
                 scratch: Path, progress: Progress | None) -> dict:
    desc, manifest = layout.resolve(tag)
    config_desc = manifest.get("config")
    layers = manifest.get("layers")
    if not isinstance(config_desc, dict) or not isinstance(layers, list) or not all(isinstance(d, dict)
                                                                                   for d in layers):
        raise LayoutError(f"manifest {desc.get('digest')}: no config or no list of layers")
    config = layout.read_json(config_desc, "config")
    diff_ids = (config.get("rootfs") or {}).get("diff_ids")
    if not isinstance(diff_ids, list) or len(diff_ids) != len(layers):
        raise LayoutError(f"config {config_desc['digest']}: rootfs.diff_ids does not list one digest per layer")
    annotations = manifest.get("annotations") or {}
    expect = annotations.get(DIGEST_ANNOTATION)
    version = {"0": 0, "1": 1}.get(annotations.get(VERSION_ANNOTATION), 0)
    objects = ObjectStore(store.objects_dir, batch=True, refresh_hits=False)
    root = Node()
    read = read_bytes = 0
    for i, layer in enumerate(layers):
        entries = cache.entries(layer.get("digest", ""), objects)
        if entries is None:
            try:
                entries = _read_layer(layout, layer, diff_ids[i], objects, scratch)
                objects.sync()
            except BaseException:
                objects.discard()
                raise
            cache.keep(layer["digest"], entries)
            read += 1
            read_bytes += layer["size"]
            fault("pull.after-layer")
        tarlayer.apply_layer(root, entries, keep_links=expect is not None)
        if progress is not None:
            progress("reading layers", i + 1, len(layers), read_bytes)
    manifest_digest = desc["digest"]
    pulled = ImagePulled(subject=name, source=src, manifest_digest=manifest_digest, layers=len(layers),
                         layers_read=read, bytes_read=read_bytes)
    created = store.create(TreeSource(root, src, expect), name, CreateOptions(backend="python", min_version=version, max_version=max(1, version)),
                           about={"origin": {"pull": {"source": src, "manifest_digest": manifest_digest}}},
                           also=(pulled,))
    return {"image": name, "digest": created["digest"], "source": src, "manifest_digest": manifest_digest,
            "layers": len(layers), "layers_read": read, "bytes_read": read_bytes, "objects": created["objects"],
            "verified": expect is not None, "tx": created["tx"],
            "layer_digests": [d["digest"] for d in layers],
            "blobs": [desc["digest"], config_desc["digest"], *(d["digest"] for d in layers)]}


def _read_layer(layout: OciLayout, layer: dict, diff_id: str, objects: ObjectStore, scratch: Path) -> list[dict]:
    media = layer.get("mediaType")
    if media not in (*_GZIP_LAYERS, MEDIA_LAYER):
        raise errors.Unsupported(f"layer {layer.get('digest')}: media type {media!r} is not supported "
                                 "(apt-layer reads tar and tar+gzip layers)")
    with layout.open_blob(layer) as blob:
        stream = gzip.GzipFile(fileobj=blob, mode="rb") if media in _GZIP_LAYERS else blob
        diff = Verified(stream, diff_id, None)
        try:
            entries = tarlayer.read_layer(diff, objects, str(scratch))
            diff.finish()
        except (tarlayer.LayerError, BlobMismatch, EOFError, zlib.error, gzip.BadGzipFile) as e:
            blob.finish()  # a blob that is not what its digest says is the first thing to tell
            if isinstance(e, BlobMismatch):
                raise BlobMismatch(f"layer {layer['digest']}: its uncompressed content does not match "
                                   f"the config's diff_id {diff_id}") from None
            raise tarlayer.LayerError(f"layer {layer['digest']}: {e}") from None
        blob.finish()
    return entries


@contextmanager
def _scratch(store: Store):
    """A folder in staging for the operation's temporary files (recovery removes it if the process dies)."""
    path = store.staging_path(new_id())
    fsops.mkdir(str(path), 0o755)
    try:
        yield path
    finally:
        fsops.remove_tree(str(path))
