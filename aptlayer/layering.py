"""Package layering: a base image plus a request becomes a new image (and the next deployment).

An image made here has a **lineage**, recorded in its ``image.created``
event: the base image (name and digest) and the **request** (packages to
add, base packages to remove), plus the requested packages the base
already had (inactive: they come back if a later base drops them) and the
resolved package set, each package with the SHA-256 of the ``.deb`` it was
installed from (null for the base's packages: their files are not at hand). ``install``, ``uninstall``,
``override``, ``upgrade`` and ``rebase`` all compute a new request and
build base + request; an empty request is the base itself (same digest).

One build, inside one implicit transaction under the store's shared lock:

1. the base is mounted writable, its upper directory in the transaction's
   staging folder (``mounts.mount``: recorded, so gc spares its objects);
2. apt resolves and downloads on the host, dpkg installs inside the
   sandbox (:mod:`aptlayer.packages.apt`), never touching the host's root;
3. the mount goes, and the builder makes the new image from the base and
   the upper directory, reading only what changed
   (:class:`aptlayer.builder.LayeredSource`);
4. the image is staged, its deployment staged with it, and the
   transaction committed: image and deployment appear together, or, on
   any failure (or a kill, then at recovery), neither does.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from . import errors, mounts
from .builder import CreateOptions
from .fault import fault
from .store import Store

#: where local .deb files of requests are kept (by SHA-256), so upgrade and rebase can replay them
LOCAL_DEBS = "debs"


@dataclass(frozen=True)
class Request:
    """What was asked on top of a base: package specs to install, base packages to remove.

    A local ``.deb`` is kept as ``deb:SHA256`` (the file is in the store's
    ``cache/debs/``). Order is kept; duplicates are dropped.
    """

    install: tuple[str, ...] = ()
    remove: tuple[str, ...] = ()

    @property
    def empty(self) -> bool:
        return not self.install and not self.remove

    def to_data(self) -> dict:
        return {"install": list(self.install), "remove": list(self.remove)}

    @classmethod
    def from_data(cls, data: dict | None) -> Request:
        data = data or {}
        return cls(tuple(data.get("install", ())), tuple(data.get("remove", ())))

    def adding(self, specs) -> Request:
        return Request(_unique((*self.install, *specs)), self.remove)

    def dropping(self, names) -> Request:
        drop = set(names)
        return Request(tuple(s for s in self.install if package_name(s) not in drop), self.remove)

    def removing(self, names) -> Request:
        return Request(self.install, _unique((*self.remove, *names)))

    def restoring(self, names: list[str] | None) -> Request:
        """Without the removals of ``names`` (all of them if None)."""
        if names is None:
            return Request(self.install, ())
        keep = set(names)
        return Request(self.install, tuple(n for n in self.remove if n not in keep))


def _unique(items) -> tuple[str, ...]:
    return tuple(dict.fromkeys(items))


def package_name(spec: str) -> str:
    """The package a spec names: ``htop=3.2`` and ``htop:amd64`` are ``htop``; ``deb:SHA`` stays."""
    if spec.startswith("deb:"):
        return spec
    return spec.split("=", 1)[0].split("/", 1)[0].split(":", 1)[0]


@dataclass
class Lineage:
    """How an image was made from its base."""

    base: str
    base_digest: str
    request: Request
    inactive: list[str] = field(default_factory=list)
    #: every package of the image (``NAME:ARCH``) -> SHA-256 of its .deb, None for the base's (no .deb at hand)
    debs: dict[str, str | None] = field(default_factory=dict)

    def to_data(self) -> dict:
        return {"base": {"image": self.base, "digest": self.base_digest}, "request": self.request.to_data(),
                "inactive": self.inactive, "debs": self.debs}

    @classmethod
    def from_data(cls, data: dict) -> Lineage:
        return cls(data["base"]["image"], data["base"]["digest"], Request.from_data(data.get("request")),
                   list(data.get("inactive", ())), dict(data.get("debs", {})))

    def summary(self) -> dict:
        """What ``status`` shows: base image, layered packages, removed base packages, inactive requests."""
        return {"base": self.base, "base_digest": self.base_digest,
                "layered": [s for s in self.request.install if s not in self.inactive],
                "removed": list(self.request.remove), "inactive": self.inactive}


def lineage_of(store: Store, name: str) -> Lineage | None:
    """The lineage recorded for live image ``name`` (None for a base image)."""
    image = store.journal.image(name)
    if image is None:
        raise errors.NotFound(f"no image named {name!r}")
    created = store.journal.event(image.created_seq)
    data = created.typed().lineage if created is not None else None
    return Lineage.from_data(data) if data else None


def current_image(store: Store, from_image: str | None) -> str:
    """The image a command starts from: ``--from``, else the current deployment."""
    if from_image is not None:
        return from_image
    current = store.journal.deployments().get("current")
    if current is None:
        raise errors.NotFound("nothing is deployed: name the image to start from with --from IMAGE")
    return current.image


def base_and_request(store: Store, start: str) -> tuple[str, Request]:
    """The base image and the request that made ``start`` (a base has an empty request)."""
    lineage = lineage_of(store, start)
    if lineage is None:
        return start, Request()
    if store.journal.image(lineage.base) is None:
        raise errors.NotFound(f"image {start!r} was layered on {lineage.base!r}, which no longer exists; "
                              "use `apt-layer rebase NEWBASE`")
    return lineage.base, lineage.request


def _is_local_deb(spec: str) -> bool:
    """A spec that names a .deb file (as apt does: a path with a slash, or an existing file)."""
    return spec.endswith(".deb") and ("/" in spec or os.path.exists(spec))


def keep_local_debs(store: Store, specs: list[str]) -> list[str]:
    """Local ``.deb`` files among ``specs`` copied into the store (``deb:SHA256``); names pass through."""
    from .packages import apt

    out = []
    for spec in specs:
        if not _is_local_deb(spec):
            out.append(spec)
            continue
        path = Path(spec)
        if not path.is_file():
            raise errors.NotFound(f"{spec}: no such .deb file")
        apt.inspect_deb(path)  # refuses hostile members before anything is copied
        with open(path, "rb") as f:
            digest = hashlib.file_digest(f, "sha256").hexdigest()
        folder = store.layout.cache_file(LOCAL_DEBS)
        folder.mkdir(parents=True, exist_ok=True)
        kept = folder / f"{digest}.deb"
        if not kept.exists():
            tmp = folder / f".{digest}.tmp-{os.getpid()}"
            shutil.copyfile(path, tmp)
            os.replace(tmp, kept)
        out.append(f"deb:{digest}")
    return out


def _apt_specs(store: Store, specs) -> tuple[list[str], list[Path]]:
    """Request specs as apt takes them: package names, and the kept files of ``deb:SHA`` specs."""
    names, debs = [], []
    for spec in specs:
        if not spec.startswith("deb:"):
            names.append(spec)
            continue
        kept = store.layout.cache_file(LOCAL_DEBS) / f"{spec[4:]}.deb"
        if not kept.is_file():
            raise errors.NotFound(f"the local package {spec} of this request is gone from {kept.parent}")
        debs.append(kept)
    return names, debs


def _free_name(store: Store, base: str) -> str:
    """``BASE+N`` for the first N not taken by a live image."""
    n = 1
    while store.journal.image(f"{base}+{n}") is not None or store.journal.staging_tx_of(f"{base}+{n}"):
        n += 1
    return f"{base}+{n}"


class Discarded(Exception):
    """A build's ``decide`` chose not to keep it; ``result`` says why."""

    def __init__(self, result: dict):
        super().__init__("discarded")
        self.result = result


