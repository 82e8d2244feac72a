"""Typed events: one class per event kind, with its subject and its data's fields.

An event row (:class:`.event.Event`) stores its data as canonical JSON, and
the hash chain covers that text, so the classes are a view that must give
back exactly the JSON apt-layer has always written:

* ``to_data()`` writes every field under its JSON key; an optional field is
  left out when it is None (``reused``, ``patched``, ``reason``...) and
  ``gc.swept``'s ``spared`` when it is empty, as the emitters always did;
* ``from_data(subject, data)`` checks the fields (an ``EventDataError``,
  the projection's error, names the field) and keeps keys the kind does not
  define in ``extra``, so ``to_data`` of what it read is the data it read.
  It refuses what ``to_data`` never writes (a null optional field, an
  empty ``spared``): data it accepts reads back unchanged, byte for byte.

Kinds recorded for the audit only (``gc.begun``, ``recover.*``, ``drift.*``)
change no state; a ``recover.*`` or ``drift.*`` kind without a class here
is read as :class:`OtherInfo`, its data kept as it is. ``docs/journal.md``
lists every kind with its fields (tests/test_journal_kinds.py holds the two
together).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping
from dataclasses import InitVar, dataclass, field
from typing import Any, ClassVar, TypeVar

from .errors import ProjectionError

INFO_PREFIXES = ("recover.", "drift.")


class EventDataError(ProjectionError):
    """An event's data does not fit its kind: a field missing or of the wrong type.

    The projection refuses the event with this message, prefixed by the
    event's kind, subject and seq as every refusal is.
    """


# --- field types ------------------------------------------------------------------


@dataclass(frozen=True)
class _Type:
    """How a field's JSON value becomes its Python value and back.

    ``parse`` (JSON to Python) and ``check`` (a value given to the
    constructor, made immutable) raise ValueError for a value of another type.
    """

    what: str
    parse: Callable[[Any], Any]
    dump: Callable[[Any], Any] = lambda value: value
    #: for a type that also takes null: the type of its other values
    nullable_of: _Type | None = None
    check: Callable[[Any], Any] | None = None

    def checked(self, value: Any) -> Any:
        return (self.check or self.parse)(value)


def _is(kind: type, what: str) -> _Type:
    def parse(value: Any) -> Any:
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise ValueError(what)
        return value

    return _Type(what, parse)


STR = _is(str, "a string")
INT = _is(int, "an integer")
BOOL = _is(bool, "true or false")


def _strings(value: Any) -> tuple[str, ...]:
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise ValueError("a list of strings")
    return tuple(value)


STRS = _Type("a list of strings", _strings, list)


def nullable(t: _Type) -> _Type:
    return _Type(f"null or {t.what}", lambda v: None if v is None else t.parse(v),
                 lambda v: None if v is None else t.dump(v), t, lambda v: None if v is None else t.checked(v))


def _instance(cls: type) -> Callable[[Any], Any]:
    def check(value: Any) -> Any:
        if not isinstance(value, cls):
            raise ValueError(cls.__name__)
        return value

    return check


@dataclass(frozen=True)
class Slot:
    """A deployment: the image's name and digest (``{"image", "digest"}``)."""

    image: str
    digest: str

    def to_data(self) -> dict:
        return {"image": self.image, "digest": self.digest}


def _slot(value: Any) -> Slot:
    if not isinstance(value, dict) or len(value) != 2 or "image" not in value or "digest" not in value:
        raise ValueError("{image, digest}")
    return Slot(STR.parse(value["image"]), STR.parse(value["digest"]))


SLOT = _Type("{image, digest}", _slot, Slot.to_data, check=_instance(Slot))


@dataclass(frozen=True)
class Patched:
    """How an image was made by patching another: that image's name, how many entries changed."""

    from_: str
    changed: int

    def to_data(self) -> dict:
        return {"from": self.from_, "changed": self.changed}


def _patched(value: Any) -> Patched:
    if not isinstance(value, dict) or len(value) != 2 or "from" not in value or "changed" not in value:
        raise ValueError("{from, changed}")
    return Patched(STR.parse(value["from"]), INT.parse(value["changed"]))


PATCHED = _Type("{from, changed}", _patched, Patched.to_data, check=_instance(Patched))


def _object(value: Any) -> dict:
    if not isinstance(value, dict):
        raise ValueError("a JSON object")
    return value


#: a JSON object recorded as given (what the journal keeps without interpreting it)
OBJECT = _Type("a JSON object", _object)


@dataclass(frozen=True)
class _Spec:
    type: _Type
    key: str | None
    required: bool
    omit_empty: bool
    message: str | None


