"""The audit line: fields a hostile value cannot forge, targets and results."""

from __future__ import annotations

import shlex

from volumed.audit import answer_fields, audit_line, quoted, request_target
from volumed.http_server import PeerCredentials


def test_the_line_names_who_what_and_how_it_ended() -> None:
    line = audit_line(
        PeerCredentials(pid=42, uid=1000, gid=100),
        "POST",
        "/v1/volumes",
        "data",
        201,
        "ok",
        created="01ABC",
    )
    assert line == (
        "audit uid=1000 gid=100 pid=42 op=POST route=/v1/volumes target=data status=201 "
        "result=ok created=01ABC"
    )
    assert "uid=- gid=- pid=-" in audit_line(None, "DELETE", "/x", None, 404, "not_found")


def test_a_hostile_value_cannot_forge_a_field_or_a_line() -> None:
    hostile = 'x" result=ok uid=0\nforged line \u202e'
    line = audit_line(None, "DELETE", "/v1/volumes/{ref:path}", hostile, 422, "invalid_argument")
    assert "\n" not in line and "\u202e" not in line
    fields = dict(part.split("=", 1) for part in shlex.split(line)[1:])
    assert fields["result"] == "invalid_argument"
    assert fields["uid"] == "-"
    assert quoted("") == '""'
    assert quoted("a b") == '"a b"'
    assert quoted(None) == "-"


def test_target_from_path_then_body() -> None:
    assert request_target({"ref": "data"}, b'{"name": "other"}') == "data"
    assert request_target({"export_id": "01E"}, b"") == "01E"
    assert request_target({}, b'{"name": "data"}') == "data"
    assert request_target({}, b'{"volume": "data", "kind": "fuse"}') == "data"
    assert request_target({}, b"") is None
    assert request_target({}, b"not json") is None


def test_result_is_ok_or_the_error_code() -> None:
    assert answer_fields(201, b'{"id": "01X"}') == ("ok", "01X")
    assert answer_fields(200, b'{"id": "01X"}') == ("ok", None)
    assert answer_fields(409, b'{"error": {"code": "conflict", "message": "m"}}') == (
        "conflict",
        None,
    )
    assert answer_fields(500, b"") == ("http_500", None)
