"""Shared output: ``--json`` for scripts, aligned tables for people, progress
on a terminal only (never mixed into JSON, silent with ``--quiet``)."""

from __future__ import annotations

import csv
import io
import json
import sys
import time
from collections.abc import Iterable, Sequence

import click

json_option = click.option("--json", "as_json", is_flag=True,
                           help='Print JSON for scripts (docs/json.md); an error as {"error": ..., "exit": N}.')


def print_json(value: object) -> None:
    click.echo(json.dumps(value, indent=2, sort_keys=True, default=str))


def table(rows: Iterable[Sequence[object]], headers: Sequence[str]) -> str:
    """Left-aligned columns separated by two spaces; empty cells as '-'."""
    cells = [[("-" if v is None else str(v)) for v in row] for row in rows]
    widths = [len(h) for h in headers]
    for row in cells:
        widths = [max(w, len(c)) for w, c in zip(widths, row)]
    lines = ["  ".join(h.upper().ljust(w) for h, w in zip(headers, widths)).rstrip()]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells]
    return "\n".join(lines)


def csv_text(rows: Iterable[Sequence[object]], headers: Sequence[str]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(headers)
    w.writerows(rows)
    return buf.getvalue().rstrip("\n")


def plural(n: int, word: str, words: str | None = None) -> str:
    """``1 object``, ``2 objects``; ``words`` for an irregular plural (``entry``, ``entries``)."""
    return f"{n} {word if n == 1 else (words or word + 's')}"


def human_bytes(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


class Progress:
    """A one-line progress indicator on stderr, only when it is a terminal."""

    def __init__(self, label: str, enabled: bool = True, total: int | None = None):
        self.label = label
        self.total = total
        self.enabled = enabled and sys.stderr.isatty()
        self._last = 0.0

    def __call__(self, done: int, total: int | None = None, what: str = "") -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if now - self._last < 0.1:
            return
        self._last = now
        total = total if total is not None else self.total
        count = f"{done}/{total}" if total else f"{done}"
        sys.stderr.write(f"\r\x1b[K{self.label}: {count} {what}"[:200])
        sys.stderr.flush()

    def done(self) -> None:
        if self.enabled:
            sys.stderr.write("\r\x1b[K")
            sys.stderr.flush()

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.done()  # an error's message starts on a clean line


def make_progress(ctx: click.Context, label: str, as_json: bool = False) -> Progress:
    return Progress(label, enabled=not (as_json or ctx.obj.quiet))
