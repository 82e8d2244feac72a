"""The image reader against the reference vectors and composefs-info."""

from __future__ import annotations

import gzip
import io
import struct
import subprocess
from pathlib import Path

import pytest

from aptlayer.composefs import format as fmt
from aptlayer.composefs.dumpfile import format_dump
from aptlayer.composefs.listing import write_ls, write_objects
from aptlayer.composefs.imageview import ImageView
from aptlayer.composefs.reader import ImageFormatError, SymlinkLoopError, image_objects, read_image, read_path
from aptlayer.composefs.tree import Node

from conftest import UPSTREAM_TESTS, vector_names

VECTORS = vector_names()


def dump_bytes(root: Node, filters: list[bytes] | None = None) -> bytes:
    out = io.BytesIO()
    format_dump(root, out, filters)
    return out.getvalue()


def ls_bytes(root: Node, filters: list[bytes] | None = None) -> bytes:
    out = io.BytesIO()
    write_ls(root, out, filters)
    return out.getvalue()


def objects_bytes(root: Node) -> bytes:
    out = io.BytesIO()
    write_objects([root], out)
    return out.getvalue()


def upstream(composefs_info: str, *args: str | Path) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([composefs_info, *map(str, args)], capture_output=True, timeout=60)


# --- oracle: the reference vectors ------------------------------------------------------


@pytest.mark.parametrize("name", VECTORS)
def test_dump_matches_vector(vectors: Path, name: str) -> None:
    root = read_image(vectors / name / "image.cfs")
    assert dump_bytes(root) == (vectors / name / "dump.txt").read_bytes()


@pytest.mark.parametrize("name", VECTORS)
def test_ls_matches_vector(vectors: Path, name: str) -> None:
    root = read_image(vectors / name / "image.cfs")
    assert ls_bytes(root) == (vectors / name / "ls.txt").read_bytes()


@pytest.mark.parametrize("name", VECTORS)
def test_objects_match_vector(vectors: Path, name: str) -> None:
    data = (vectors / name / "image.cfs").read_bytes()
    expected = (vectors / name / "objects.txt").read_bytes()
    assert objects_bytes(read_image(data)) == expected
    assert b"".join(obj + b"\n" for obj in image_objects(data)) == expected


def test_vectors_present() -> None:
    if not VECTORS:
        pytest.skip("reference vectors not found")
    assert len(VECTORS) >= 10


def test_accepts_bytes_bytearray_memoryview_and_path(vectors: Path) -> None:
    path = vectors / "ff-basic" / "image.cfs"
    data = path.read_bytes()
    expected = dump_bytes(read_image(data))
    for source in (bytearray(data), memoryview(data), path, str(path)):
        assert dump_bytes(read_image(source)) == expected


# --- reading rules ------------------------------------------------------------------------------


def test_stubs_are_skipped_and_whiteouts_restored(vectors: Path) -> None:
    root = read_image(vectors / "devices" / "image.cfs")
    names = set(root.children)
    assert not names & {b"%02x" % i for i in range(256)}
    whiteouts = [node for _path, node in root.walk() if node.is_whiteout]
    assert whiteouts, "the devices vector has whiteouts"
    for node in whiteouts:
        assert node.size == 0 and not any(b"whiteout" in k for k in node.xattrs)


def test_hard_links_point_at_first_occurrence(vectors: Path) -> None:
    root = read_image(vectors / "ff-hardlinks" / "image.cfs")
    seen: dict[int, bytes] = {}
    links = 0
    for path, entry in root.walk():
        target = entry.resolve()
        if entry.link is None:
            assert id(target) not in seen, f"{path!r} repeats a node without being a link"
            seen[id(target)] = path
        else:
            links += 1
            assert not entry.link.is_dir
            assert id(target) in seen, f"link {path!r} comes before its original"
    assert links > 0


def test_filters_keep_root_names(vectors: Path) -> None:
    data = (vectors / "ff-basic" / "image.cfs").read_bytes()
    full = read_image(data)
    keep = sorted(full.children)[:2]
    root = read_image(data, filters=keep)
    assert list(root.children) == keep
    expected = [
        line
        for line in dump_bytes(full).splitlines(keepends=True)
        if line.startswith(b"/ ") or line[1:].split(b" ")[0].split(b"/")[0] in keep
    ]
    assert dump_bytes(root) == b"".join(expected)


def _redirect_entry(data: bytes, payload: bytes) -> int:
    """Offset of the inline redirect xattr entry whose value is ``/payload``."""
    suffix = fmt.XATTR_REDIRECT[len(b"trusted.") :]
    value = b"/" + payload
    needle = bytes((len(suffix), 4)) + struct.pack("<H", len(value)) + suffix + value
    offset = data.find(needle)
    assert offset > 0 and data.find(needle, offset + 1) < 0
    return offset