def build(store: Store, base: str, request: Request, *, name: str | None = None, deploy: bool = True,
          sources=None, decide=None, progress=None, refresh: bool | None = None) -> dict:
    """Build ``base`` + ``request`` into a new image and stage its deployment, atomically.

    An empty request deploys the base itself. ``decide(packages)``, given
    the package set apt and dpkg left (``NAME:ARCH`` -> version), may raise
    :class:`Discarded` to drop the build before an image is made. Returns
    what changed, package by package. ``sources`` are the apt sources
    (:class:`aptlayer.packages.sources.Source`), by default those of the
    configuration's ``[apt] dir`` (the host's ``/etc/apt``);
    ``refresh`` says whether apt's package lists are fetched first (None:
    when stale, see :func:`aptlayer.packages.apt.install`).
    """
    from .composefs import upper as upper_root
    from .composefs.reader import read_root
    from .packages import apt
    from .packages.sources import read_sources

    base_image = store.journal.image(base)
    if base_image is None:
        raise errors.NotFound(f"no image named {base!r}")
    if request.empty:
        return _deploy_existing(store, base, deploy)
    apt_dir, max_age = _apt_settings(store)
    sources = read_sources(apt_dir) if sources is None else sources
    with store.writing():
        name = name or _free_name(store, base)
        tx = store.tx_begin(op="layer", name=name)
        staging = store.staging_path(tx)
        root, upper, work = staging / "root", staging / "upper", staging / "work"
        try:
            for d in (root, upper, work):
                d.mkdir(parents=True, exist_ok=True)
            # the mount shows the upper directory's own metadata as its root's
            upper_root.prepare_upper(upper, read_root(str(store.image_file(base))))
            # no missing-objects warning: nobody reads it here, and it stats every object of the base
            # The base is a store image whose object paths the Store checked when it recorded it:
            # reading every redirect again would cost a second per 30,000 files of the base.
            mounts.mount(store, base, str(root), upperdir=str(upper), workdir=str(work), check_objects=False,
                         check_redirects=False)
            try:
                fault("layer.after-mount")
                before = {p.key: p for p in apt.installed_packages(root)}
                have = {p.name for p in before.values()}
                removed = apt.remove(root, list(request.remove), workdir=staging) if request.remove else None
                wanted = [s for s in request.install if s.startswith("deb:") or package_name(s) not in have
                          or "=" in s]
                inactive = [s for s in request.install if s not in wanted]
                names, debs = _apt_specs(store, wanted)
                installed = apt.install(root, names, debs=debs, sources=sources, cache=store.layout.cache_file("apt"),
                                        refresh=refresh, workdir=staging, trusted_parts=apt_dir / "trusted.gpg.d",
                                        lists_max_age=max_age) if wanted else None
                last = installed or removed
                after = {p.key: p for p in (last.packages if last else before.values())}
                fault("layer.after-apt")
            finally:
                _unmount(store, root)
            if decide is not None:
                decide({k: p.version for k, p in after.items()}, _changes(before, after))
            lineage = Lineage(base, base_image.digest, request, inactive,
                              resolved_debs(after.values(), installed.installed if installed else {}))
            source = _layered_source(store, base, upper)
            created = store.create(source, name, CreateOptions(backend="python"), tx=tx, progress=progress,
                                   about={"lineage": lineage.to_data()})
            if deploy:
                store.deploy(name, tx=tx)
            store.tx_commit(tx)
        except BaseException as e:
            _unmount(store, root)  # interrupted right after mounting: staging must not be removed across it
            if store.journal.transaction_state(tx) == "open":
                why = "nothing to change" if isinstance(e, Discarded) else f"{type(e).__name__}: {e}"
                store.tx_rollback(tx, reason=why[:500])
            if isinstance(e, Discarded):
                return e.result
            raise
    changes = _changes(before, after)
    return {"image": name, "digest": created["digest"], "base": base, "request": request.to_data(),
            "inactive": inactive, "deployed": deploy, "changes": changes,
            "removed_by_request": [p.key for p in removed.removed] if removed else []}