def _field(type_: _Type, *, key: str | None = None, optional: bool = False, omit_empty: bool = False,
           message: str | None = None) -> Any:
    """A data field: required unless ``optional`` (then None, or empty with ``omit_empty``, is left out).

    ``message`` replaces the default one when the field is missing or wrong
    (the projection's wording of old, kept for the same refusals).
    """
    spec = _Spec(type_, key, not (optional or omit_empty), omit_empty, message)
    if omit_empty:
        return field(default=(), metadata={"spec": spec})
    if optional:
        return field(default=None, metadata={"spec": spec})
    return field(metadata={"spec": spec})


# --- the base class -------------------------------------------------------------------


@functools.cache
def _fields(cls: type) -> tuple[tuple[str, str, _Spec], ...]:
    return tuple((f.name, f.metadata["spec"].key or f.name, f.metadata["spec"])
                 for f in dataclasses.fields(cls) if "spec" in f.metadata)


@functools.cache
def _keys(cls: type) -> tuple[str, ...]:
    return tuple(key for _, key, _ in _fields(cls))


E = TypeVar("E", bound="EventData")


@dataclass(frozen=True, kw_only=True)
class EventData:
    """The subject and data of an event of one kind (``KIND``); see the module docstring."""

    KIND: ClassVar[str] = ""
    subject: str
    #: data keys the kind does not define, kept as they were so the data reads back unchanged
    extra: Mapping[str, Any] = field(default_factory=dict)
    #: set by ``from_data`` only, whose values are checked already (a replay reads every event)
    _checked: InitVar[bool] = False

    @property
    def kind(self) -> str:
        return self.KIND

    @classmethod
    def fields(cls) -> tuple[tuple[str, str, _Spec], ...]:
        """(attribute, JSON key, spec) of every data field, in declaration order."""
        return _fields(cls)

    @classmethod
    def data_keys(cls) -> tuple[str, ...]:
        return _keys(cls)

    def __post_init__(self, _checked: bool) -> None:
        """Check the fields as ``from_data`` would, and store lists as tuples (the class is immutable)."""
        if _checked:
            return
        if not isinstance(self.subject, str):
            raise TypeError(f"{type(self).__name__}.subject must be a string")
        clash = self.extra.keys() & self.data_keys()
        if clash:
            raise TypeError(f"{type(self).__name__}.extra repeats fields: {', '.join(sorted(clash))}")
        for name, _, spec in self.fields():
            value = getattr(self, name)
            if value is None and not spec.required:
                continue
            try:
                object.__setattr__(self, name, spec.type.checked(value))
            except ValueError:
                raise TypeError(f"{type(self).__name__}.{name} must be {spec.type.what}") from None

    @classmethod
    def from_data(cls: type[E], subject: str, data: Mapping[str, Any]) -> E:
        """The event of this kind with ``subject`` and ``data``; EventDataError if the data does not fit."""
        if not isinstance(data, dict):
            raise EventDataError("data must be a JSON object")
        values: dict[str, Any] = {}
        for name, key, spec in cls.fields():
            if key not in data:
                if spec.required:
                    raise EventDataError(spec.message or f"data.{key} missing")
                continue
            try:
                values[name] = spec.type.parse(data[key])
            except ValueError:
                raise EventDataError(spec.message or f"data.{key} must be {spec.type.what}") from None
            if spec.omit_empty and not values[name]:
                raise EventDataError(f"data.{key} is left out when empty, never recorded as []")
        if not isinstance(subject, str):
            raise EventDataError("the subject must be a string")
        known = cls.data_keys()
        extra = {key: value for key, value in data.items() if key not in known}
        return cls(subject=subject, extra=extra, _checked=True, **values)

    def to_data(self) -> dict[str, Any]:
        """The data as recorded: canonical JSON of it is what the hash chain covers."""
        out = dict(self.extra)
        for name, key, spec in self.fields():
            value = getattr(self, name)
            if not spec.required and (value is None or (spec.omit_empty and not value)):
                continue
            out[key] = spec.type.dump(value)
        return out


# --- transactions ---------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class TxBegun(EventData):
    """Subject: the transaction id (the event's ``tx``)."""

    KIND: ClassVar[str] = "tx.begun"
    explicit: bool | None = _field(BOOL, optional=True)
    boot_id: str | None = _field(STR, optional=True)
    #: an implicit transaction's operation and image (create, delete, deploy, rollback)
    op: str | None = _field(STR, optional=True)
    name: str | None = _field(STR, optional=True)


