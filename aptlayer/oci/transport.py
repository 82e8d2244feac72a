"""Where images go and come from: ``oci:DIR[:TAG]`` natively, ``docker://...`` through skopeo.

apt-layer reads and writes OCI image layouts itself and leaves registries
to skopeo (``skopeo copy`` between the registry and a layout on disk):
skopeo speaks the distribution protocol with its token and basic
authentication, credential helpers and ``auth.json``, TLS settings,
mirrors from ``registries.conf``, retries and chunked uploads, and checks
every blob's digest as it fetches it. docs/oci.md says more.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass

from .. import errors

DOCKER = "docker://"
OCI = "oci:"
DEFAULT_TAG = "latest"
#: the message of one of skopeo's log lines (``time="..." level=fatal msg="..."``)
_MSG_RE = re.compile(r'msg="((?:[^"\\]|\\.)*)"')


@dataclass(frozen=True)
class Reference:
    """A parsed image reference: an OCI layout (``path``, ``tag``) or a registry (``remote``)."""

    text: str
    path: str | None = None
    tag: str | None = None
    remote: str | None = None

    @property
    def is_remote(self) -> bool:
        return self.remote is not None


def parse(text: str) -> Reference:
    """``oci:DIR[:TAG]`` or ``docker://HOST[:PORT]/REPO[:TAG|@DIGEST]``; InvalidInput for anything else.

    As skopeo does, the first ``:`` after ``oci:DIR`` starts the tag.
    """
    if text.startswith(DOCKER):
        rest = text[len(DOCKER):]
        if not rest or rest.startswith("/") or any(c.isspace() for c in rest):
            raise errors.InvalidInput(f"{text!r}: not a registry reference (docker://HOST[:PORT]/REPO:TAG)")
        return Reference(text, remote=text)
    if text.startswith(OCI):
        path, _, tag = text[len(OCI):].partition(":")
        if not path:
            raise errors.InvalidInput(f"{text!r}: oci: needs a directory (oci:DIR[:TAG])")
        return Reference(text, path=path, tag=tag or None)
    raise errors.InvalidInput(f"{text!r}: an image reference is oci:DIR[:TAG] or docker://HOST[:PORT]/REPO:TAG")


def skopeo() -> str:
    tool = shutil.which("skopeo")
    if tool is None:
        raise errors.Unsupported("registries are reached through skopeo, which is not installed "
                                 "(apt-get install skopeo)")
    return tool


def copy(source: str, dest: str, *, what: str, tls_verify: bool, dest_blobs: str | None = None) -> None:
    """``skopeo copy SOURCE DEST``; a failure is TransferFailed: ``what`` failed, and skopeo's last word.

    ``dest_blobs`` keeps the blobs of an ``oci:`` destination in a shared
    folder: blobs already there are not fetched again.
    """
    argv = [skopeo(), "copy", "--quiet", "--retry-times", "3"]
    if not tls_verify:
        argv += ["--src-tls-verify=false"] if source.startswith(DOCKER) else []
        argv += ["--dest-tls-verify=false"] if dest.startswith(DOCKER) else []
    if dest_blobs is not None:
        argv += ["--dest-shared-blob-dir", dest_blobs]
    proc = subprocess.run([*argv, source, dest], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        lines = [line.strip() for line in proc.stderr.splitlines() if line.strip()]
        why = lines[-1] if lines else f"skopeo exited with {proc.returncode}"
        found = _MSG_RE.search(why)
        raise errors.TransferFailed(f"{what}: {found.group(1).replace(chr(92) + chr(34), chr(34)) if found else why}")
