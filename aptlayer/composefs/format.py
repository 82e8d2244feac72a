"""On-disk constants and struct layouts of a composefs image.

A composefs image is a 32-byte composefs header at offset 0, followed by an
EROFS filesystem whose superblock sits at offset 1024. Everything is
little-endian. This module holds only the layouts; ``writer.py`` and
``reader.py`` import it.
"""

from __future__ import annotations

import stat
import struct

# --- composefs header (offset 0) ---------------------------------------------

COMPOSEFS_MAGIC = 0xD078629A
#: the header's own format version; always 1
COMPOSEFS_HEADER_VERSION = 1
#: the largest ``composefs_version`` the C writer produces
COMPOSEFS_MAX_VERSION = 1
#: header flag: some inode carries a POSIX ACL xattr
COMPOSEFS_FLAGS_HAS_ACL = 1 << 0
#: magic, version, flags, composefs_version, 4 unused words
COMPOSEFS_HEADER = struct.Struct("<IIII16x")
COMPOSEFS_HEADER_SIZE = COMPOSEFS_HEADER.size  # 32

# --- EROFS superblock (offset 1024) ------------------------------------------

EROFS_MAGIC = 0xE0F5E1E2
EROFS_SUPER_OFFSET = 1024
BLOCK_BITS = 12
BLOCK_SIZE = 1 << BLOCK_BITS
#: inodes are addressed in 32-byte slots: nid = byte offset / 32
INODE_SLOT_BITS = 5
INODE_SLOT_SIZE = 1 << INODE_SLOT_BITS

EROFS_FEATURE_COMPAT_SB_CHKSUM = 0x1
EROFS_FEATURE_COMPAT_MTIME = 0x2
EROFS_FEATURE_COMPAT_XATTR_FILTER = 0x4
#: the compat features a composefs image sets
COMPOSEFS_FEATURE_COMPAT = EROFS_FEATURE_COMPAT_MTIME | EROFS_FEATURE_COMPAT_XATTR_FILTER

#: magic, checksum, feature_compat, blkszbits, sb_extslots, root_nid, inos,
#: build_time, build_time_nsec, blocks, meta_blkaddr, xattr_blkaddr, uuid,
#: volume_name, feature_incompat, then 44 bytes of fields composefs leaves 0
SUPERBLOCK = struct.Struct("<IIIBBHQQIIII16s16sI44x")
SUPERBLOCK_SIZE = SUPERBLOCK.size  # 128
#: first byte after the superblock; the inode table starts here
INODES_START = EROFS_SUPER_OFFSET + SUPERBLOCK_SIZE  # 1152

# --- inodes -------------------------------------------------------------------

LAYOUT_FLAT_PLAIN = 0
LAYOUT_FLAT_INLINE = 2
LAYOUT_CHUNK_BASED = 4
#: i_format bit 0: 0 = compact (32 bytes), 1 = extended (64 bytes)
INODE_FORMAT_EXTENDED = 1
#: i_format bits 1..3 hold the layout
INODE_LAYOUT_MASK = 0x7 << 1

#: i_format, i_xattr_icount, i_mode, i_nlink, i_size, reserved, i_u, i_ino,
#: i_uid, i_gid, reserved
INODE_COMPACT = struct.Struct("<HHHHI4xIIHH4x")
#: i_format, i_xattr_icount, i_mode, reserved, i_size, i_u, i_ino, i_uid,
#: i_gid, i_mtime (signed), i_mtime_nsec, i_nlink, 16 reserved bytes
INODE_EXTENDED = struct.Struct("<HHH2xQIIIIqII16x")
INODE_COMPACT_SIZE = INODE_COMPACT.size  # 32
INODE_EXTENDED_SIZE = INODE_EXTENDED.size  # 64

#: limits that decide whether a compact inode can hold a value
COMPACT_MAX_ID = 0xFFFF
COMPACT_MAX_NLINK = 0xFFFF
COMPACT_MAX_SIZE = 0xFFFFFFFF

# --- chunk-based (external) files ---------------------------------------------

#: the chunk format in i_u is ``chunkbits - BLOCK_BITS``; it fits in 5 bits
CHUNK_FORMAT_BLKBITS_MASK = 0x1F
CHUNK_MAX_BITS = BLOCK_BITS + 31
#: a block-map entry for a chunk with no backing block
NULL_ADDR = 0xFFFFFFFF
CHUNK_ENTRY = struct.Struct("<I")
CHUNK_ENTRY_SIZE = CHUNK_ENTRY.size  # 4
#: the largest number of chunks an external file may have
MAX_CHUNKS = BLOCK_SIZE // CHUNK_ENTRY_SIZE  # 1024

# --- directories --------------------------------------------------------------

#: nid (u64), nameoff (u16), file_type (u8), reserved (u8)
DIRENT = struct.Struct("<QHBx")
DIRENT_SIZE = DIRENT.size  # 12

