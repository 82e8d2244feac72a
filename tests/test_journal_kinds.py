"""Typed events (aptlayer.journal.kinds): they read every recorded event and give back its data byte for byte.

The hash chain covers the canonical JSON of each event's data, so a class
that wrote a key more or less, or a null where there was nothing, would fork
the chain of every store written before. Checked on the compatibility
fixture (an event of every kind, written by apt-layer 0.1) and on random
instances and random data.
"""

from __future__ import annotations

import dataclasses

import json
import re
import sqlite3
import tarfile
from contextlib import closing
from pathlib import Path

import hypothesis.strategies as st
import pytest
from hypothesis import given, settings

from aptlayer.journal import EventDataError, Journal, ProjectionError, canonical
from aptlayer.journal import kinds as k
from aptlayer.journal.event import COLUMNS, Event

REPO = Path(__file__).resolve().parent.parent
FIXTURE = REPO / "tests" / "data" / "store-v0.1.tar.gz"
DOC = REPO / "docs" / "journal.md"


@pytest.fixture(scope="module")
def recorded(tmp_path_factory) -> list[tuple[Event, str]]:
    """Every event of the fixture's journal, with the data text as stored."""
    tmp = tmp_path_factory.mktemp("compat")
    with tarfile.open(FIXTURE) as tar:
        tar.extractall(tmp, filter="tar")
    with closing(sqlite3.connect(tmp / "store" / "journal.db")) as db:
        return [(Event.from_row(row), row[5]) for row in db.execute(f"SELECT {COLUMNS} FROM events ORDER BY seq")]


def test_every_recorded_event_reads_as_its_class_and_writes_back_its_data(recorded) -> None:
    for ev, text in recorded:
        typed = ev.typed()
        assert type(typed) is k.KINDS[ev.kind] and typed.kind == ev.kind, ev.seq
        assert (typed.subject, typed.extra) == (ev.subject, {}), ev.seq
        assert canonical(typed.to_data()) == text, ev.seq
        assert type(typed).from_data(typed.subject, typed.to_data()) == typed, ev.seq


#: kinds added after the fixture store was made (tests elsewhere record them)
NEWER_THAN_THE_FIXTURE = {"recover.staging-unmounted", "undeployed", "deploy.unstaged", "image.pulled", "booted"}


def test_the_fixture_has_an_event_of_every_class(recorded) -> None:
    assert {ev.kind for ev, _ in recorded} == set(k.KINDS) - NEWER_THAN_THE_FIXTURE


def test_optional_keys_are_written_only_when_set() -> None:
    """As the emitters wrote them: no null for what a create did not do, no empty spared list."""
    assert k.GcSwept(removed=2, bytes=500, temp_files=0).to_data() == {"removed": 2, "bytes": 500, "temp_files": 0}
    assert k.GcSwept(removed=2, bytes=500, temp_files=0, spared=[]).to_data() == {
        "removed": 2, "bytes": 500, "temp_files": 0}
    assert k.GcSwept(removed=0, bytes=0, temp_files=0, spared=["a/b"]).to_data() == {
        "removed": 0, "bytes": 0, "temp_files": 0, "spared": ["a/b"]}
    made = k.ImageCreated(subject="x", digest="d", size=1, staged="s", source="/src", objects=2)
    assert made.to_data() == {"digest": "d", "size": 1, "staged": "s", "source": "/src", "objects": 2}
    patched = k.ImageCreated(subject="x", digest="d", patched=k.Patched("base", 1), reused=None)
    assert patched.to_data() == {"digest": "d", "patched": {"from": "base", "changed": 1}}
    assert k.Deployed(subject="a", current=k.Slot("a", "D"), previous=None).to_data() == {
        "current": {"image": "a", "digest": "D"}, "previous": None}
    assert k.RecoverImagePlaced(subject="a", digest="D", from_="staging/x").to_data() == {
        "digest": "D", "from": "staging/x"}
    assert k.GcBegun(full=False).subject == "store" and k.RecoverDeploySynced(slots=("current",)).subject == "deploy"


