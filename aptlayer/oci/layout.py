"""The OCI image layout on disk, read and written natively.

::

    DIR/oci-layout          {"imageLayoutVersion": "1.0.0"}
    DIR/index.json          an image index; each manifest tagged by the
                            annotation org.opencontainers.image.ref.name
    DIR/blobs/sha256/HEX    content-addressed blobs (manifests, configs, layers)

Blobs are read through :class:`Verified`, which checks the digest and the
size once the blob has been read to its end: nothing read from a layout is
trusted before that. A blob is written to a temp file, fsynced, and renamed
to its digest; a blob already there is never written again. ``index.json``
is replaced by rename. ``blobs`` may be kept elsewhere (skopeo's
``--dest-shared-blob-dir``), as the pull's cache does.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import re
from contextlib import contextmanager
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from ..linux import fsops

MEDIA_INDEX = "application/vnd.oci.image.index.v1+json"
MEDIA_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MEDIA_CONFIG = "application/vnd.oci.image.config.v1+json"
MEDIA_LAYER = "application/vnd.oci.image.layer.v1.tar"
MEDIA_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
MEDIA_LAYER_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"
INDEXES = (MEDIA_INDEX, DOCKER_LIST)
MANIFESTS = (MEDIA_MANIFEST, DOCKER_MANIFEST)
#: the annotation that names a manifest of index.json (its tag)
REF_NAME = "org.opencontainers.image.ref.name"
_DIGEST_RE = re.compile(r"sha256:[0-9a-f]{64}\Z")
#: manifests and configs are small; a bigger one is not what it claims to be
MAX_JSON_BLOB = 16 << 20
#: Debian architectures as OCI (Go) names them: (architecture, variant)
GO_ARCH = {"amd64": ("amd64", None), "arm64": ("arm64", "v8"), "i386": ("386", None), "armhf": ("arm", "v7"),
           "armel": ("arm", "v5"), "ppc64el": ("ppc64le", None), "s390x": ("s390x", None),
           "riscv64": ("riscv64", None), "mips64el": ("mips64le", None), "loong64": ("loong64", None)}
_MACHINE = {"x86_64": "amd64", "aarch64": "arm64", "i686": "386", "armv7l": "arm", "ppc64le": "ppc64le",
            "s390x": "s390x", "riscv64": "riscv64"}


class LayoutError(ValueError):
    """A layout that is not one, a malformed index or manifest, a missing blob."""


class BlobMismatch(LayoutError):
    """A blob whose content does not match its digest or size."""


class MissingBlob(LayoutError):
    """A descriptor names a blob the layout does not have."""


class NoSuchImage(LayoutError):
    """The layout has no image of that tag (or no single image when no tag is given)."""


def host_arch() -> str:
    """The host's architecture as OCI names it."""
    return _MACHINE.get(platform.machine(), platform.machine())


def check_digest(digest: object) -> str:
    if not isinstance(digest, str) or not _DIGEST_RE.match(digest):
        raise LayoutError(f"unsupported or malformed digest {digest!r} (apt-layer reads sha256 only)")
    return digest


class Verified:
    """A blob opened for reading: its sha256 and size are checked when :meth:`finish` is called."""

    def __init__(self, f: BinaryIO, digest: str, size: int | None):
        self.f, self.digest, self.size = f, digest, size
        self.hash = hashlib.sha256()
        self.count = 0

    def read(self, n: int = -1) -> bytes:
        data = self.f.read(n)
        self.hash.update(data)
        self.count += len(data)
        if self.size is not None and self.count > self.size:
            raise BlobMismatch(f"blob {self.digest} is longer than its descriptor's {self.size} bytes")
        return data

    def readinto(self, b) -> int:
        data = self.read(len(b))
        b[:len(data)] = data
        return len(data)

    def finish(self) -> None:
        """Read what is left and check; BlobMismatch if the bytes are not the blob's."""
        while self.read(1 << 20):
            pass
        if "sha256:" + self.hash.hexdigest() != self.digest:
            raise BlobMismatch(f"blob {self.digest} does not match its digest (the content is sha256:"
                               f"{self.hash.hexdigest()})")
        if self.size is not None and self.count != self.size:
            raise BlobMismatch(f"blob {self.digest} has {self.count} bytes, its descriptor says {self.size}")


