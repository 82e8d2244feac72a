"""Keyed checkpoints of the journal's hash chain: a rewritten history is found too.

The hash chain finds an edited event, but whoever can write ``journal.db``
can also rewrite every event after it and every hash, and the chain then
verifies. A checkpoint is ``SEQ HASH MAC``: the hash of event SEQ and an
HMAC-SHA256 of both under a key only root can read (by default
``/etc/apt-layer/journal.key``, outside the store). ``ROOT/checkpoints``
keeps one line per checkpoint. ``journal verify --key`` checks each MAC
and that event SEQ still has that hash, so a history rewritten before the
last checkpoint is found without the key being needed to write it again.

What it does not protect: events after the last checkpoint (checkpoint
often: ``journal checkpoint``, and ``recover`` adds one when the key is
there); a journal and checkpoints file replaced together by an older copy
of both (a rollback to a real earlier state), short of a checkpoint kept
elsewhere; anyone who can read the key (root) forging checkpoints.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import stat
from pathlib import Path

from . import errors
from .linux import fsops

DEFAULT_KEY = Path("/etc/apt-layer/journal.key")
#: bytes of a new key
KEY_BYTES = 32


def load_key(path: str | os.PathLike, create: bool = False) -> bytes:
    """The key at ``path`` (made, 0600, with ``create`` if missing); it must be root's alone."""
    path = Path(path)
    if create and not path.exists():
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fsops.write_file_atomic(path, os.urandom(KEY_BYTES).hex().encode() + b"\n", mode=0o600)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        raise errors.NotFound(f"no journal key at {path} (`apt-layer journal checkpoint --key {path}` makes one)") \
            from None
    except OSError as e:
        raise errors.from_os_error(e, f"journal key {path}") from None
    try:
        st = os.fstat(fd)
        if st.st_uid not in (0, os.geteuid()) or st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise errors.UnsafePermissions(
                f"unsafe permissions: journal key {path} must be root's alone (mode "
                f"{stat.S_IMODE(st.st_mode):04o}, uid {st.st_uid}); fix: chown root:root {path} && chmod 600 {path}")
        text = os.read(fd, 4096).strip()
    finally:
        os.close(fd)
    try:
        key = bytes.fromhex(text.decode())
    except (UnicodeDecodeError, ValueError):
        key = b""
    if len(key) < 16:
        raise errors.InvalidInput(f"journal key {path}: not at least 16 bytes written as hex digits")
    return key


def mac(key: bytes, seq: int, event_hash: str) -> str:
    return hmac.new(key, f"apt-layer checkpoint {seq} {event_hash}".encode(), hashlib.sha256).hexdigest()


def _path(root: Path) -> Path:
    return root / "checkpoints"


def read(root: Path) -> list[tuple[int, str, str]]:
    """The checkpoints recorded in the store at ``root``: (seq, hash, mac), oldest first."""
    try:
        text = _path(root).read_text()
    except FileNotFoundError:
        return []
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        parts = line.split()
        if len(parts) != 3 or not parts[0].isdigit():
            raise errors.IntegrityError(f"{_path(root)}: line {n} is not a checkpoint (SEQ HASH MAC)")
        out.append((int(parts[0]), parts[1], parts[2]))
    return out


def add(root: Path, journal, key: bytes) -> dict | None:
    """Checkpoint the journal's last event (None if empty or already checkpointed)."""
    seq = journal.last_seq()
    if not seq:
        return None
    existing = read(root)
    if existing and existing[-1][0] == seq:
        return None
    event_hash = journal.hash_at(seq)
    lines = [f"{s} {h} {m}" for s, h, m in existing] + [f"{seq} {event_hash} {mac(key, seq, event_hash)}"]
    fsops.write_file_atomic(_path(root), ("\n".join(lines) + "\n").encode(), mode=0o644)
    return {"seq": seq, "hash": event_hash}


def verify(root: Path, journal, key: bytes) -> int:
    """Check every checkpoint against the key and the journal; returns how many. IntegrityError if any fails."""
    found = read(root)
    if not found:
        raise errors.IntegrityError(f"no keyed checkpoint in {_path(root)}: nothing vouches for the history "
                                    "(`apt-layer journal checkpoint` makes one)")
    for seq, event_hash, tag in found:
        if not hmac.compare_digest(tag, mac(key, seq, event_hash)):
            raise errors.IntegrityError(f"checkpoint at seq {seq} was not made with this key (forged or edited)")
        now = journal.hash_at(seq)
        if now != event_hash:
            what = "is missing" if now is None else "differs from the one checkpointed"
            raise errors.IntegrityError(f"seq {seq} {what}: the journal's history was rewritten")
    return len(found)
