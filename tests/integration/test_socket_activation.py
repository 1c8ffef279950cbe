"""Socket activation: boxvold takes the API listener it is handed (LISTEN_FDS), the first
client's request starts it and is answered, and a stop leaves the path to its owner.
``systemd-socket-activate`` plays systemd's part here; tests/systemd runs the real units."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

from tests.helpers import VENV_BIN, Daemon, boxvol
from volumed.activation import listen_fds


def test_listen_fds_are_ours_only() -> None:
    env = {"LISTEN_PID": "42", "LISTEN_FDS": "2"}
    assert listen_fds(env, 42) == [3, 4]
    assert listen_fds(env, 43) == []
    assert listen_fds({"LISTEN_PID": "42", "LISTEN_FDS": "x"}, 42) == []
    assert listen_fds({}, 42) == []


def test_the_first_request_starts_boxvold_on_its_inherited_socket(
    home: Path, runtime_dir: Path
) -> None:
    daemon = Daemon(home, runtime_dir)  # for its paths, environment and log only
    socket_path = runtime_dir / "boxvold.sock"
    home.parent.mkdir(parents=True, exist_ok=True)
    with daemon.log.open("ab") as log:
        activator = subprocess.Popen(
            [
                "systemd-socket-activate",
                "--listen",
                str(socket_path),
                "-E",
                "BOXVOL_RESERVE_SIZE=1M",
                str(VENV_BIN / "boxvold"),
                "--home",
                str(home),
                "--runtime-dir",
                str(runtime_dir),
            ],
            stdout=log,
            stderr=log,
        )
    try:
        deadline = time.monotonic() + 30
        while not socket_path.exists():
            assert time.monotonic() < deadline, "the activator never listened"
            time.sleep(0.02)
        assert "boxvold serving" not in daemon.log.read_text()  # nothing started yet
        first = boxvol(daemon, "ls")  # this connection starts boxvold, then is answered
        assert first.returncode == 0, first.stderr + daemon.log.read_text()
        assert "api socket inherited from systemd" in daemon.log.read_text()
        created = boxvol(daemon, "create", "activated")
        assert created.returncode == 0, created.stderr
    finally:
        activator.send_signal(signal.SIGTERM)  # it passes the signal to boxvold
        activator.wait(timeout=30)
    assert "boxvold stopping signal=SIGTERM" in daemon.log.read_text()
