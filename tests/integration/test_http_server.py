"""volumed.http_server on a real unix socket with a toy ASGI app: the queue for the app, and
paths that skip it."""

from __future__ import annotations

from collections.abc import MutableMapping
from pathlib import Path
from typing import Any

import httpx
import trio
import trio.testing

from volumed.http_server import HttpServer, ServerLimits
from volumed.unix_sockets import bind_private


async def test_an_unqueued_path_answers_while_the_app_is_full(
    nursery: trio.Nursery, runtime_dir: Path
) -> None:
    release = trio.Event()
    entered = 0

    async def app(scope: MutableMapping[str, Any], receive: Any, send: Any) -> None:
        nonlocal entered
        if scope["path"] == "/slow":
            entered += 1
            await release.wait()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": scope["path"].encode()})

    path = str(runtime_dir / "t.sock")
    listener = bind_private(path, 0o600)
    listener.listen(64)
    server = HttpServer(app, ServerLimits(max_active_requests=2), unqueued=frozenset({"/health"}))
    await nursery.start(server.serve, listener)
    transport = httpx.AsyncHTTPTransport(uds=path)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        answers: list[str] = []

        async def slow() -> None:
            answers.append((await client.get("/slow")).text)

        async with trio.open_nursery() as requests:
            for _ in range(5):
                requests.start_soon(slow)
            while entered < 2:
                await trio.sleep(0.01)
            await trio.testing.wait_all_tasks_blocked()
            assert entered == 2, "the other three wait outside the app"
            with trio.fail_after(10):  # queued behind /slow, it would never come
                assert (await client.get("/health")).text == "/health"
            release.set()
        assert answers == ["/slow"] * 5
    listener.close()