@dataclass(frozen=True, kw_only=True)
class TxCommitted(EventData):
    KIND: ClassVar[str] = "tx.committed"
    ops: int | None = _field(INT, optional=True)


@dataclass(frozen=True, kw_only=True)
class TxAborted(EventData):
    KIND: ClassVar[str] = "tx.aborted"
    reason: str | None = _field(STR, optional=True)


# --- images -----------------------------------------------------------------------------

_DIGEST_MISSING = "data.digest missing"


@dataclass(frozen=True, kw_only=True)
class _ImageBuilt(EventData):
    """An image built into staging; subject: the image name."""

    digest: str = _field(STR, message=_DIGEST_MISSING)
    size: int | None = _field(INT, optional=True)
    #: the manifest's hash, set by the journal when the event records the manifest
    manifest: str | None = _field(STR, optional=True)
    #: where the image file waits, relative to the store's root
    staged: str | None = _field(STR, optional=True)
    source: str | None = _field(STR, optional=True)
    objects: int | None = _field(INT, optional=True)
    #: the live image an unchanged tree reused
    reused: str | None = _field(STR, optional=True)
    patched: Patched | None = _field(PATCHED, optional=True)
    #: a layered build: {"base": the base image's digest, "changed": entries of the upper directory,
    #: "relocated": whether the base's inodes were moved rather than the merged tree rendered}
    layered: dict | None = _field(OBJECT, optional=True)
    #: a base image's making: {"bootstrap": {suite, variant, ...}} or {"import": {file, format}}
    origin: dict | None = _field(OBJECT, optional=True)
    #: a layered image's making: {"base": {image, digest}, "request": {install, remove}, "inactive", "debs"}
    lineage: dict | None = _field(OBJECT, optional=True)


@dataclass(frozen=True, kw_only=True)
class ImageStaged(_ImageBuilt):
    KIND: ClassVar[str] = "image.staged"


@dataclass(frozen=True, kw_only=True)
class ImageCreated(_ImageBuilt):
    KIND: ClassVar[str] = "image.created"


@dataclass(frozen=True, kw_only=True)
class ImagePulled(EventData):
    """An image made from an OCI image, recorded with its ``image.created``; subject: the image name."""

    KIND: ClassVar[str] = "image.pulled"
    #: the reference pulled (``oci:DIR:TAG``, ``docker://HOST/REPO:TAG``)
    source: str = _field(STR)
    #: the OCI manifest's digest (``sha256:...``); the image's own is in its ``image.created``
    manifest_digest: str = _field(STR)
    layers: int | None = _field(INT, optional=True)
    #: layers read (not known from an earlier pull) and their bytes
    layers_read: int | None = _field(INT, optional=True)
    bytes_read: int | None = _field(INT, optional=True)


@dataclass(frozen=True, kw_only=True)
class DeleteStaged(EventData):
    KIND: ClassVar[str] = "delete.staged"
    digest: str = _field(STR, message=_DIGEST_MISSING)


@dataclass(frozen=True, kw_only=True)
class DeployStaged(EventData):
    KIND: ClassVar[str] = "deploy.staged"
    digest: str = _field(STR, message=_DIGEST_MISSING)


@dataclass(frozen=True, kw_only=True)
class DeployUnstaged(EventData):
    """Subject: the image whose staged deploy is withdrawn (``apt-layer cleanup -p``); the
    transaction stays open with the rest of its work."""

    KIND: ClassVar[str] = "deploy.unstaged"
    digest: str = _field(STR, message=_DIGEST_MISSING)


@dataclass(frozen=True, kw_only=True)
class ImageDeleted(EventData):
    KIND: ClassVar[str] = "image.deleted"
    #: the live image's digest (the projection checks it when given)
    digest: str | None = _field(STR, optional=True)


# --- deployments ------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class Deployed(EventData):
    """Subject: the image deployed (``current.image``)."""

    KIND: ClassVar[str] = "deployed"
    current: Slot = _field(SLOT, message="data.current must be {image: subject, digest}")
    previous: Slot | None = _field(nullable(SLOT), message="data.previous must be null or {image, digest}")


_SWAP = "data must swap the current and previous deployments"


@dataclass(frozen=True, kw_only=True)
class RolledBack(EventData):
    """Subject: the image rolled back to."""

    KIND: ClassVar[str] = "rolled-back"
    current: Slot | None = _field(nullable(SLOT), message=_SWAP)
    previous: Slot | None = _field(nullable(SLOT), message=_SWAP)


