"""Creates racing each other through the real API stay all-or-nothing."""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

import httpx
import trio

from volumed.locations import Layout


async def test_fifty_creates_of_one_name_give_one_volume(
    api: httpx.AsyncClient, home: Path
) -> None:
    statuses: list[int] = []

    async def create() -> None:
        response = await api.post("/v1/volumes", json={"name": "contested"})
        statuses.append(response.status_code)
        if response.status_code == 409:
            assert response.json()["error"]["code"] == "already_exists"

    async with trio.open_nursery() as nursery:
        for _ in range(50):
            nursery.start_soon(create)

    assert sorted(statuses) == [201] + [409] * 49
    assert os.listdir(Layout(str(home)).named) == ["contested"]
    assert len((await api.get("/v1/volumes")).json()["volumes"]) == 1


async def test_two_hundred_distinct_creates(api: httpx.AsyncClient, home: Path) -> None:
    names = [f"vol-{i:03d}" for i in range(200)]
    created: list[str] = []

    async def create(name: str) -> None:
        response = await api.post("/v1/volumes", json={"name": name})
        assert response.status_code == 201, response.text
        created.append(response.json()["id"])

    async with trio.open_nursery() as nursery:
        for name in names:
            nursery.start_soon(create, name)

    layout = Layout(str(home))
    assert sorted(os.listdir(layout.named)) == names
    listed = (await api.get("/v1/volumes")).json()["volumes"]
    assert sorted(v["name"] for v in listed) == names
    assert sorted(v["id"] for v in listed) == sorted(created)
    # The registry on disk (read through a second connection) agrees.
    db = sqlite3.connect(layout.registry)
    try:
        rows = db.execute("SELECT name FROM volumes ORDER BY name").fetchall()
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    finally:
        db.close()
    assert [name for (name,) in rows] == names


async def test_creates_and_removes_interleaved(api: httpx.AsyncClient, home: Path) -> None:
    async def churn(i: int) -> None:
        name = f"churn-{i}"
        assert (await api.post("/v1/volumes", json={"name": name})).status_code == 201
        assert (await api.delete(f"/v1/volumes/{name}")).status_code == 200

    async with trio.open_nursery() as nursery:
        for i in range(40):
            nursery.start_soon(churn, i)
    layout = Layout(str(home))
    assert os.listdir(layout.named) == []
    assert os.listdir(layout.trash) == []
    assert (await api.get("/v1/volumes")).json()["volumes"] == []