def test_redirect_length_multiple_of_four_is_not_over_read(vectors: Path) -> None:
    """composefs-info 1.0.8 reads one byte too many here; the reader must not."""
    data = bytearray((vectors / "ff-escapes" / "image.cfs").read_bytes())
    root = read_image(bytes(data))
    path, node = next((p, n) for p, n in root.walk() if n.is_reg and n.payload and b"/" in n.payload)
    shrink = (len(node.payload) + 1) % 4 or 4
    new_payload = node.payload[:-shrink]
    assert len(b"/" + new_payload) % 4 == 0
    entry = _redirect_entry(bytes(data), node.payload)
    struct.pack_into("<H", data, entry + 2, len(new_payload) + 1)
    patched = read_image(bytes(data))
    name = path.rsplit(b"/", 1)[1]
    assert patched.children[name].payload == new_payload
    assert b"\t@ " + new_payload + b"\n" in ls_bytes(patched)
    assert new_payload in image_objects(bytes(data))


def test_redirect_length_multiple_of_four_from_writer() -> None:
    writer = pytest.importorskip("aptlayer.composefs.writer")
    payload = b"ab/" + b"c" * 60  # len("/" + payload) == 64
    assert len(b"/" + payload) % 4 == 0
    root = Node()
    root.children[b"f"] = Node(mode=0o100644, size=100000, payload=payload, digest=bytes(range(32)))
    out = io.BytesIO()
    writer.write_image(root, out)
    back = read_image(out.getvalue())
    assert back.children[b"f"].payload == payload
    assert back.children[b"f"].digest == bytes(range(32))
    assert image_objects(out.getvalue()) == [payload]


def _rewrite_shared_refs_absolute(data: bytearray) -> None:
    """Turn an image into the composefs-rs V2 addressing: xattr_blkaddr 0, refs absolute."""
    image = ImageView(bytes(data))
    base = image.xattr_start // 4
    for _depth, _name, _nid, ino in image.walk(None):
        if ino is None or not ino.xattr_size:
            continue
        body = ino.offset + ino.isize
        for i in range(data[body + 4]):
            ref_at = body + fmt.XATTR_BODY_HEADER_SIZE + 4 * i
            (ref,) = struct.unpack_from("<I", data, ref_at)
            struct.pack_into("<I", data, ref_at, ref + base)
    struct.pack_into("<I", data, fmt.EROFS_SUPER_OFFSET + 44, 0)


@pytest.mark.parametrize("version", [2, 7])
def test_any_composefs_version_and_absolute_shared_refs(vectors: Path, version: int) -> None:
    data = bytearray((vectors / "xattrs" / "image.cfs").read_bytes())
    expected = dump_bytes(read_image(bytes(data)))
    struct.pack_into("<I", data, 12, version)
    _rewrite_shared_refs_absolute(data)
    assert dump_bytes(read_image(bytes(data))) == expected


def test_lustre_prefix_is_decoded(vectors: Path) -> None:
    data = bytearray((vectors / "xattrs" / "image.cfs").read_bytes())
    suffix = b"root"
    needle = bytes((len(suffix), 1)) + struct.pack("<H", len(b"on-root")) + suffix + b"on-root"
    offset = data.find(needle)
    assert offset > 0
    data[offset + 1] = 5
    root = read_image(bytes(data))
    assert root.xattrs[b"lustre.root"] == b"on-root"
    assert b"user.root" not in root.xattrs


# --- malformed images ---------------------------------------------------------------------------


def _patched(data: bytes, offset: int, fmt_: str, value: int) -> bytes:
    out = bytearray(data)
    struct.pack_into(fmt_, out, offset, value)
    return bytes(out)


@pytest.fixture
def basic(vectors: Path) -> bytes:
    return (vectors / "ff-basic" / "image.cfs").read_bytes()


@pytest.mark.parametrize(
    ("offset", "fmt_", "value", "message"),
    [
        (0, "<I", 0x12345678, "composefs magic"),
        (4, "<I", 2, "header version"),
        (fmt.EROFS_SUPER_OFFSET, "<I", 0, "EROFS magic"),
        (fmt.EROFS_SUPER_OFFSET + 14, "<H", 0xFFFF, "outside the image"),
        (fmt.EROFS_SUPER_OFFSET + 40, "<I", 0xFFFFFFFF, "outside the image"),
        (fmt.EROFS_SUPER_OFFSET + 44, "<I", 0xFFFFFFFF, "outside the image"),
    ],
)
def test_bad_header_fields(basic: bytes, offset: int, fmt_: str, value: int, message: str) -> None:
    with pytest.raises(ImageFormatError, match=message):
        read_image(_patched(basic, offset, fmt_, value))
    with pytest.raises(ImageFormatError):
        image_objects(_patched(basic, offset, fmt_, value))


