"""Size and inode arguments."""

from __future__ import annotations

import pytest

from volumed.errors import InvalidArgument
from volumed.sizes import check_fits, format_size, parse_bytes, parse_inodes, parse_size


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("10G", 10 << 30),
        ("10g", 10 << 30),
        ("512M", 512 << 20),
        ("512MiB", 512 << 20),
        ("1T", 1 << 40),
        ("8388608", 8 << 20),
        ("16384K", 16 << 20),
    ],
)
def test_parse_size(text: str, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "G", "10X", "-1G", "1.5G", "10 G B", "1K", "0", "4M"])
def test_bad_sizes_are_refused(text: str) -> None:
    with pytest.raises(InvalidArgument, match="size"):
        parse_size(text)


def test_inodes() -> None:
    assert parse_inodes("100000") == 100000
    for bad in ("", "-5", "1e6", "3"):
        with pytest.raises(InvalidArgument, match="inode"):
            parse_inodes(bad)


def test_format_size() -> None:
    assert format_size(0) == "0B"
    assert format_size(4096) == "4.0K"
    assert format_size(15 << 20) == "15M"
    assert format_size(3 << 40) == "3.0T"


def test_parse_bytes_takes_zero_and_small_sizes() -> None:
    assert parse_bytes("0") == 0
    assert parse_bytes("1M") == 1 << 20


def test_check_fits_names_both_figures() -> None:
    check_fits("create a volume of", 64 << 20, 200 << 20, 64 << 20)
    with pytest.raises(InvalidArgument) as caught:
        check_fits("create a volume of", 100 << 20, 150 << 20, 64 << 20)
    message = caught.value.message
    assert "150M free" in message
    assert "64M of it in reserve" in message
    assert "at most 86M fits" in message
