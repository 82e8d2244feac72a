"""docs/journal.md is the public schema: it must cover every kind, table and view, and its code must run."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from aptlayer.journal import APPLY, Journal, audit_query
from aptlayer.journal.projection import TABLES
from aptlayer.journal.views import VIEWS

DOC = Path(__file__).resolve().parent.parent / "docs" / "journal.md"


@pytest.fixture(scope="module")
def doc() -> str:
    return DOC.read_text()


def test_every_kind_table_and_view_is_documented(doc: str) -> None:
    names = set(APPLY) | set(TABLES) | set(VIEWS) | {"events", "images_manifest", "image_objects"}
    missing = sorted(n for n in names if f"`{n}`" not in doc)
    assert missing == []


def test_python_verifier_in_the_doc_runs(doc: str, tmp_path: Path) -> None:
    with Journal.open(tmp_path / "journal.db") as j:
        j.append("tx.begun", "t", {"explicit": True, "note": "héllo"}, "t")
        j.append("recover.note", "store", {"n": [1, 2.5, None]}, "t")
    code = re.search(r"```python\n(.*?)```", doc, re.S).group(1)
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        exec(compile(code, str(DOC), "exec"), {})
    finally:
        os.chdir(cwd)


def test_sql_examples_in_the_doc_run(doc: str, tmp_path: Path) -> None:
    Journal.open(tmp_path / "journal.db").close()
    block = re.search(r"```sql\n(.*?)```", doc, re.S).group(1)
    statements = [s.strip() for s in re.sub(r"--[^\n]*", "", block).split(";") if s.strip()]
    assert len(statements) == 4
    for sql in statements:
        audit_query(tmp_path / "journal.db", sql)
