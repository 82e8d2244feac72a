"""The composefs-dump(5) text format: parse it into a tree, print a tree as it.

One line per entry::

    PATH SIZE MODE NLINK UID GID RDEV SEC.NSEC PAYLOAD CONTENT DIGEST [KEY=VALUE]...

:func:`parse_dump` accepts what ``mkcomposefs --from-file`` accepts and
rejects malformed input with a :class:`DumpError` naming the line.
:func:`format_dump` prints a tree byte for byte like ``composefs-info dump``.
"""

from __future__ import annotations

import re
import stat
from collections.abc import Iterable
from typing import BinaryIO

from .format import (
    DIGEST_SIZE,
    MAX_INLINE_CONTENT,
    MAX_NAME_LEN,
    MAX_SYMLINK_LEN,
    MAX_XATTR_BUDGET,
    MAX_XATTR_NAME_LEN,
    MAX_XATTR_VALUE_LEN,
    XATTR_BUDGET_BASE,
    XATTR_BUDGET_PER_ENTRY,
)
from .tree import Node

_FILE_TYPES = frozenset(
    (
        stat.S_IFREG,
        stat.S_IFDIR,
        stat.S_IFLNK,
        stat.S_IFCHR,
        stat.S_IFBLK,
        stat.S_IFIFO,
        stat.S_IFSOCK,
    )
)
#: the first 8 fields are required; PAYLOAD, CONTENT and DIGEST may be left out
_REQUIRED_FIELDS = 8
_FIXED_FIELDS = 11


class DumpError(ValueError):
    """A composefs dump that cannot be parsed; ``lineno`` is 1-based (0: whole file)."""

    def __init__(self, lineno: int, message: str) -> None:
        super().__init__(f"line {lineno}: {message}" if lineno else message)
        self.lineno = lineno
        self.reason = message


# --- escaping ---------------------------------------------------------------------

_NAMED_ESCAPES = {ord("\\"): b"\\\\", ord("\n"): b"\\n", ord("\r"): b"\\r", ord("\t"): b"\\t"}


def _escape_table(*, xattr: bool, raw_space: bool) -> tuple[list[bytes], bytes]:
    """Per-byte replacements, and the bytes that need none."""
    table = []
    for b in range(256):
        if b in _NAMED_ESCAPES:
            table.append(_NAMED_ESCAPES[b])
        elif (0x21 <= b <= 0x7E and not (xattr and b == ord("="))) or (raw_space and b == 0x20):
            table.append(bytes((b,)))
        else:
            table.append(b"\\x%02x" % b)
    safe = bytes(b for b in range(256) if len(table[b]) == 1)
    return table, safe


_ESCAPE_TABLES = {
    (xattr, raw_space): _escape_table(xattr=xattr, raw_space=raw_space)
    for xattr in (False, True)
    for raw_space in (False, True)
}


def escape(
    data: bytes, *, xattr: bool = False, dash: bool = False, raw_space: bool = False
) -> bytes:
    """Escape bytes for a dump field.

    ``xattr`` also escapes ``=`` (xattr keys and values); ``dash`` writes a
    value that is exactly ``-`` as ``\\x2d`` so it cannot mean "absent"
    (PAYLOAD and CONTENT); ``raw_space`` leaves spaces alone (``ls`` output).
    """
    if dash and data == b"-":
        return b"\\x2d"
    table, safe = _ESCAPE_TABLES[(xattr, raw_space)]
    if not data.translate(None, safe):
        return data
    return b"".join([table[b] for b in data])


def printable(data: bytes) -> str:
    """Bytes as they would appear in a dump, for error messages."""
    return escape(data).decode("ascii")


_ESCAPE_RE = re.compile(rb"\\(x(?P<hex>[0-9A-Fa-f]{2})|(?P<other>.?))", re.DOTALL)
_SIMPLE_UNESCAPES = {b"\\": b"\\", b"n": b"\n", b"r": b"\r", b"t": b"\t"}


