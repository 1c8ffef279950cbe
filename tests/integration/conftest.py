"""Integration fixtures: a real boxvold, in this process (on the test's trio loop) or as a
subprocess driven through its socket and the real ``boxvol`` binary."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest
import trio

from tests.helpers import Daemon, stop_cleanly
from volumed.client import Client
from volumed.daemon import DaemonConfig, serve_boxvold


@pytest.fixture
async def api(
    nursery: trio.Nursery, home: Path, runtime_dir: Path
) -> AsyncIterator[httpx.AsyncClient]:
    """An httpx client of a boxvold served on the test's own trio loop."""
    config = DaemonConfig(home=str(home), runtime_dir=str(runtime_dir), reserve_bytes=1 << 20)
    socket_path = await nursery.start(serve_boxvold, config)
    transport = httpx.AsyncHTTPTransport(uds=socket_path)
    async with httpx.AsyncClient(transport=transport, base_url="http://boxvold") as client:
        yield client


@pytest.fixture
def daemon(home: Path, runtime_dir: Path) -> Iterator[Daemon]:
    """A running boxvold subprocess on the test's own home and runtime dir."""
    daemon = Daemon(home, runtime_dir)
    daemon.start()
    try:
        yield daemon
    finally:
        # An export in use outlives a clean stop by design (volumed.stop_policy); a test
        # leaves nothing behind, so its exports go first.
        stop_cleanly(daemon)


@pytest.fixture
def client(daemon: Daemon) -> Client:
    """A client of the test's boxvold."""
    return daemon.client()