@pytest.mark.parametrize("kind, data, message", [
    ("image.created", {"size": 1}, "data.digest missing"),
    ("image.staged", {"digest": 7}, "data.digest missing"),
    ("deployed", {"current": None, "previous": None}, "data.current must be {image: subject, digest}"),
    ("deployed", {"current": {"image": "a", "digest": "D", "x": 1}, "previous": None},
     "data.current must be {image: subject, digest}"),
    ("rolled-back", {"current": "a", "previous": None}, "data must swap the current and previous deployments"),
    ("mounted", {"mountpoint": "/m"}, "data.mountpoint and data.digest are required"),
    ("gc.swept", {"spared": "o1"}, "spared must be a list of object names"),
    ("gc.swept", {"spared": []}, "data.spared is left out when empty"),
    ("tx.begun", {"explicit": 1}, "data.explicit must be true or false"),
    ("tx.committed", {"ops": True}, "data.ops must be an integer"),
    ("tx.aborted", {"reason": None}, "data.reason must be a string"),
    ("image.created", {"digest": "D", "patched": {"from": "a"}}, "data.patched must be {from, changed}"),
    ("unmounted", {}, "data.mountpoint missing"),
    ("drift.image-modified", {"path": "p", "image": "i", "digest": "d", "size": 1, "found_size": 2},
     "data.found_digest missing"),
])
def test_data_that_does_not_fit_its_kind_is_refused_naming_the_field(kind: str, data: dict, message: str) -> None:
    with pytest.raises(EventDataError, match=re.escape(message)):
        k.parse(kind, "a", data)


def test_the_projection_refuses_such_data_as_before(tmp_path: Path) -> None:
    """Same wording as before the classes: kind, subject, seq, then the old message; nothing recorded."""
    with Journal.open(tmp_path / "journal.db") as j:
        j.append("tx.begun", "t", {}, "t")
        with pytest.raises(ProjectionError) as refused:
            j.append("image.created", "x", {"size": 3}, "t")
        assert str(refused.value) == "image.created 'x' (seq 2): data.digest missing"
        assert (refused.value.seq, refused.value.kind) == (2, "image.created")
        with pytest.raises(ProjectionError, match=re.escape("gc.swept 'store' (seq 2): spared must be a list")):
            j.append("gc.swept", "store", {"spared": [1]}, "g")
        assert j.last_seq() == 1


def test_kinds_without_a_class_are_kept_as_they_are() -> None:
    other = k.parse("recover.note", "store", {"n": [1, 2.5, None]})
    assert isinstance(other, k.OtherInfo) and other.kind == "recover.note"
    assert other.to_data() == {"n": [1, 2.5, None]}
    with pytest.raises(ProjectionError, match="unknown event kind"):
        k.parse("image.renamed", "x", {})
    assert k.parse("tx.begun", "t", {"explicit": True, "note": "héllo"}).extra == {"note": "héllo"}


def test_constructing_an_event_checks_its_fields() -> None:
    with pytest.raises(TypeError, match="ImageCreated.digest"):
        k.ImageCreated(subject="x", digest=None)
    with pytest.raises(TypeError, match="GcSwept.spared"):
        k.GcSwept(spared=[1])
    with pytest.raises(TypeError, match="repeats fields: digest"):
        k.ImageDeleted(subject="x", extra={"digest": "D"})
    assert k.GcSwept(spared=["a", "b"]).spared == ("a", "b")


def test_append_event_records_what_append_would(tmp_path: Path) -> None:
    with Journal.open(tmp_path / "a.db") as typed, Journal.open(tmp_path / "b.db") as plain:
        ev = typed.append_event(k.TxBegun(subject="t", explicit=True, boot_id="b"), "t")
        with typed.transaction() as w:
            created = w.append_event(k.ImageCreated(subject="x", digest="D", size=3), "t", manifest=[("o", 1)])
        plain.append("tx.begun", "t", {"explicit": True, "boot_id": "b"}, "t")
        plain.append("image.created", "x", {"digest": "D", "size": 3}, "t", manifest=[("o", 1)])
        assert (ev.kind, ev.subject, ev.data) == ("tx.begun", "t", {"explicit": True, "boot_id": "b"})
        assert created.typed() == k.ImageCreated(subject="x", digest="D", size=3, manifest=created.data["manifest"])
        assert [(e.kind, e.data) for e in typed.events()] == [(e.kind, e.data) for e in plain.events()]
        assert typed.image("x") == dataclasses.replace(plain.image("x"), created_at=typed.image("x").created_at)