def _apt_settings(store: Store) -> tuple[Path, int]:
    """The apt configuration directory and the lists' maximum age: the store's configuration, else the defaults."""
    from .config import DEFAULT_APT_DIR, DEFAULT_LISTS_MAX_AGE

    config = store.config
    if config is None:
        return DEFAULT_APT_DIR, DEFAULT_LISTS_MAX_AGE
    return config.apt_dir, config.apt_lists_max_age


def resolved_debs(packages, hashes: dict) -> dict[str, str | None]:
    """Every package of the resolved set (``NAME:ARCH``) -> the SHA-256 of the .deb it was installed from.

    Known for what this build installed (apt's download cache, or the local
    file); None for the base's packages, whose .deb files are not at hand.
    """
    return {p.key: hashes.get(p) for p in sorted(packages, key=lambda p: p.key)}


def _unmount(store: Store, root: Path) -> None:
    """Unmount the writable base at ``root`` if it is mounted (idempotent)."""
    from .linux.mountinfo import is_mounted

    if is_mounted(root):
        mounts.unmount(store, str(root))


def _layered_source(store: Store, base: str, upper: Path):
    from .builder import LayeredSource

    return LayeredSource(str(store.image_path(base)), str(upper))


def _deploy_existing(store: Store, image: str, deploy: bool) -> dict:
    """An empty request: the base itself is the result (same digest)."""
    digest = store.journal.image(image).digest
    current = store.journal.deployments().get("current")
    if deploy and not (current is not None and current.image == image):
        store.deploy(image)
    return {"image": image, "digest": digest, "base": image, "request": Request().to_data(), "inactive": [],
            "deployed": deploy, "changes": [], "removed_by_request": []}