def unescape(data: bytes) -> bytes:
    """Undo :func:`escape`; an unknown or truncated escape raises ValueError."""
    if b"\\" not in data:
        return data

    def replace(m: re.Match[bytes]) -> bytes:
        if m.group("hex") is not None:
            return bytes((int(m.group("hex"), 16),))
        other = m.group("other")
        if other in _SIMPLE_UNESCAPES:
            return _SIMPLE_UNESCAPES[other]
        if other == b"x":
            raise ValueError("bad hex escape")
        if not other:
            raise ValueError("escape at end of field")
        raise ValueError(f"unsupported escape \\{printable(other)}")

    return _ESCAPE_RE.sub(replace, data)


# --- parsing ---------------------------------------------------------------------


def _int(field: bytes, what: str, limit: int) -> int:
    if not field.isdigit():
        raise ValueError(f"invalid {what} '{printable(field)}'")
    value = int(field)
    if value > limit:
        raise ValueError(f"{what} {value} out of range")
    return value


def _mtime(field: bytes) -> tuple[int, int]:
    sec, dot, nsec = field.partition(b".")
    digits = sec[1:] if sec.startswith(b"-") else sec
    if not dot or not digits.isdigit() or not nsec.isdigit():
        raise ValueError(f"invalid mtime '{printable(field)}', expected SEC.NSEC")
    value = int(sec)
    if not -(1 << 63) <= value < (1 << 63):
        raise ValueError(f"mtime {value} out of range")
    return value, _int(nsec, "mtime nsec", 0xFFFFFFFF)


def _mode(field: bytes) -> tuple[int, bool]:
    hardlink = field.startswith(b"@")
    digits = field[1:] if hardlink else field
    if not digits or digits.strip(b"01234567"):
        raise ValueError(f"invalid mode '{printable(field)}'")
    mode = int(digits, 8)
    if mode > 0xFFFFFFFF:
        raise ValueError(f"mode '{printable(field)}' out of range")
    if stat.S_IFMT(mode) not in _FILE_TYPES:
        raise ValueError(f"invalid file type in mode '{printable(field)}'")
    return mode, hardlink


def _optional(field: bytes) -> bytes | None:
    return None if field == b"-" else unescape(field)


def _digest(field: bytes) -> bytes | None:
    if field == b"-":
        return None
    if len(field) != 2 * DIGEST_SIZE or field.strip(b"0123456789abcdefABCDEF"):
        raise ValueError(
            f"invalid digest '{printable(field)}', expected {2 * DIGEST_SIZE} hex digits"
        )
    return bytes.fromhex(field.decode("ascii"))


def _split_path(path: bytes) -> list[bytes]:
    """Components of an (unescaped) path; repeated slashes collapse, like the C parser."""
    if not path:
        raise ValueError("empty path")
    if not path.startswith(b"/"):
        raise ValueError(f"path '{printable(path)}' is not absolute")
    if b"\0" in path:
        raise ValueError(f"path '{printable(path)}' contains a NUL byte")
    parts = re.sub(rb"/+", b"/", path)[1:].split(b"/")
    if parts == [b""]:
        return []
    for name in parts:
        if not name:
            raise ValueError(f"empty name in path '{printable(path)}'")
        if name in (b".", b".."):
            raise ValueError(f"invalid name '{printable(name)}' in path '{printable(path)}'")
        if len(name) > MAX_NAME_LEN:
            raise ValueError(f"name longer than {MAX_NAME_LEN} bytes in path '{printable(path)}'")
    return parts