@pytest.mark.parametrize("size", [0, 1, 100, 1152, 4095])
def test_too_small(basic: bytes, size: int) -> None:
    with pytest.raises(ImageFormatError):
        read_image(basic[:size])


def test_truncated_everywhere(basic: bytes) -> None:
    for size in range(fmt.BLOCK_SIZE, len(basic), 512):
        try:
            read_image(basic[:size])
        except ImageFormatError:
            pass


def test_root_must_be_a_directory(basic: bytes) -> None:
    image = ImageView(basic)
    file_nid = next(nid for _d, _n, nid, ino in image.walk(None) if ino and ino.ftype == 0o100000)
    with pytest.raises(ImageFormatError, match="root"):
        read_image(_patched(basic, fmt.EROFS_SUPER_OFFSET + 14, "<H", file_nid))


def test_error_is_a_value_error_with_one_line() -> None:
    with pytest.raises(ValueError) as info:
        read_image(b"\0" * 8192)
    assert isinstance(info.value, ImageFormatError)
    assert "\n" not in str(info.value)


# --- upstream differential ----------------------------------------------------------------------


@pytest.mark.upstream
@pytest.mark.parametrize("name", VECTORS)
def test_matches_composefs_info(vectors: Path, composefs_info: str, name: str) -> None:
    image = vectors / name / "image.cfs"
    root = read_image(image)
    assert dump_bytes(root) == upstream(composefs_info, "dump", image).stdout
    assert ls_bytes(root) == upstream(composefs_info, "ls", image).stdout
    assert objects_bytes(root) == upstream(composefs_info, "objects", image).stdout


@pytest.mark.upstream
@pytest.mark.parametrize("name", ["ff-hardlinks", "hardlinks", "ff-basic", "xattrs"])
def test_filters_match_composefs_info(vectors: Path, composefs_info: str, name: str) -> None:
    """Filtering applies while reading: a link whose original is filtered out becomes the original."""
    image = vectors / name / "image.cfs"
    full = read_image(image)
    for keep in ([sorted(full.children)[-1]], sorted(full.children)[1:3]):
        args = [f"--filter={k.decode()}" for k in keep]
        root = read_image(image, filters=keep)
        assert dump_bytes(root) == upstream(composefs_info, *args, "dump", image).stdout
        assert ls_bytes(full, keep) == upstream(composefs_info, *args, "ls", image).stdout
        assert dump_bytes(full, keep) == dump_bytes(root)


def upstream_dumps() -> list[str]:
    """Upstream's own test dumps that mkcomposefs accepts (read from disk)."""
    if not UPSTREAM_TESTS.is_dir():
        return []
    return sorted(
        p.name
        for p in UPSTREAM_TESTS.iterdir()
        if p.name.endswith((".dump", ".dump.gz")) and not p.name.startswith("should-fail")
    )


@pytest.mark.upstream
@pytest.mark.parametrize("name", upstream_dumps())
def test_upstream_test_images_match_composefs_info(
    tmp_path: Path, upstream_tests: Path, composefs_info: str, mkcomposefs: str, name: str
) -> None:
    raw = (upstream_tests / name).read_bytes()
    source = tmp_path / "input.dump"
    source.write_bytes(gzip.decompress(raw) if name.endswith(".gz") else raw)
    image = tmp_path / "image.cfs"
    subprocess.run([mkcomposefs, "--from-file", source, image], check=True, capture_output=True)
    root = read_image(image)
    assert dump_bytes(root) == upstream(composefs_info, "dump", image).stdout
    assert ls_bytes(root) == upstream(composefs_info, "ls", image).stdout
    assert objects_bytes(root) == upstream(composefs_info, "objects", image).stdout


# --- read_path: one entry by path, links resolved inside the image ----------------------


def entry_facts(node: Node) -> tuple:
    node = node.resolve()
    return (node.mode, node.uid, node.gid, node.size, node.payload, node.content, node.digest,
            node.xattrs, sorted(node.children))


@pytest.mark.parametrize("name", VECTORS)
def test_read_path_finds_every_entry_as_read_image_has_it(vectors: Path, name: str) -> None:
    data = (vectors / name / "image.cfs").read_bytes()
    root = read_image(data)
    assert dump_bytes(read_path(data, b"/")) == dump_bytes(root)
    for path, node in root.walk():
        assert entry_facts(read_path(data, path, follow_symlinks=False)) == entry_facts(node), path
        if node.is_dir and not any(n.link is not None for _p, n in node.walk()):
            # without hard links (whose first occurrence may lie outside), the subtrees dump alike
            assert dump_bytes(read_path(data, path)) == dump_bytes(node), path


