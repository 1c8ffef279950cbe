"""Strict input: every malformed request gets a 4xx with the one JSON error shape and
changes nothing; no coercion of types; every text field refuses control, surrogate and
bidirectional-formatting characters; every list, map and string is bounded."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import httpx
import pytest

from volumed.locations import Layout


def error_of(response: httpx.Response, status: int = 422) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message"}
    error: dict[str, Any] = body["error"]
    return error


async def assert_nothing_created(api: httpx.AsyncClient, home: Path) -> None:
    assert (await api.get("/v1/volumes")).json()["volumes"] == []
    layout = Layout(str(home))
    assert os.listdir(layout.named) == [] and os.listdir(layout.anonymous) == []


UNSAFE = ["\ud800", "\x00", "\x1b[31m", "a\rb", "\x85", "\u202e", "\u2066", "\u200f", "\u2028"]


@pytest.mark.parametrize("bad", UNSAFE)
async def test_unsafe_characters_are_refused_in_volume_fields(
    api: httpx.AsyncClient, home: Path, bad: str
) -> None:
    for body in (
        {"name": "data", "labels": {"team": f"x{bad}"}},
        {"consumer": f"vm{bad}"},
        {"name": f"da{bad}ta"},
    ):
        response = await api.post(
            "/v1/volumes",
            content=_json_bytes(body),
            headers={"content-type": "application/json"},
        )
        assert error_of(response)["code"] == "invalid_argument", body
    await assert_nothing_created(api, home)


@pytest.mark.parametrize("bad", UNSAFE)
async def test_unsafe_characters_are_refused_in_export_fields(
    api: httpx.AsyncClient, bad: str
) -> None:
    await api.post("/v1/volumes", json={"name": "data"})
    for body in (
        {"volume": "data", "consumer": f"c{bad}"},
        {"volume": "data", "kind": "virtiofs", "consumer": {"vm": f"vm{bad}", "tag": "t"}},
        {"volume": "data", "kind": "virtiofs", "consumer": {"vm": "vm", "tag": f"t{bad}"}},
        {"volume": f"da{bad}ta"},
    ):
        response = await api.post(
            "/v1/exports", content=_json_bytes(body), headers={"content-type": "application/json"}
        )
        assert error_of(response)["code"] == "invalid_argument", body
    assert (await api.get("/v1/exports")).json()["exports"] == []


def _json_bytes(body: object) -> bytes:
    """JSON as a client can spell it, lone surrogates included (as \\uXXXX escapes):
    httpx's ``json=`` cannot encode them."""
    return json.dumps(body).encode()


async def test_no_type_is_coerced(api: httpx.AsyncClient, home: Path) -> None:
    await api.post("/v1/volumes", json={"name": "keep"})
    for prune in ({"all": "yes"}, {"all": 1}, {"all": "true"}, {"all": None}):
        assert error_of(await api.post("/v1/volumes/prune", json=prune))
    assert [v["name"] for v in (await api.get("/v1/volumes")).json()["volumes"]] == ["keep"]
    for create in (
        {"name": "a", "size_bytes": "1073741824"},
        {"name": "a", "size_bytes": 1073741824.0},
        {"name": "a", "inode_limit": True},
        {"name": "a", "labels": {"k": 1}},
        {"name": "a", "labels": []},
    ):
        assert error_of(await api.post("/v1/volumes", json=create))["code"] == "invalid_argument"
    for export in (
        {"volume": "keep", "owner": {"uid": 1.0, "gid": 0}},
        {"volume": "keep", "owner": {"uid": "1", "gid": 0}},
        {"volume": "keep", "read_only": "false"},
        {"volume": "keep", "read_only": 0},
    ):
        assert error_of(await api.post("/v1/exports", json=export))["code"] == "invalid_argument"
    for query in ({"in_use": "yes"}, {"dangling": "1"}, {"in_use": "True"}):
        assert error_of(await api.get("/v1/volumes", params=query))
    assert error_of(await api.delete("/v1/volumes/keep", params={"force": "1"}))
    assert [v["name"] for v in (await api.get("/v1/volumes")).json()["volumes"]] == ["keep"]
    assert (await api.get("/v1/exports")).json()["exports"] == []


async def test_bounds_on_lists_maps_and_strings(api: httpx.AsyncClient, home: Path) -> None:
    filters: list[tuple[str, str | int | float | bool | None]] = [
        ("label", f"k{i}") for i in range(1000)
    ]
    response = await api.get("/v1/volumes", params=filters)
    assert "label" in error_of(response)["message"]
    labels = {f"k{i}": "v" for i in range(65)}
    assert (
        "too many labels"
        in error_of(await api.post("/v1/volumes", json={"labels": labels}))["message"]
    )
    long_value = {"labels": {"k": "v" * 4097}}
    assert error_of(await api.post("/v1/volumes", json=long_value))
    assert error_of(await api.post("/v1/volumes", json={"consumer": "c" * 257}))
    assert error_of(await api.get("/v1/volumes/" + "a" * 65))
    assert error_of(await api.get("/v1/volumes", params={"name": "n" * 65}))
    assert error_of(await api.get("/v1/exports/" + "A" * 27))
    await assert_nothing_created(api, home)


@pytest.mark.parametrize(
    "content",
    [
        b'{"name": "\xff\xfe"}',  # not UTF-8
        b"[" * 1000 + b"]" * 1000,  # 1,000 levels deep
        b'{"size_bytes": ' + b"9" * 5000 + b"}",  # 5,000 digits
        b"{" + b" " * 100_000 + b"}x",
    ],
)
async def test_malformed_json_is_422_with_the_json_error(
    api: httpx.AsyncClient, home: Path, content: bytes
) -> None:
    response = await api.post(
        "/v1/volumes", content=content, headers={"content-type": "application/json"}
    )
    assert error_of(response)["code"] == "invalid_argument"
    await assert_nothing_created(api, home)