@dataclass(frozen=True, kw_only=True)
class Undeployed(EventData):
    """Subject: the image dropped from the previous slot (``apt-layer cleanup -r``, or a
    transaction deleting the image it replaced); the current deployment stays."""

    KIND: ClassVar[str] = "undeployed"
    slot: str = _field(STR, message="data.slot must be 'previous'")
    digest: str = _field(STR, message=_DIGEST_MISSING)


# --- mounts -------------------------------------------------------------------------------

_MOUNT_REQUIRED = "data.mountpoint and data.digest are required"


@dataclass(frozen=True, kw_only=True)
class Mounted(EventData):
    """Subject: the image mounted."""

    KIND: ClassVar[str] = "mounted"
    mountpoint: str = _field(STR, message=_MOUNT_REQUIRED)
    digest: str = _field(STR, message=_MOUNT_REQUIRED)
    boot_id: str | None = _field(STR, optional=True)
    writable: bool | None = _field(BOOL, optional=True)
    backend: str | None = _field(STR, optional=True)


@dataclass(frozen=True, kw_only=True)
class Unmounted(EventData):
    KIND: ClassVar[str] = "unmounted"
    mountpoint: str = _field(STR)
    #: why a mount recorded write-ahead was undone (the kernel refused it)
    reason: str | None = _field(STR, optional=True)


@dataclass(frozen=True, kw_only=True)
class MountLost(EventData):
    KIND: ClassVar[str] = "mount.lost"
    mountpoint: str = _field(STR)
    reason: str | None = _field(STR, optional=True)


# --- gc -------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class GcBegun(EventData):
    KIND: ClassVar[str] = "gc.begun"
    subject: str = "store"
    full: bool | None = _field(BOOL, optional=True)
    marked: int | None = _field(INT, optional=True)
    candidates: int | None = _field(INT, optional=True)
    candidate_bytes: int | None = _field(INT, optional=True)


@dataclass(frozen=True, kw_only=True)
class GcSwept(EventData):
    KIND: ClassVar[str] = "gc.swept"
    subject: str = "store"
    removed: int | None = _field(INT, optional=True)
    bytes: int | None = _field(INT, optional=True)
    temp_files: int | None = _field(INT, optional=True)
    #: garbage the grace period spared: its refcount-0 rows stay (written only when there is some)
    spared: tuple[str, ...] = _field(STRS, omit_empty=True, message="spared must be a list of object names")


# --- boot -----------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class Booted(EventData):
    """Subject: the image the machine booted (as the initramfs chose it, docs/boot.md).

    ``deploy`` is what the kernel command line asked for (``current``,
    ``previous`` or an image name); ``fallback_from`` the current deployment
    that did not complete a boot in ``tries`` attempts, when the previous one
    was booted instead.
    """

    KIND: ClassVar[str] = "booted"
    digest: str = _field(STR)
    deploy: str = _field(STR)
    kernel: str = _field(STR)
    boot_id: str = _field(STR)
    fallback_from: str | None = _field(STR, optional=True)
    tries: int | None = _field(INT, optional=True)


# --- recovery's actions ---------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class RecoverEventsLost(EventData):
    """Events verified before are gone from the journal (a power loss took its tail)."""

    KIND: ClassVar[str] = "recover.events-lost"
    subject: str = "journal"
    verified_up_to: int = _field(INT)
    journal_ended_at: int = _field(INT)


@dataclass(frozen=True, kw_only=True)
class RecoverImagePlaced(EventData):
    """A committed image's staged file renamed into ``images/``; subject: the image name."""

    KIND: ClassVar[str] = "recover.image-placed"
    digest: str = _field(STR)
    from_: str = _field(STR, key="from")


@dataclass(frozen=True, kw_only=True)
class RecoverImageUnlinked(EventData):
    """A deleted image's file unlinked; subject: the image name."""

    KIND: ClassVar[str] = "recover.image-unlinked"


@dataclass(frozen=True, kw_only=True)
class RecoverStagingRemoved(EventData):
    """Staging no open transaction owns removed; subject: its path below ``staging/``."""

    KIND: ClassVar[str] = "recover.staging-removed"


@dataclass(frozen=True, kw_only=True)
class RecoverStagingUnmounted(EventData):
    """Subject: a mount point under ``staging/`` a killed operation left mounted, detached."""

    KIND: ClassVar[str] = "recover.staging-unmounted"


@dataclass(frozen=True, kw_only=True)
class RecoverDeployTempRemoved(EventData):
    KIND: ClassVar[str] = "recover.deploy-temp-removed"
    subject: str = "deploy"
    links: tuple[str, ...] = _field(STRS)