FT_UNKNOWN = 0
FT_REG_FILE = 1
FT_DIR = 2
FT_CHRDEV = 3
FT_BLKDEV = 4
FT_FIFO = 5
FT_SOCK = 6
FT_SYMLINK = 7

#: st_mode file type (``stat.S_IFMT``) -> dirent file type
FT_FROM_MODE = {
    stat.S_IFREG: FT_REG_FILE,
    stat.S_IFDIR: FT_DIR,
    stat.S_IFCHR: FT_CHRDEV,
    stat.S_IFBLK: FT_BLKDEV,
    stat.S_IFIFO: FT_FIFO,
    stat.S_IFSOCK: FT_SOCK,
    stat.S_IFLNK: FT_SYMLINK,
}

#: the longest name of a directory entry
MAX_NAME_LEN = 255

# --- limits of the node model (what mkcomposefs accepts) ----------------------

#: the longest inline content of a regular file
MAX_INLINE_CONTENT = 5000
#: a symlink target must be shorter than this (PATH_MAX)
MAX_SYMLINK_LEN = 4096
MAX_XATTR_NAME_LEN = 255
MAX_XATTR_VALUE_LEN = 65535
#: per-inode xattr budget: XATTR_BUDGET_BASE + sum of
#: (XATTR_BUDGET_PER_ENTRY + len(name) + len(value)) must not exceed this
MAX_XATTR_BUDGET = 32767
XATTR_BUDGET_BASE = 12
XATTR_BUDGET_PER_ENTRY = 7

# --- extended attributes ------------------------------------------------------

#: h_name_filter (u32), h_shared_count (u8), 7 reserved bytes
XATTR_BODY_HEADER = struct.Struct("<IB7x")
XATTR_BODY_HEADER_SIZE = XATTR_BODY_HEADER.size  # 12
#: e_name_len (u8), e_name_index (u8), e_value_size (u16)
XATTR_ENTRY = struct.Struct("<BBH")
XATTR_ENTRY_SIZE = XATTR_ENTRY.size  # 4
#: a shared xattr reference (a 4-byte word index)
XATTR_SHARED_REF = struct.Struct("<I")
#: xattr entries and the body are 4-byte aligned
XATTR_ALIGN = 4

#: name index -> prefix, as a reader must decode them (0 = no prefix)
XATTR_PREFIXES: dict[int, bytes] = {
    0: b"",
    1: b"user.",
    2: b"system.posix_acl_access",
    3: b"system.posix_acl_default",
    4: b"trusted.",
    5: b"lustre.",
    6: b"security.",
}
#: the prefixes the writer tries, in order; ``lustre.`` is never used
XATTR_WRITER_PREFIXES: tuple[tuple[int, bytes], ...] = (
    (1, b"user."),
    (2, b"system.posix_acl_access"),
    (3, b"system.posix_acl_default"),
    (4, b"trusted."),
    (6, b"security."),
)
#: seed of the xxHash32 used for the per-inode xattr name filter (plus index)
XATTR_FILTER_SEED = 0x25BBE08F
XATTR_FILTER_BITS = 32
#: the most shared references a single inode gets; further shared pairs go inline
XATTR_MAX_SHARED_REFS = 128
#: the ACL xattr names that set ``COMPOSEFS_FLAGS_HAS_ACL``
ACL_XATTRS = (b"system.posix_acl_access", b"system.posix_acl_default")

# --- overlayfs xattrs that composefs writes and strips ------------------------

OVERLAY_PREFIX = b"trusted.overlay."
OVERLAY_ESCAPED_PREFIX = b"trusted.overlay.overlay."
USER_OVERLAY_PREFIX = b"user.overlay."
XATTR_METACOPY = b"trusted.overlay.metacopy"
XATTR_REDIRECT = b"trusted.overlay.redirect"
XATTR_OPAQUE = b"trusted.overlay.opaque"
XATTR_ESCAPED_WHITEOUT = b"trusted.overlay.overlay.whiteout"
XATTR_ESCAPED_WHITEOUTS = b"trusted.overlay.overlay.whiteouts"
XATTR_ESCAPED_OPAQUE = b"trusted.overlay.overlay.opaque"
XATTR_USER_WHITEOUT = b"user.overlay.whiteout"
XATTR_USER_WHITEOUTS = b"user.overlay.whiteouts"
XATTR_USER_OPAQUE = b"user.overlay.opaque"
#: metacopy value header: version 0, length 36, flags 0, hash algorithm SHA-256
METACOPY_HEADER = bytes((0, 36, 0, 1))
METACOPY_SIZE = 36
DIGEST_SIZE = 32

#: number of whiteout stubs (names ``00``..``ff``) added to the root
WHITEOUT_STUBS = 256