def _changes(before: dict, after: dict) -> list[dict]:
    """Package by package, what a build changed (added, removed, upgraded or downgraded)."""
    return _changes_between({k: p.version for k, p in before.items()}, {k: p.version for k, p in after.items()})


# --- the commands ---------------------------------------------------------------------------


def install(store: Store, specs: list[str], *, from_image: str | None = None, deploy: bool = True,
            name: str | None = None, sources=None, progress=None) -> dict:
    """Add packages (names, ``name=version``, local ``.deb`` files) to the request of the start image."""
    from .packages import apt

    if not specs:
        raise errors.InvalidInput("name at least one package to install")
    start = current_image(store, from_image)
    base, request = base_and_request(store, start)
    kept = keep_local_debs(store, specs)
    apt.check_package_specs([s for s in kept if not s.startswith("deb:")])
    return build(store, base, request.adding(kept), name=name, deploy=deploy, sources=sources, progress=progress)


def uninstall(store: Store, names: list[str], *, from_image: str | None = None, deploy: bool = True,
              name: str | None = None, sources=None, progress=None) -> dict:
    """Remove layered packages from the request; a base package is refused (see ``override remove``)."""
    start = current_image(store, from_image)
    base, request = base_and_request(store, start)
    layered = {package_name(s) for s in request.install}
    for n in names:
        if n not in layered:
            listed = f" (layered: {', '.join(sorted(layered))})" if layered else ""
            raise errors.InvalidInput(f"package {n!r} is not layered on {base!r}{listed}; to remove a package of "
                                      f"the base image, use `apt-layer override remove {n}`")
    return build(store, base, request.dropping(names), name=name, deploy=deploy, sources=sources, progress=progress)


def override_remove(store: Store, names: list[str], *, from_image: str | None = None, deploy: bool = True,
                    name: str | None = None, sources=None, progress=None) -> dict:
    start = current_image(store, from_image)
    base, request = base_and_request(store, start)
    return build(store, base, request.removing(names), name=name, deploy=deploy, sources=sources, progress=progress)


def override_reset(store: Store, names: list[str] | None, *, from_image: str | None = None, deploy: bool = True,
                   name: str | None = None, sources=None, progress=None) -> dict:
    start = current_image(store, from_image)
    base, request = base_and_request(store, start)
    return build(store, base, request.restoring(names or None), name=name, deploy=deploy, sources=sources,
                 progress=progress)