class _XattrBudget:
    """Applies ``KEY=VALUE`` fields to a node, enforcing the per-inode limits."""

    def __init__(self, node: Node) -> None:
        self.node = node
        self.used = 0

    def add(self, field: bytes) -> None:
        key, eq, value = field.partition(b"=")
        if not eq:
            raise ValueError(f"missing = in xattr '{printable(field)}'")
        name, value = unescape(key), unescape(value)
        if not name or len(name) > MAX_XATTR_NAME_LEN:
            raise ValueError(f"xattr name must be 1..{MAX_XATTR_NAME_LEN} bytes, got {len(name)}")
        if b"\0" in name:
            raise ValueError(f"xattr name '{printable(name)}' contains a NUL byte")
        if len(value) > MAX_XATTR_VALUE_LEN:
            raise ValueError(
                f"xattr '{printable(name)}' value longer than {MAX_XATTR_VALUE_LEN} bytes"
            )
        xattrs = self.node.xattrs
        old = xattrs.pop(name, None)
        if old is not None:
            self.used -= XATTR_BUDGET_PER_ENTRY + len(name) + len(old)
        cost = (
            XATTR_BUDGET_PER_ENTRY + len(name) + len(value) + (0 if xattrs else XATTR_BUDGET_BASE)
        )
        if not xattrs:
            self.used = 0
        if self.used + cost > MAX_XATTR_BUDGET:
            raise ValueError(f"xattrs exceed the per-inode budget of {MAX_XATTR_BUDGET} bytes")
        self.used += cost
        xattrs[name] = value


class _Parser:
    def __init__(self, strict: bool) -> None:
        self.strict = strict
        self.root: Node | None = None
        self.nodes: dict[tuple[bytes, ...], Node] = {}
        #: (link node, target path, line number), resolved at the end
        self.links: list[tuple[Node, bytes, int]] = []

    def line(self, lineno: int, line: bytes) -> None:
        if b"\0" in line:
            raise ValueError("line contains a NUL byte")
        fields = line.split(b" ")
        if len(fields) < _REQUIRED_FIELDS:
            if not line:
                raise ValueError("empty line")
            raise ValueError(f"expected at least {_REQUIRED_FIELDS} fields, got {len(fields)}")
        # missing trailing fields are empty, as in mkcomposefs (not "-")
        fixed = fields[:_FIXED_FIELDS] + [b""] * (_FIXED_FIELDS - len(fields))
        parts = tuple(_split_path(unescape(fixed[0])))
        mode, hardlink = _mode(fixed[2])
        if hardlink:
            node = self.hardlink(fixed[8], lineno)
        else:
            node = self.node(mode, fixed)
            xattr_fields = fields[_FIXED_FIELDS:]
            if xattr_fields and xattr_fields[-1] == b"":
                xattr_fields.pop()  # one trailing space is tolerated
            budget = _XattrBudget(node)
            for field in xattr_fields:
                budget.add(field)
        self.attach(parts, node)

    def hardlink(self, target_field: bytes, lineno: int) -> Node:
        """A ``@`` line: only PATH and PAYLOAD (the target) matter, the rest is ignored."""
        target = _optional(target_field)
        if not target:
            raise ValueError("hardlink without a target path")
        link = Node.hardlink(Node())
        self.links.append((link, target, lineno))
        return link

    def node(self, mode: int, f: list[bytes]) -> Node:
        node = Node(
            mode=mode,
            size=_int(f[1], "size", (1 << 64) - 1),
            nlink=_int(f[3], "nlink", 0xFFFFFFFF),
            uid=_int(f[4], "uid", 0xFFFFFFFF),
            gid=_int(f[5], "gid", 0xFFFFFFFF),
            rdev=_int(f[6], "rdev", 0xFFFFFFFF),
            payload=_optional(f[8]) or None,
            content=_optional(f[9]),
            digest=_digest(f[10]) if f[10] else None,
        )
        node.mtime_sec, node.mtime_nsec = _mtime(f[7])
        self.check(node)
        if not f[10] and stat.S_ISREG(mode) and node.size > 0 and node.content is None:
            # mkcomposefs would store an all-zero digest here
            raise ValueError(
                "empty DIGEST field for a file with external content (write - for none)"
            )
        return node

    def check(self, node: Node) -> None:
        content = node.content
        if content is not None:
            if len(content) != node.size:
                raise ValueError(
                    f"invalid content size {len(content)}, must match size {node.size}"
                )
            if len(content) > MAX_INLINE_CONTENT:
                raise ValueError(f"inline content longer than {MAX_INLINE_CONTENT} bytes")
            if not content:
                node.content = content = None  # an empty CONTENT field on an empty file
        if node.ftype == stat.S_IFLNK:
            target = node.payload
            if not target:
                raise ValueError("symlink without a target")
            if len(target) >= MAX_SYMLINK_LEN:
                raise ValueError(
                    f"symlink target of {len(target)} bytes, must be < {MAX_SYMLINK_LEN}"
                )
            if self.strict and node.size != len(target):
                raise ValueError(
                    f"symlink size {node.size} does not match target length {len(target)}"
                )
            if self.strict and content is not None:
                raise ValueError("symlink with inline content")
            node.size = len(target)
        if self.strict and node.rdev and node.ftype not in (stat.S_IFCHR, stat.S_IFBLK):
            raise ValueError(f"rdev {node.rdev} on a node that is not a device")

    def attach(self, parts: tuple[bytes, ...], node: Node) -> None:
        if not parts:
            if self.root is not None:
                raise ValueError("multiple roots")
            if not node.is_dir:
                raise ValueError("root must be a directory")
            self.root = node
            self.nodes[()] = node
            return
        if self.root is None:
            raise ValueError("root node not present (the first line must be /)")
        path = b"/" + b"/".join(parts)
        parent = self.nodes.get(parts[:-1])
        if parent is None:
            raise ValueError(f"parent directory missing for {printable(path)}")
        if not parent.is_dir:
            raise ValueError(f"parent must be a directory for {printable(path)}")
        if parts[-1] in parent.children:
            raise ValueError(f"duplicate path {printable(path)}")
        parent.children[parts[-1]] = node
        self.nodes[parts] = node

    def resolve_links(self) -> None:
        """Point every hardlink at its target; forward references are allowed."""
        for link, target, lineno in self.links:
            try:
                parts = tuple(_split_path(target))
            except ValueError as e:
                raise DumpError(lineno, f"invalid hardlink target: {e}") from None
            node = self.nodes.get(parts)
            if node is None:
                raise DumpError(lineno, f"no target at {printable(target)} for hardlink")
            if node is link:
                raise DumpError(lineno, "hardlink to itself")
            link.link = node
        for link, target, lineno in self.links:
            final = _final_target(link)
            if final is None:
                raise DumpError(lineno, "hardlink cycle")
            if final.is_dir:
                raise DumpError(lineno, f"hardlink to a directory ({printable(target)})")