@dataclass(frozen=True, kw_only=True)
class RecoverDeploySynced(EventData):
    KIND: ClassVar[str] = "recover.deploy-synced"
    subject: str = "deploy"
    slots: tuple[str, ...] = _field(STRS)


# --- watch's reports ------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class _ObjectDrift(EventData):
    """Subject: the object (``xx/yyyy...``); ``path`` is relative to the store's root."""

    path: str = _field(STR)
    object: str = _field(STR)
    #: the live images whose manifest lists it, and the roots that hold it
    images: tuple[str, ...] = _field(STRS)
    held_by: tuple[str, ...] = _field(STRS)


@dataclass(frozen=True, kw_only=True)
class DriftObjectDeleted(_ObjectDrift):
    KIND: ClassVar[str] = "drift.object-deleted"


@dataclass(frozen=True, kw_only=True)
class DriftObjectModified(_ObjectDrift):
    KIND: ClassVar[str] = "drift.object-modified"
    #: where the content now belongs in the digest store (null: unreadable)
    found_object: str | None = _field(nullable(STR))


@dataclass(frozen=True, kw_only=True)
class DriftImageDeleted(EventData):
    """Subject: the image name."""

    KIND: ClassVar[str] = "drift.image-deleted"
    path: str = _field(STR)
    image: str = _field(STR)
    digest: str = _field(STR)
    #: the deployment slots that name the image
    deployed: tuple[str, ...] = _field(STRS)


@dataclass(frozen=True, kw_only=True)
class DriftImageModified(EventData):
    KIND: ClassVar[str] = "drift.image-modified"
    path: str = _field(STR)
    image: str = _field(STR)
    digest: str = _field(STR)
    found_digest: str | None = _field(nullable(STR))
    size: int = _field(INT)
    found_size: int = _field(INT)


@dataclass(frozen=True, kw_only=True)
class DriftImageUnknown(EventData):
    """An image file of no live image; subject: the name it carries."""

    KIND: ClassVar[str] = "drift.image-unknown"
    path: str = _field(STR)
    image: str = _field(STR)
    size: int = _field(INT)


@dataclass(frozen=True, kw_only=True)
class DriftDeployChanged(EventData):
    """Subject: the slot; ``target`` the link's text found, ``expected`` the journal's (null: none)."""

    KIND: ClassVar[str] = "drift.deploy-changed"
    path: str = _field(STR)
    slot: str = _field(STR)
    target: str | None = _field(nullable(STR))
    expected: str | None = _field(nullable(STR))
    image: str | None = _field(nullable(STR))


@dataclass(frozen=True, kw_only=True)
class OtherInfo(EventData):
    """A ``recover.*`` or ``drift.*`` kind this version does not define: its data as recorded."""

    name: str
    data: Mapping[str, Any] = field(default_factory=dict)

    @property
    def kind(self) -> str:
        return self.name

    def to_data(self) -> dict[str, Any]:
        return dict(self.data)


KINDS: dict[str, type[EventData]] = {cls.KIND: cls for cls in (
    TxBegun, TxCommitted, TxAborted, ImageStaged, DeleteStaged, DeployStaged, DeployUnstaged, ImageCreated,
    ImageDeleted, ImagePulled, Deployed, RolledBack, Undeployed, Mounted, Unmounted, MountLost, GcBegun, GcSwept, Booted,
    RecoverEventsLost, RecoverImagePlaced, RecoverImageUnlinked, RecoverStagingRemoved, RecoverStagingUnmounted,
    RecoverDeployTempRemoved, RecoverDeploySynced,
    DriftObjectDeleted, DriftObjectModified, DriftImageDeleted, DriftImageModified, DriftImageUnknown,
    DriftDeployChanged,
)}


def is_other_info(kind: str) -> bool:
    """A ``recover.*``/``drift.*`` kind without a class (recorded as it is, for the audit)."""
    return kind not in KINDS and kind.startswith(INFO_PREFIXES) and kind not in INFO_PREFIXES


def parse(kind: str, subject: str, data: Mapping[str, Any]) -> EventData:
    """The typed event for a row's kind, subject and data.

    ProjectionError for an unknown kind, EventDataError for data that does not fit it.
    """
    cls = KINDS.get(kind)
    if cls is not None:
        return cls.from_data(subject, data)
    if is_other_info(kind):
        if not isinstance(data, dict):
            raise EventDataError("data must be a JSON object")
        return OtherInfo(subject=subject, name=kind, data=dict(data))
    raise ProjectionError(f"unknown event kind {kind!r}", kind=kind)
