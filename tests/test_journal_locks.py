"""A second Journal opened in a process must not drop the first one's SQLite locks.

POSIX record locks belong to the process and the file: closing *any*
descriptor of journal.db (say, to peek at its header) silently releases the
locks SQLite holds through another connection. Another process can then
checkpoint and delete the WAL under the first connection's feet.
"""

from __future__ import annotations

import subprocess
import sys

from conftest import REPO

from aptlayer.journal import Journal

OTHER_PROCESS = """
import sys
sys.path.insert(0, sys.argv[2])
from aptlayer.journal import Journal
j = Journal.open(sys.argv[1])
j.append("recover.probe", "other", {}, "tx-other")
j.close()   # the last connection it believes in: checkpoints, may delete the WAL
"""


def test_second_open_in_process_keeps_the_first_connections_locks(tmp_path):
    path = tmp_path / "journal.db"
    first = Journal.open(path)
    first.append("recover.probe", "first", {}, "tx-1")
    second = Journal.open(path)  # used to read the header with open()/close()
    second.close()
    for i in range(5):
        subprocess.run([sys.executable, "-c", OTHER_PROCESS, str(path), str(REPO)], check=True)
        first.append("recover.probe", f"first-{i}", {}, f"tx-{i + 2}")
    assert first.last_seq() == 11
    assert first.verify() == 11
    assert [e.subject for e in first.events(kind="recover.probe")][-1] == "first-4"
    first.close()


def test_a_file_that_is_not_a_database_is_refused_as_corrupt(tmp_path):
    from aptlayer.journal import JournalCorruptError

    path = tmp_path / "journal.db"
    path.write_bytes(b"this is not sqlite" * 100)
    try:
        Journal.open(path)
    except JournalCorruptError as e:
        assert "journal.db" in str(e)
    else:
        raise AssertionError("a non-database was opened")
    assert path.read_bytes() == b"this is not sqlite" * 100