def _final_target(link: Node) -> Node | None:
    """The node a hardlink chain ends at, or None if the chain loops."""
    seen = {id(link)}
    node = link.link
    while node is not None and node.link is not None:
        if id(node) in seen:
            return None
        seen.add(id(node))
        node = node.link
    return node


def parse_dump(source: bytes | BinaryIO, *, strict: bool = False) -> Node:
    """Parse composefs-dump(5) text into a tree and return its root.

    ``strict`` mirrors ``CFS_PARSE_STRICT=1``: a missing final newline, a
    symlink SIZE other than the target length, symlink CONTENT and a
    non-zero RDEV on a non-device are errors.
    """
    data = source if isinstance(source, bytes | bytearray | memoryview) else source.read()
    data = bytes(data)
    if not data:
        raise DumpError(0, "no files in dump file")
    lines = data.split(b"\n")
    if lines[-1] == b"":
        lines.pop()
    elif strict:
        raise DumpError(len(lines), "missing trailing newline")
    parser = _Parser(strict)
    for lineno, line in enumerate(lines, 1):
        try:
            parser.line(lineno, line)
        except ValueError as e:
            raise DumpError(lineno, str(e)) from None
    if parser.root is None:
        raise DumpError(0, "root node not present")
    parser.resolve_links()
    return parser.root


