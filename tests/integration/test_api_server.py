"""boxvold's HTTP server against clients that misbehave: half-sent and slow bodies, idle
connections by the thousand, oversized and malformed requests. After each, the API answers
and a FUSE export still serves, and boxvold is still the same process."""

from __future__ import annotations

import json
import resource
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from tests.helpers import Daemon
from volumed.daemon import DaemonConfig, serve_boxvold
from volumed.http_server import ServerLimits


@pytest.fixture
def exported(daemon: Daemon) -> Iterator[Path]:
    """A FUSE export of a fresh volume on the test's daemon: its mountpoint."""
    client = daemon.client()
    client.create_volume("data")
    export = client.create_export("data")
    yield Path(export["mountpoint"])


def assert_still_serving(daemon: Daemon, mountpoint: Path, name: str) -> None:
    """The same boxvold answers the API, and its export reads back what is written."""
    assert daemon.process is not None and daemon.process.poll() is None, daemon.log.read_text()
    assert daemon.client().health()["status"] == "ok"
    (mountpoint / name).write_text(name)
    assert (mountpoint / name).read_text() == name


def connect(path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    # Blocking while connecting: a full backlog makes a non-blocking connect fail with
    # EAGAIN, where a blocking one waits for the server to accept.
    sock.connect(str(path))
    sock.settimeout(30)
    return sock


HALF_SENT = (
    b"POST /v1/volumes HTTP/1.1\r\nHost: boxvold\r\nContent-Type: application/json\r\n"
    b'Content-Length: 10\r\n\r\n{"na'
)


def test_a_half_sent_body_then_close(daemon: Daemon, exported: Path) -> None:
    for _ in range(5):
        sock = connect(daemon.socket)
        sock.sendall(HALF_SENT)
        sock.close()
    assert_still_serving(daemon, exported, "after-one")
    inspected = daemon.client().get_volume("data")
    del inspected["usage"]  # measured for one volume, absent in listings
    assert daemon.client().list_volumes() == [inspected]


def test_200_half_sent_bodies_closed_at_once(daemon: Daemon, exported: Path) -> None:
    socks = [connect(daemon.socket) for _ in range(200)]
    for sock in socks:
        sock.sendall(HALF_SENT)
    barrier = threading.Barrier(len(socks))

    def close(sock: socket.socket) -> None:
        barrier.wait()
        sock.close()

    threads = [threading.Thread(target=close, args=(sock,)) for sock in socks]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert_still_serving(daemon, exported, "after-200")


def _raise_fd_limit(wanted: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(wanted, hard), hard))


def test_2000_idle_connections_do_not_starve_the_api(daemon: Daemon, exported: Path) -> None:
    _raise_fd_limit(2600)
    idle = [connect(daemon.socket) for _ in range(2000)]
    try:
        assert_still_serving(daemon, exported, "after-idle")
        # The oldest idle connections made room: the server closed them.
        idle[0].settimeout(10)
        assert idle[0].recv(1) == b""
    finally:
        for sock in idle:
            sock.close()
    assert_still_serving(daemon, exported, "after-idle-closed")


def exchange(path: Path, request: bytes) -> tuple[int, dict[str, Any]]:
    """Send raw bytes; the status and JSON body of the answer (read until the server closes)."""
    sock = connect(path)
    try:
        try:
            sock.sendall(request)
        except BrokenPipeError:
            pass  # answered and closed before the whole request was sent (a 413)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    finally:
        sock.close()
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), json.loads(body)


def test_a_body_over_the_bound_is_refused_with_413(daemon: Daemon) -> None:
    status, body = exchange(
        daemon.socket,
        b"POST /v1/volumes HTTP/1.1\r\nHost: b\r\nContent-Type: application/json\r\n"
        b"Content-Length: 1073741824\r\n\r\n{",
    )
    assert status == 413
    assert body["error"]["code"] == "payload_too_large"
    big = b"{" + b" " * (2 << 20) + b"}"
    status, body = exchange(
        daemon.socket,
        b"POST /v1/volumes HTTP/1.1\r\nHost: b\r\nContent-Type: application/json\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n"
        + f"{len(big):x}\r\n".encode()
        + big
        + b"\r\n0\r\n\r\n",
    )
    assert status == 413
    assert daemon.client().list_volumes() == []


def test_malformed_http_gets_a_json_400(daemon: Daemon) -> None:
    status, body = exchange(daemon.socket, b"GET /v1/health HTTP/1.1\r\nno colon here\r\n\r\n")
    assert status == 400
    assert body["error"]["code"] == "bad_request"
    assert daemon.client().health()["status"] == "ok"


async def test_a_slow_body_is_cut_off_and_others_are_served(
    nursery: trio.Nursery, home: Path, runtime_dir: Path
) -> None:
    limits = ServerLimits(head_timeout=2, body_timeout=2)
    config = DaemonConfig(
        home=str(home), runtime_dir=str(runtime_dir), limits=limits, reserve_bytes=1 << 20
    )
    socket_path = await nursery.start(serve_boxvold, config)
    slow = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    await slow.connect(socket_path)
    await slow.send(
        b"POST /v1/volumes HTTP/1.1\r\nHost: b\r\nContent-Type: application/json\r\n"
        b"Content-Length: 100\r\n\r\n{"
    )
    transport = httpx.AsyncHTTPTransport(uds=socket_path)
    async with httpx.AsyncClient(transport=transport, base_url="http://boxvold") as client:
        answer = b""
        with trio.fail_after(30):
            while True:
                # A byte now and then, never the whole body: the deadline is for all of it.
                try:
                    await slow.send(b" ")
                except OSError:
                    pass
                assert (await client.get("/v1/health")).status_code == 200
                with trio.move_on_after(0.5):
                    answer += await slow.recv(65536)
                if b"\r\n\r\n" in answer:
                    break
    slow.close()
    assert answer.startswith(b"HTTP/1.1 408 ")
    assert json.loads(answer.partition(b"\r\n\r\n")[2])["error"]["code"] == "request_timeout"
