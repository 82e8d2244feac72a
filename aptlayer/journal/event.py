"""One journal event, as stored in the ``events`` table."""

from __future__ import annotations

import json
from dataclasses import dataclass

from . import kinds

COLUMNS = "seq, at, tx, kind, subject, data, actor, hash"


@dataclass(frozen=True)
class Event:
    seq: int
    at: str
    tx: str
    kind: str
    subject: str
    data: dict
    actor: dict
    hash: str

    @classmethod
    def from_row(cls, row: tuple) -> Event:
        """An event from a row of ``SELECT {COLUMNS} FROM events``."""
        seq, at, tx, kind, subject, data, actor, hash_ = row
        return cls(seq, at, tx, kind, subject, json.loads(data), json.loads(actor), hash_)

    def typed(self) -> kinds.EventData:
        """The subject and data as the kind's class (:mod:`.kinds`); EventDataError if they do not fit."""
        return kinds.parse(self.kind, self.subject, self.data)