def upgrade(store: Store, *, check: bool = False, from_image: str | None = None, deploy: bool = True,
            name: str | None = None, sources=None, progress=None) -> dict:
    """Re-resolve the start image's request against the current sources, on the same base.

    A new image is made only if some package's version changed; ``check``
    only says what would change. The result's ``changed`` tells which.
    """
    start = current_image(store, from_image)
    base, request = base_and_request(store, start)
    if request.empty:
        return {"image": start, "changed": False, "changes": [], "reason": f"{start!r} has no layered packages"}
    now = _versions_of(store, start)

    def decide(packages: dict[str, str], changes: list[dict]) -> None:
        differs = _changes_between(now, packages)
        if not differs or check:
            raise Discarded({"image": start, "changed": bool(differs), "changes": differs, "checked": check})

    result = build(store, base, request, name=name, deploy=deploy, sources=sources, decide=decide, progress=progress,
                   refresh=True)
    result.setdefault("changed", True)
    if "digest" in result and result.get("image") != start:
        result["changes"] = _changes_between(now, _versions_of(store, result["image"]))
    return result


def _versions_of(store: Store, image: str) -> dict[str, str]:
    from .packages.dpkgdb import read_database
    from .packages.rootfs import ImageRoot

    return {p.key: p.version for p in read_database(ImageRoot(store.image_file(image), store.layout.objects)).installed}


def _changes_between(old: dict[str, str], new: dict[str, str]) -> list[dict]:
    """What changed from one package set (``NAME:ARCH`` -> version) to another."""
    from debian.debian_support import version_compare

    out = []
    for key in sorted(old.keys() | new.keys()):
        name, _, arch = key.partition(":")
        a, b = old.get(key), new.get(key)
        if a is None:
            out.append({"change": "added", "package": name, "version": b, "arch": arch})
        elif b is None:
            out.append({"change": "removed", "package": name, "version": a, "arch": arch})
        elif a != b:
            kind = "upgraded" if version_compare(b, a) > 0 else "downgraded"
            out.append({"change": kind, "package": name, "version": b, "arch": arch, "from": a})
    return out


def rebase(store: Store, new_base: str, *, from_image: str | None = None, deploy: bool = True,
           name: str | None = None, sources=None, progress=None) -> dict:
    """Apply the start image's request to another base image."""
    if store.journal.image(new_base) is None:
        raise errors.NotFound(f"no image named {new_base!r}")
    start = current_image(store, from_image)
    lineage = lineage_of(store, start)
    request = lineage.request if lineage else Request()
    return build(store, new_base, request, name=name, deploy=deploy, sources=sources, progress=progress)


def packages(store: Store, image: str | None = None) -> dict:
    """The image's packages, each marked base, layered, replaced or removed (read from the images, no mount)."""
    from .packages.diff import mark_packages
    from .packages.dpkgdb import read_database
    from .packages.rootfs import ImageRoot

    name = current_image(store, image)
    db = read_database(ImageRoot(store.image_file(name), store.layout.objects))
    lineage = lineage_of(store, name)
    base = None
    if lineage is not None and store.journal.image(lineage.base) is not None:
        base = read_database(ImageRoot(store.image_file(lineage.base), store.layout.objects)).installed
    return {"image": name, "base": lineage.base if lineage else name,
            "packages": [m.to_json() for m in mark_packages(db.installed, base)],
            "inactive": lineage.inactive if lineage else []}


def diff(store: Store, a: str, b: str, files: bool = False) -> dict:
    """Packages added, removed, upgraded and downgraded from image ``a`` to ``b`` (like ``rpm-ostree db diff``)."""
    from .packages.diff import diff_package_paths, diff_packages
    from .packages.dpkgdb import read_database, read_file_lists
    from .packages.rootfs import ImageRoot

    roots = [ImageRoot(store.image_file(n), store.layout.objects) for n in (a, b)]
    dbs = [read_database(r) for r in roots]
    changes = diff_packages(dbs[0].installed, dbs[1].installed)
    result = {"from": a, "to": b, **changes.to_json()}
    if files:
        lists = [read_file_lists(r, db.installed) for r, db in zip(roots, dbs)]
        result["files"] = [p.to_json() for p in diff_package_paths(changes, lists[0], lists[1])]
    return result
