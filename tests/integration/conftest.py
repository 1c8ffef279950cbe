"""Integration fixtures: a real boxvold, in this process (on the test's trio loop) or as a
subprocess driven through its socket and the real ``boxvol`` binary."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest
import trio

from tests.conftest import VENV_BIN
from volumed.client import Client
from volumed.daemon import DaemonConfig, serve_boxvold


@pytest.fixture
async def api(
    nursery: trio.Nursery, home: Path, runtime_dir: Path
) -> AsyncIterator[httpx.AsyncClient]:
    """An httpx client of a boxvold served on the test's own trio loop."""
    config = DaemonConfig(home=str(home), runtime_dir=str(runtime_dir))
    socket_path = await nursery.start(serve_boxvold, config)
    transport = httpx.AsyncHTTPTransport(uds=socket_path)
    async with httpx.AsyncClient(transport=transport, base_url="http://boxvold") as client:
        yield client


class Daemon:
    """A boxvold subprocess and how to reach it."""

    def __init__(self, home: Path, runtime_dir: Path, log: Path | None = None) -> None:
        self.home = home
        self.runtime_dir = runtime_dir
        self.socket = runtime_dir / "boxvold.sock"
        self.log = log or home.parent / "boxvold.log"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def env(self) -> dict[str, str]:
        """Environment in which the ``boxvol`` CLI talks to this daemon."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("BOXVOL_")}
        env["BOXVOL_SOCKET"] = str(self.socket)
        return env

    def start(self, *extra: str) -> None:
        """Start boxvold and wait until this very process says it is serving."""
        self.home.parent.mkdir(parents=True, exist_ok=True)
        self.log.parent.mkdir(parents=True, exist_ok=True)
        offset = self.log_offset()
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                [
                    str(VENV_BIN / "boxvold"),
                    "--home",
                    str(self.home),
                    "--runtime-dir",
                    str(self.runtime_dir),
                    *extra,
                ],
                stdout=log,
                stderr=log,
            )
        deadline = time.monotonic() + 30
        while True:
            if "boxvold serving" in self.log_since(offset):
                break
            if self.process.poll() is not None:
                raise AssertionError(f"boxvold exited early:\n{self.log.read_text()}")
            if time.monotonic() > deadline:
                self.process.kill()
                self.process.wait()
                raise AssertionError(f"boxvold did not start in 30 s:\n{self.log.read_text()}")
            time.sleep(0.02)
        Client(str(self.socket), timeout=5).health()

    def log_offset(self) -> int:
        """Where the log ends now (for ``log_since``)."""
        return self.log.stat().st_size if self.log.exists() else 0

    def log_since(self, offset: int) -> str:
        """What the log gained after ``offset`` (from ``log_offset``)."""
        with self.log.open("rb") as log:
            log.seek(offset)
            return log.read().decode(errors="replace")

    def stop(self, sig: int = signal.SIGTERM) -> int:
        """Stop boxvold with ``sig`` and return its exit status."""
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(sig)
        try:
            status = self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            status = self.process.wait()
        self.process = None
        return status

    def client(self) -> Client:
        """A client of this daemon."""
        return Client(str(self.socket))


@pytest.fixture
def daemon(home: Path, runtime_dir: Path) -> Iterator[Daemon]:
    """A running boxvold subprocess on the test's own home and runtime dir."""
    daemon = Daemon(home, runtime_dir)
    daemon.start()
    try:
        yield daemon
    finally:
        if daemon.process is not None:
            # A virtiofsd serving a volume directly outlives boxvold by design; a test leaves
            # nothing behind, so its exports go first.
            client = daemon.client()
            for export in client.list_exports():
                client.remove_export(export["id"])
            status = daemon.stop()
            assert status == 0, daemon.log.read_text()
