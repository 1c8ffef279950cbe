"""The HTTP API of a real boxvold on its unix socket, driven by httpx."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any

import httpx
import pytest

from volumed.locations import Layout
from volumed.schemas import HOST_PATH_FIELDS


def error_of(response: httpx.Response) -> dict[str, Any]:
    body = response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"code", "message"}
    error: dict[str, Any] = body["error"]
    return error


async def test_socket_mode(api: httpx.AsyncClient, runtime_dir: Path) -> None:
    mode = os.stat(runtime_dir / "boxvold.sock").st_mode
    assert stat.S_ISSOCK(mode)
    assert stat.S_IMODE(mode) == 0o660


async def test_create_get_list_delete(api: httpx.AsyncClient, home: Path) -> None:
    created = await api.post(
        "/v1/volumes",
        json={
            "name": "data",
            "labels": {"team": "db"},
            "size_bytes": 64 << 20,
            "inode_limit": 1000,
        },
    )
    assert created.status_code == 201, created.text
    volume = created.json()
    assert volume["name"] == "data"
    assert volume["kind"] == "named"
    assert volume["in_use"] is False
    assert not any("path" in key or "mount" in key for key in volume)
    assert (home / "volumes" / "named" / "data").is_dir()

    anon = (await api.post("/v1/volumes", json={"consumer": "vm:web"})).json()
    assert anon["kind"] == "anonymous"
    assert anon["consumer"] == "vm:web"
    assert (home / "volumes" / "anonymous" / anon["id"]).is_dir()

    for ref in ("data", volume["id"], volume["id"].lower()):
        got = await api.get(f"/v1/volumes/{ref}")
        assert got.status_code == 200
        inspected = got.json()
        usage = inspected.pop("usage")
        assert inspected == volume
        # A sized volume is its own ext4 image: about its size, nearly empty.
        assert usage["image"]["size_bytes"] > 60 << 20
        assert usage["image"]["total_inodes"] >= 1000
        assert usage["bytes"] == usage["image"]["used_bytes"] < 1 << 20

    listing = (await api.get("/v1/volumes")).json()["volumes"]
    assert [v["id"] for v in listing] == [volume["id"], anon["id"]]
    named = (await api.get("/v1/volumes", params={"kind": "named"})).json()["volumes"]
    assert [v["id"] for v in named] == [volume["id"]]
    by_label = (await api.get("/v1/volumes", params={"label": "team=db"})).json()["volumes"]
    assert [v["id"] for v in by_label] == [volume["id"]]
    dangling = (await api.get("/v1/volumes", params={"dangling": "true"})).json()["volumes"]
    assert len(dangling) == 2

    removed = await api.delete("/v1/volumes/data")
    assert removed.status_code == 200
    assert removed.json() == {"removed": {"id": volume["id"], "name": "data", "kind": "named"}}
    assert not (home / "volumes" / "named" / "data").exists()
    missing = await api.get("/v1/volumes/data")
    assert missing.status_code == 404
    assert error_of(missing)["code"] == "not_found"


async def test_duplicate_name_is_409(api: httpx.AsyncClient) -> None:
    assert (await api.post("/v1/volumes", json={"name": "data"})).status_code == 201
    again = await api.post("/v1/volumes", json={"name": "data"})
    assert again.status_code == 409
    assert error_of(again)["code"] == "already_exists"


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ({"name": "../x"}, "invalid volume name"),
        ({"name": "a b"}, "invalid volume name"),
        ({"name": 5}, "invalid name 5"),
        ({"labels": {"bad key": "v"}}, "label key"),
        ({"size_bytes": 10}, "at least 8.0M"),
        ({"bogus": 1}, "unknown field 'bogus'"),
    ],
)
async def test_invalid_create_is_422_and_changes_nothing(
    api: httpx.AsyncClient, home: Path, body: dict[str, Any], needle: str
) -> None:
    response = await api.post("/v1/volumes", json=body)
    assert response.status_code == 422
    assert needle in error_of(response)["message"]
    assert (await api.get("/v1/volumes")).json()["volumes"] == []
    layout = Layout(str(home))
    assert os.listdir(layout.named) == [] and os.listdir(layout.anonymous) == []


@pytest.mark.parametrize("field", sorted(HOST_PATH_FIELDS))
async def test_host_path_fields_are_refused_by_name(api: httpx.AsyncClient, field: str) -> None:
    response = await api.post("/v1/volumes", json={"name": "data", field: "/etc"})
    assert response.status_code == 422
    error = error_of(response)
    assert error["code"] == "host_path_refused"
    assert repr(field) in error["message"]
    assert "referenced by name or id" in error["message"]
    assert (await api.get("/v1/volumes")).json()["volumes"] == []


async def test_host_path_fields_refused_everywhere(api: httpx.AsyncClient) -> None:
    upper = await api.post("/v1/volumes", json={"Host_Path": "/srv"})
    assert error_of(upper)["code"] == "host_path_refused"
    prune = await api.post("/v1/volumes/prune", json={"mountpoint": "/"})
    assert error_of(prune)["code"] == "host_path_refused"
    query = await api.get("/v1/volumes", params={"path": "/etc"})
    assert query.status_code == 422
    assert error_of(query)["code"] == "host_path_refused"
    by_path = await api.get("/v1/volumes/..%2Fetc")
    assert by_path.status_code == 422
    assert error_of(by_path)["code"] == "host_path_refused"


async def test_unknown_query_and_bad_json(api: httpx.AsyncClient) -> None:
    response = await api.get("/v1/volumes", params={"colour": "red"})
    assert response.status_code == 422
    assert "unknown query parameter 'colour'" in error_of(response)["message"]
    bad = await api.post(
        "/v1/volumes", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert bad.status_code == 422
    assert error_of(bad)["code"] == "invalid_argument"
    assert (await api.get("/v1/volumes", params={"kind": "odd"})).status_code == 422


async def test_unknown_endpoint(api: httpx.AsyncClient) -> None:
    response = await api.get("/v1/nothing")
    assert response.status_code == 404
    assert "no endpoint GET /v1/nothing" in error_of(response)["message"]
    assert (await api.put("/v1/volumes")).status_code == 405


async def test_prune_and_df(api: httpx.AsyncClient, home: Path) -> None:
    await api.post("/v1/volumes", json={"name": "keep"})
    anon = (await api.post("/v1/volumes", json={})).json()
    (home / "volumes" / "anonymous" / anon["id"] / "blob").write_bytes(b"x" * 100_000)

    df = (await api.get("/v1/system/df")).json()
    by_id = {row["id"]: row for row in df["volumes"]}
    assert by_id[anon["id"]]["bytes"] >= 100_000
    assert by_id[anon["id"]]["inodes"] == 2
    assert df["totals"]["volumes"] == 2
    assert df["totals"]["bytes"] == sum(row["bytes"] for row in df["volumes"])
    assert df["host"]["free_bytes"] > 0

    pruned = (await api.post("/v1/volumes/prune", json={})).json()
    assert [v["id"] for v in pruned["removed"]] == [anon["id"]]
    assert pruned["reclaimed_bytes"] >= 100_000
    everything = (await api.post("/v1/volumes/prune", json={"all": True})).json()
    assert [v["name"] for v in everything["removed"]] == ["keep"]


async def test_health_version_and_openapi(api: httpx.AsyncClient) -> None:
    health = (await api.get("/v1/health")).json()
    assert health == {"status": "ok", "volumes": 0, "reconciled": []}
    version = (await api.get("/v1/version")).json()
    assert version["api_version"] == "v1"
    served = (await api.get("/v1/openapi.json")).json()
    checked_in = json.loads((Path(__file__).parents[2] / "docs" / "openapi.json").read_text())
    assert served == checked_in


async def test_empty_bodies_take_defaults(api: httpx.AsyncClient) -> None:
    created = await api.post("/v1/volumes")
    assert created.status_code == 201, created.text
    assert created.json()["kind"] == "anonymous"
    pruned = await api.post("/v1/volumes/prune")
    assert pruned.status_code == 200
    assert [v["id"] for v in pruned.json()["removed"]] == [created.json()["id"]]
    form = await api.post(
        "/v1/volumes",
        content=b"name=x",
        headers={"content-type": "application/x-www-form-urlencoded"},
    )
    assert form.status_code == 422
    assert "Content-Type: application/json" in error_of(form)["message"]
