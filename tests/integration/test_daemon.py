"""boxvold as a process: exclusivity, stale sockets, restart reconciliation, shutdown."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from pathlib import Path

import pytest

from tests.helpers import Daemon
from volumed.errors import NotFound, StorageError


def test_sigterm_exits_cleanly_and_removes_the_socket(home: Path, runtime_dir: Path) -> None:
    daemon = Daemon(home, runtime_dir)
    daemon.start()
    assert daemon.socket.exists()
    assert daemon.stop(signal.SIGTERM) == 0
    assert not daemon.socket.exists()
    daemon.start()
    assert daemon.stop(signal.SIGINT) == 0


def test_second_daemon_on_one_home_is_refused(daemon: Daemon, tmp_path: Path) -> None:
    other_runtime = Path(str(daemon.runtime_dir) + "-b")
    second = Daemon(daemon.home, other_runtime)
    try:
        with pytest.raises(AssertionError, match="already serves the home"):
            second.start()
    finally:
        shutil.rmtree(other_runtime, ignore_errors=True)
    assert second.process is not None
    assert second.process.returncode == 1
    assert daemon.client().health()["status"] == "ok"


def test_second_daemon_on_one_socket_is_refused(daemon: Daemon, tmp_path: Path) -> None:
    second = Daemon(tmp_path / "other" / "home", daemon.runtime_dir)
    with pytest.raises(AssertionError, match="another boxvold is answering"):
        second.start()
    assert second.process is not None
    assert second.process.returncode == 1
    assert daemon.client().health()["status"] == "ok"


def test_stale_socket_after_a_crash_is_replaced(home: Path, runtime_dir: Path) -> None:
    daemon = Daemon(home, runtime_dir)
    daemon.start()
    daemon.client().create_volume("survivor")
    daemon.stop(signal.SIGKILL)
    assert daemon.socket.exists()  # left behind by the crash
    daemon.start()
    try:
        assert daemon.client().get_volume("survivor")["name"] == "survivor"
    finally:
        assert daemon.stop() == 0


def test_restart_reconciles_registry_and_disk(home: Path, runtime_dir: Path) -> None:
    daemon = Daemon(home, runtime_dir)
    daemon.start()
    client = daemon.client()
    client.create_volume("lost")
    client.create_volume("kept")
    assert daemon.stop() == 0

    named = home / "volumes" / "named"
    os.rmdir(named / "lost")
    (named / "found").mkdir()
    (named / "found" / "data").write_text("hello")
    (named / "-bad").mkdir()

    daemon.start()
    try:
        health = client.health()
        actions = {(a["action"], a["key"]) for a in health["reconciled"]}
        assert actions == {
            ("recreated-empty", "lost"),
            ("adopted", "found"),
            ("quarantined", "-bad"),
        }
        assert client.get_volume("found")["labels"]["boxvol.adopted"]
        assert (named / "found" / "data").read_text() == "hello"
        assert sorted(v["name"] for v in client.list_volumes()) == ["found", "kept", "lost"]
        assert "reconcile action=adopted kind=named key=found" in daemon.log.read_text()
    finally:
        assert daemon.stop() == 0


def test_socket_group(home: Path, runtime_dir: Path) -> None:
    daemon = Daemon(home, runtime_dir)
    daemon.start("--socket-group", "daemon")
    try:
        import grp

        assert daemon.socket.stat().st_gid == grp.getgrnam("daemon").gr_gid
    finally:
        assert daemon.stop() == 0
    with pytest.raises(AssertionError, match="no group 'no-such-group'"):
        daemon.start("--socket-group", "no-such-group")
    assert not daemon.socket.exists()


def test_a_failed_request_is_one_log_line_and_a_5xx_names_its_code(daemon: Daemon) -> None:
    named = daemon.home / "volumes" / "named"
    offset = daemon.log_offset()
    subprocess.run(["chattr", "+i", str(named)], check=True)
    try:
        with pytest.raises(StorageError):
            daemon.client().create_volume("refused")
    finally:
        subprocess.run(["chattr", "-i", str(named)], check=True)
    with pytest.raises(NotFound):
        daemon.client().get_volume("nope")
    log = daemon.log_since(offset)
    failed = [line for line in log.splitlines() if "api request failed" in line]
    assert len(failed) == 2, log
    assert "ERROR" in failed[0] and "status=500 code=storage_error" in failed[0]
    assert "INFO" in failed[1] and "status=404 code=not_found" in failed[1]
    assert "Traceback" not in log, "a refused operation is not a bug: no traceback"