# --- printing --------------------------------------------------------------------

#: PATH SIZE MODE NLINK UID GID RDEV SEC.NSEC PAYLOAD CONTENT DIGEST, then the
#: ``" KEY=VALUE"`` fields; a hard link's line prefixes MODE with ``@``
_LINE = b"%s %d %o %d %d %d %d %d.%d %s %s %s%s\n"
_LINK_LINE = b"%s %d @%o %d %d %d %d %d.%d %s %s %s%s\n"
#: bytes a path, PAYLOAD or CONTENT may hold unescaped
_SAFE = _ESCAPE_TABLES[(False, False)][1]
_S_IFMT = 0o170000
_S_IFDIR = stat.S_IFDIR
#: lines gathered before they are written out
_FLUSH_LINES = 4096


def _field(value: bytes) -> bytes:
    """A present PAYLOAD or CONTENT, escaped; a value with only safe bytes is returned as is."""
    if value.translate(None, _SAFE) or value == b"-":
        return escape(value, dash=True)
    return value


def _xattr_fields(xattrs: dict[bytes, bytes]) -> bytes:
    """The `` KEY=VALUE`` fields, each with its leading space."""
    return b"".join(
        [b" " + escape(k, xattr=True) + b"=" + escape(v, xattr=True) for k, v in xattrs.items()]
    )


def _line(path: bytes, node: Node, first_path: bytes | None) -> bytes:
    """One dump line; ``path`` is escaped, ``first_path`` the escaped first path of a hard link."""
    if first_path is not None:
        template, payload = _LINK_LINE, first_path
    else:
        template, payload = _LINE, node.payload
        payload = b"-" if payload is None else _field(payload)
    content, digest, xattrs = node.content, node.digest, node.xattrs
    return template % (
        path,
        node.size,
        node.mode,
        node.nlink,
        node.uid,
        node.gid,
        node.rdev,
        node.mtime_sec,
        node.mtime_nsec,
        payload,
        b"-" if content is None else _field(content),
        b"-" if digest is None else digest.hex().encode(),
        _xattr_fields(xattrs) if xattrs else b"",
    )


def _sorted_children(node: Node, keep: set[bytes] | None) -> list[tuple[bytes, Node]]:
    """(name, entry) in byte order of the names, only those in ``keep`` if given."""
    children = sorted(node.children.items())
    if keep is not None:
        children = [item for item in children if item[0] in keep]
    return children


def format_dump(root: Node, out: BinaryIO, filters: Iterable[bytes] | None = None) -> None:
    """Write the tree like ``composefs-info dump``.

    Depth-first, parents first, children in byte order. The first path at
    which a node is met prints it in full; later paths print ``@`` lines with
    the same fields and the first path as PAYLOAD. ``filters`` keeps only
    those names at the root level.

    Paths are built escaped: escaping works byte by byte and leaves ``/``
    alone, so a directory's escaped path prefixes those of its children.
    """
    keep = None if filters is None else set(filters)
    top = root.resolve()
    first_seen: dict[int, bytes] = {id(top): b"/"}
    lines = [_line(b"/", top, None)]
    stack = [(b"/", iter(_sorted_children(root, keep)))] if root.is_dir else []
    while stack:
        base, entries = stack[-1]
        for name, entry in entries:
            path = base + (escape(name) if name.translate(None, _SAFE) else name)
            node = entry if entry.link is None else entry.resolve()
            key = id(node)
            first = first_seen.get(key)
            if first is None:
                first_seen[key] = path
            lines.append(_line(path, node, first))
            if len(lines) >= _FLUSH_LINES:
                out.write(b"".join(lines))
                lines.clear()
            if node is entry and node.mode & _S_IFMT == _S_IFDIR and node.children:
                stack.append((path + b"/", iter(_sorted_children(node, None))))
                break
        else:
            stack.pop()
    out.write(b"".join(lines))
