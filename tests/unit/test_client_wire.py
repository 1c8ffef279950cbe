"""The CLI's HTTP/1.1 response parsing (the exchange itself is tested against the server)."""

from __future__ import annotations

import pytest

from volumed.client import encode_query, parse_response, quote
from volumed.errors import ProtocolError


def test_content_length_body() -> None:
    raw = b"HTTP/1.1 201 Created\r\ncontent-length: 2\r\ncontent-type: x\r\n\r\n{}"
    assert parse_response(raw) == (201, b"{}")


def test_chunked_body() -> None:
    raw = (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2;x=y\r\nde\r\n0\r\n\r\n"
    )
    assert parse_response(raw) == (200, b"abcde")


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n",
        b"SMTP ready\r\n\r\n",
        b"HTTP/1.1 2xx OK\r\n\r\n",
        b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nshort",
    ],
)
def test_malformed_answers(raw: bytes) -> None:
    with pytest.raises(ProtocolError):
        parse_response(raw)


def test_quoting() -> None:
    assert quote("a b/c=é") == "a%20b%2Fc%3D%C3%A9"
    assert encode_query([("label", "team=db"), ("kind", "named")]) == (
        "?label=team%3Ddb&kind=named"
    )
    assert encode_query([]) == ""
