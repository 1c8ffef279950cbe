"""Helpers shared by every test layer (imported, never taken from another test's conftest)."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

from volumed.client import Client

REPO = Path(__file__).resolve().parent.parent
VENV_BIN = REPO / ".venv" / "bin"


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


def boxvol(
    daemon: Daemon | None, *args: str, stdin: str = "", env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run the ``boxvol`` CLI against ``daemon`` (or the given environment)."""
    run_env = env if env is not None else (daemon.env if daemon else dict(os.environ))
    return subprocess.run(
        [str(VENV_BIN / "boxvol"), *args],
        input=stdin,
        capture_output=True,
        text=True,
        env=run_env,
        timeout=60,
        check=False,
    )


def ok(daemon: Daemon, *args: str) -> str:
    """``boxvol ARGS`` that must succeed; its stdout."""
    result = boxvol(daemon, *args)
    assert result.returncode == 0, result.stderr
    return result.stdout