class OciLayout:
    """The OCI image layout at ``path`` (blobs under ``blobs``, by default ``path/blobs``)."""

    def __init__(self, path: str | os.PathLike, blobs: str | os.PathLike | None = None):
        self.path = Path(path)
        self.blobs = Path(blobs) if blobs is not None else self.path / "blobs"

    def exists(self) -> bool:
        return (self.path / "oci-layout").is_file()

    def init(self) -> None:
        """Make the layout's directory, ``oci-layout`` and an empty index where missing."""
        for d in (self.path, self.blobs, self.blobs / "sha256"):
            if not d.is_dir():
                d.mkdir(mode=0o755, parents=True)
        if not (self.path / "oci-layout").is_file():
            fsops.write_file_atomic(self.path / "oci-layout", b'{"imageLayoutVersion":"1.0.0"}')
        if not (self.path / "index.json").is_file():
            self._write_index({"schemaVersion": 2, "mediaType": MEDIA_INDEX, "manifests": []})

    # --- blobs -------------------------------------------------------------------------

    def blob_path(self, digest: str) -> Path:
        return self.blobs / "sha256" / check_digest(digest)[len("sha256:"):]

    def has_blob(self, digest: str) -> bool:
        return self.blob_path(digest).is_file()

    @contextmanager
    def open_blob(self, desc: dict) -> Iterator[Verified]:
        """The blob a descriptor names, for reading; the caller calls ``finish()`` once done."""
        digest = check_digest(desc.get("digest"))
        try:
            f = open(self.blob_path(digest), "rb")
        except FileNotFoundError:
            raise MissingBlob(f"{self.path}: blob {digest} is missing") from None
        with f:
            yield Verified(f, digest, desc.get("size"))

    def read_json(self, desc: dict, what: str) -> dict:
        """A JSON blob (a manifest, a config), checked against its descriptor."""
        if not isinstance(desc.get("size"), int) or desc["size"] > MAX_JSON_BLOB:
            raise LayoutError(f"{what}: a descriptor without a sensible size")
        with self.open_blob(desc) as blob:
            data = blob.read(desc["size"] + 1)
            blob.finish()
        try:
            value = json.loads(data)
        except ValueError:
            raise LayoutError(f"{what} {desc['digest']} is not JSON") from None
        if not isinstance(value, dict):
            raise LayoutError(f"{what} {desc['digest']} is not a JSON object")
        return value

    @contextmanager
    def new_blob(self) -> Iterator[_BlobWriter]:
        """A blob being written: named by its digest when the block ends (unless that blob is here already)."""
        (self.blobs / "sha256").mkdir(mode=0o755, parents=True, exist_ok=True)
        writer = _BlobWriter(self.blobs / "sha256")
        try:
            yield writer
            writer.close(self)
        finally:
            writer.discard()

    def write_blob(self, data: bytes, media_type: str, annotations: dict | None = None) -> dict:
        with self.new_blob() as w:
            w.write(data)
        return w.descriptor(media_type, annotations)

    # --- index -------------------------------------------------------------------------

    def index(self) -> dict:
        try:
            value = json.loads((self.path / "index.json").read_bytes())
        except FileNotFoundError:
            raise LayoutError(f"{self.path}: not an OCI image layout (no index.json)") from None
        except ValueError:
            raise LayoutError(f"{self.path}/index.json is not JSON") from None
        if not isinstance(value, dict) or not isinstance(value.get("manifests", []), list):
            raise LayoutError(f"{self.path}/index.json is not an image index")
        return value

    def tag(self, tag: str, desc: dict) -> None:
        """Name the manifest ``desc`` ``tag`` in index.json (another manifest of that tag loses it)."""
        index = self.index()
        kept = [m for m in index.get("manifests", []) if (m.get("annotations") or {}).get(REF_NAME) != tag]
        entry = dict(desc)
        entry["annotations"] = {**(desc.get("annotations") or {}), REF_NAME: tag}
        index["manifests"] = kept + [entry]
        self._write_index(index)

    def _write_index(self, index: dict) -> None:
        fsops.write_file_atomic(self.path / "index.json", json.dumps(index, sort_keys=True).encode())

    def resolve(self, tag: str | None) -> tuple[dict, dict]:
        """(descriptor, manifest) of the image tagged ``tag`` (the only one when None), for this host.

        An image index (several platforms) gives the manifest for linux on
        the host's architecture.
        """
        manifests = [m for m in self.index().get("manifests", []) if isinstance(m, dict)]
        if tag is None:
            if len(manifests) != 1:
                raise NoSuchImage(f"{self.path} holds {len(manifests)} images: name one with oci:DIR:TAG")
            found = manifests
        else:
            found = [m for m in manifests if (m.get("annotations") or {}).get(REF_NAME) == tag]
            if not found:
                raise NoSuchImage(f"{self.path}: no image tagged {tag!r}")
        desc = found[-1]
        for _ in range(4):
            media = desc.get("mediaType")
            if media in MANIFESTS:
                return desc, self.read_json(desc, "manifest")
            if media not in INDEXES:
                raise LayoutError(f"{self.path}: unsupported manifest media type {media!r}")
            desc = _for_host(self.read_json(desc, "image index"), self.path)
        raise LayoutError(f"{self.path}: image indexes nested too deep")


def _for_host(index: dict, where: Path) -> dict:
    arch = host_arch()
    options = [m for m in index.get("manifests", []) if isinstance(m, dict)]
    for m in options:
        plat = m.get("platform") or {}
        if plat.get("os") == "linux" and plat.get("architecture") == arch:
            return m
    if len(options) == 1 and not options[0].get("platform"):
        return options[0]
    raise LayoutError(f"{where}: no image for linux/{arch} in its index")


class _BlobWriter:
    """A temp file beside the blobs that hashes what is written."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.tmp = folder / f".tmp-{os.getpid()}-{os.urandom(6).hex()}"
        self.f = open(self.tmp, "xb")
        self.hash = hashlib.sha256()
        self.size = 0
        self.digest: str | None = None

    def write(self, data) -> int:
        self.hash.update(data)
        self.size += len(data)
        return self.f.write(data)

    def flush(self) -> None:
        self.f.flush()

    def close(self, layout: OciLayout) -> None:
        self.digest = "sha256:" + self.hash.hexdigest()
        self.f.flush()
        fsops.fsync(self.f.fileno())
        self.f.close()
        final = layout.blob_path(self.digest)
        if final.exists():
            return  # the same bytes are there: never rewritten
        os.rename(self.tmp, final)
        fsops.fsync_dir(str(self.folder))

    def discard(self) -> None:
        if not self.f.closed:
            self.f.close()
        if self.tmp.exists():
            self.tmp.unlink()

    def descriptor(self, media_type: str, annotations: dict | None = None) -> dict:
        assert self.digest is not None
        desc = {"mediaType": media_type, "digest": self.digest, "size": self.size}
        if annotations:
            desc["annotations"] = annotations
        return desc