@pytest.fixture
def linked_image(tmp_path: Path) -> bytes:
    """An image full of symbolic links: inside, outside, relative, looping."""
    from aptlayer.composefs import build

    tree = tmp_path / "tree"
    (tree / "etc").mkdir(parents=True)
    (tree / "etc" / "passwd").write_bytes(b"the image's own passwd\n")
    (tree / "var" / "lib").mkdir(parents=True)
    (tree / "var" / "lib" / "data").write_bytes(b"x" * 100)
    links = {
        "up": "../../../../../../../etc/passwd",  # climbs past the root: stays in the image
        "abs": "/etc/passwd",
        "rel": "var/../var/lib/./data",
        "dirlink": "var/lib",
        "chain": "abs",
        "loop": "loop",
        "pingpong": "pong", "pong": "pingpong",
        "dangling": "/nowhere",
        "host": "/proc/self/status",  # exists on the host, not in the image
    }
    for name, target in links.items():
        (tree / name).symlink_to(target)
    return build.make_image(str(tree), digest_store=str(tmp_path / "objects")).image


@pytest.mark.parametrize("path,content", [
    (b"/up", b"the image's own passwd\n"),
    (b"/abs", b"the image's own passwd\n"),
    (b"chain", b"the image's own passwd\n"),
    (b"/dirlink/../../etc/passwd", b"the image's own passwd\n"),
    (b"//etc//./passwd", b"the image's own passwd\n"),
    (b"/../../etc/passwd", b"the image's own passwd\n"),
])
def test_read_path_resolves_links_inside_the_image(linked_image: bytes, path: bytes, content: bytes) -> None:
    node = read_path(linked_image, path)
    assert node is not None and node.is_reg and node.content == content


def test_read_path_follows_links_on_the_way_and_at_the_end_on_request(linked_image: bytes) -> None:
    data = read_path(linked_image, b"/rel")
    assert data.is_reg and data.size == 100 and data.payload is not None
    assert read_path(linked_image, b"/dirlink/data").payload == data.payload
    assert sorted(read_path(linked_image, b"/dirlink").children) == [b"data"]
    link = read_path(linked_image, b"/dirlink", follow_symlinks=False)
    assert link.is_lnk and link.payload == b"var/lib" and not link.children
    # a link on the way is always followed
    assert read_path(linked_image, b"/dirlink/data", follow_symlinks=False).payload == data.payload


@pytest.mark.parametrize("path", [b"/dangling", b"/host", b"/nothing", b"/etc/passwd/x",
                                  b"/etc/passwd/.", b"/up/x", b"/etc/" + b"n" * 300, b"/etc/a\0b"])
def test_read_path_gives_none_for_what_is_not_there(linked_image: bytes, path: bytes) -> None:
    assert read_path(linked_image, path) is None


@pytest.mark.parametrize("path", [b"/loop", b"/pingpong", b"/loop/x"])
def test_read_path_stops_at_link_loops(linked_image: bytes, path: bytes) -> None:
    with pytest.raises(SymlinkLoopError, match="symbolic links"):
        read_path(linked_image, path)
    assert read_path(linked_image, b"/loop", follow_symlinks=False).payload == b"loop"


def test_read_path_of_a_damaged_image_raises_format_errors(linked_image: bytes) -> None:
    for data in (b"", linked_image[:5000], b"\0" * 8192):
        with pytest.raises(ImageFormatError):
            read_path(data, b"/etc/passwd")


def test_read_path_skips_whiteout_stubs(vectors: Path) -> None:
    """The 00..ff stubs in an image's root are the writer's, not entries (read_image skips them too)."""
    data = (vectors / "devices" / "image.cfs").read_bytes()
    image = ImageView(data)
    stored = {name for name, _nid in image.dir_entries(image.inode(image.root_nid))}
    stubs = sorted({b"%02x" % i for i in range(256)} & stored - set(read_image(data).children))
    assert len(stubs) > 200, "the vector's root carries the stubs"
    for name in stubs:
        assert read_path(data, b"/" + name) is None


def test_read_root_is_the_root_of_read_image(vectors) -> None:
    from aptlayer.composefs.reader import read_root

    images = sorted(vectors.glob("*/image.cfs"))
    assert len(images) > 10
    for image in images:
        whole, root = read_image(image), read_root(image)
        assert (root.mode, root.uid, root.gid, root.mtime_sec, root.mtime_nsec, root.xattrs) == \
            (whole.mode, whole.uid, whole.gid, whole.mtime_sec, whole.mtime_nsec, whole.xattrs), image.parent.name
        assert not root.children