# --- random instances and random data ----------------------------------------------------------

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=8)


def _values(t) -> st.SearchStrategy:
    if t.nullable_of is not None:
        return st.none() | _values(t.nullable_of)
    return {
        k.STR: st.text(), k.INT: st.integers(), k.BOOL: st.booleans(), k.STRS: st.lists(st.text()).map(tuple),
        k.SLOT: st.builds(k.Slot, st.text(), st.text()), k.PATCHED: st.builds(k.Patched, st.text(), st.integers()),
        k.OBJECT: st.dictionaries(st.text(max_size=5), JSON, max_size=3),
    }[t]


def instances(cls: type[k.EventData]) -> st.SearchStrategy:
    fields = {}
    for name, key, spec in cls.fields():
        value = _values(spec.type)
        fields[name] = value if spec.required else (st.just(()) | value if spec.omit_empty else st.none() | value)
    extra = st.dictionaries(st.text(max_size=8).filter(lambda key: key not in cls.data_keys()), JSON, max_size=2)
    return st.builds(cls, subject=st.text(), extra=extra, **fields)


ANY_EVENT = st.one_of([instances(cls) for cls in k.KINDS.values()])


@settings(max_examples=400, deadline=None)
@given(ANY_EVENT)
def test_random_events_read_back_as_themselves(event: k.EventData) -> None:
    data = json.loads(canonical(event.to_data()))
    assert type(event).from_data(event.subject, data) == event
    assert canonical(type(event).from_data(event.subject, data).to_data()) == canonical(data)


@settings(max_examples=400, deadline=None)
@given(st.sampled_from(sorted(k.KINDS)), st.data())
def test_random_data_is_refused_or_written_back_unchanged(kind: str, draw) -> None:
    """Whatever a kind accepts, it gives back: a key dropped or added would change the chain."""
    cls = k.KINDS[kind]
    keys = st.sampled_from(cls.data_keys()) | st.text(max_size=6) if cls.data_keys() else st.text(max_size=6)
    data = draw.draw(st.dictionaries(keys, JSON | _anything_valid(cls), max_size=6))
    try:
        event = cls.from_data("s", data)
    except EventDataError:
        return
    assert canonical(event.to_data()) == canonical(data)


def _anything_valid(cls: type[k.EventData]) -> st.SearchStrategy:
    """JSON values some field of the class takes, so random data gets past the checks often."""
    return st.one_of([_values(spec.type).map(lambda v, t=spec.type: t.dump(v)) for _, _, spec in cls.fields()]
                     or [st.none()])


# --- the documentation is the same list ----------------------------------------------------------

#: names documented inside a field's value ({image, digest}, {from, changed})
NESTED = {"image", "digest", "from", "changed"}


def _documented() -> dict[str, set[str]]:
    rows = {}
    for line in DOC.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 4 and re.fullmatch(r"`[a-z.-]+`", cells[0]):
            rows[cells[0].strip("`")] = set(re.findall(r"`([a-z_.-]+)`", cells[2]))
    return rows


def test_docs_journal_lists_every_kind_with_its_fields() -> None:
    documented = _documented()
    assert set(documented) == set(k.KINDS)
    for kind, cls in k.KINDS.items():
        keys = documented[kind]
        for other in keys & set(k.KINDS) - set(cls.data_keys()):  # "as `image.staged`": that kind's fields
            keys = (keys - {other}) | documented[other]
        assert set(cls.data_keys()) <= keys, kind
        assert keys - set(cls.data_keys()) - NESTED == set(), kind
