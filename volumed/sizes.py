"""Size and count arguments (``10G``, ``512M``, ``100000``): parsing and printing; pure."""

from __future__ import annotations

import re

from volumed.errors import InvalidArgument

_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40, "p": 1 << 50}
_SIZE = re.compile(r"(\d+)\s*([kmgtp]?)(?:i?b)?\Z", re.IGNORECASE)
SIZE_RULE = (
    "a size is a whole number of bytes with an optional binary unit K, M, G, T or P "
    "(for example 512M or 10G)"
)
#: The smallest sized volume: below it an ext4 image's own metadata and journal leave too
#: little room to be worth a volume (docs/storage.md).
MIN_SIZE_BYTES = 8 << 20
MAX_SIZE_BYTES = 1 << 60
MIN_INODES = 16
MAX_INODES = 1 << 32


def parse_bytes(text: str) -> int:
    """Bytes meant by ``10G``, ``512M``, ``0``..., with no volume limits; InvalidArgument."""
    match = _SIZE.match(text.strip())
    if not match:
        raise InvalidArgument(f"invalid size {text!r}: {SIZE_RULE}")
    return int(match.group(1)) * _UNITS[match.group(2).lower()]


def parse_size(text: str) -> int:
    """Bytes meant by a volume size argument such as ``10G``; raises InvalidArgument."""
    return check_size(parse_bytes(text))


def check_size(size_bytes: int) -> int:
    """Return ``size_bytes`` if it is within the limits a volume can have."""
    if not MIN_SIZE_BYTES <= size_bytes <= MAX_SIZE_BYTES:
        raise InvalidArgument(
            f"invalid size {size_bytes} bytes: a volume size is at least "
            f"{format_size(MIN_SIZE_BYTES)} "
            f"and at most {MAX_SIZE_BYTES} bytes"
        )
    return size_bytes


def check_fits(what: str, size_bytes: int, free_bytes: int, reserve_bytes: int) -> None:
    """Refuse ``size_bytes`` more than the host can hold: its free space minus boxvold's
    reserve (images are sparse, but a cap the disk cannot back is a promise not kept)."""
    room = free_bytes - reserve_bytes
    if size_bytes > room:
        raise InvalidArgument(
            f"cannot {what} {format_size(size_bytes)}: the host has {format_size(free_bytes)} "
            f"free and boxvold keeps {format_size(reserve_bytes)} of it in reserve, so at most "
            f"{format_size(max(room, 0))} fits; give a smaller --size or free space first"
        )


#: A sized volume has at most one inode per this many bytes of its size (ext4 cannot make
#: inode tables denser than its smallest block).
MIN_BYTES_PER_INODE = 1024


def check_inodes_fit(size_bytes: int, count: int) -> None:
    """Refuse more inodes than an image of ``size_bytes`` can hold."""
    most = size_bytes // MIN_BYTES_PER_INODE
    if count > most:
        raise InvalidArgument(
            f"invalid inode limit {count}: a {format_size(size_bytes)} volume holds at most "
            f"{most} inodes (one per KiB); give fewer inodes or a larger --size"
        )


def check_inodes(count: int) -> int:
    """Return ``count`` if it is a sensible inode limit."""
    if not MIN_INODES <= count <= MAX_INODES:
        raise InvalidArgument(
            f"invalid inode limit {count}: give a whole number from {MIN_INODES} to {MAX_INODES}"
        )
    return count


def parse_inodes(text: str) -> int:
    """Inode limit meant by an argument such as ``100000``."""
    if not text.isdigit():
        raise InvalidArgument(f"invalid inode limit {text!r}: give a whole number, e.g. 100000")
    return check_inodes(int(text))


def format_size(size: int) -> str:
    """A short human size (``1.5G``, ``12K``, ``0B``), as ``df`` tables show it."""
    value = float(size)
    for unit in ("B", "K", "M", "G", "T"):
        if value < 1024 or unit == "T":
            return f"{value:.0f}{unit}" if unit == "B" or value >= 10 else f"{value:.1f}{unit}"
        value /= 1024
    raise AssertionError("unreachable")
