"""What a clean stop of boxvold keeps: the exports in use (a process with files open in a
FUSE view, a VMM connected to a virtio-fs socket) keep serving and are re-adopted by the next
boxvold; everything else is stopped and unmounted, leaving nothing behind."""

from __future__ import annotations

import os
import socket
from pathlib import Path

from tests.helpers import Daemon, wait_for
from volumed.fs.fuse_mount import mounted_at, mounts_under
from volumed.stop_policy import holders
from volumed.vhost import connected_at


def _alive(pid: int) -> bool:
    return Path(f"/proc/{pid}").exists()


def _wait_gone(pid: int) -> None:
    wait_for(f"pid {pid} to end", lambda: not _alive(pid))


def test_holders_are_processes_under_the_mountpoint_but_its_own() -> None:
    opened = [(10, "/run/b/fs/A/x"), (11, "/run/b/fs/AB/x"), (12, "/run/b/fs/A"), (13, "/")]
    assert holders("/run/b/fs/A", opened, frozenset()) == [10, 12]
    assert holders("/run/b/fs/A/", opened, frozenset({10})) == [12]


def test_a_fuse_export_in_use_keeps_serving_through_a_restart(
    home: Path, runtime_dir: Path
) -> None:
    daemon = Daemon(home, runtime_dir)
    daemon.start()
    client = daemon.client()
    client.create_volume("busy")
    client.create_volume("idle")
    busy = client.create_export("busy")
    idle = client.create_export("idle")
    busy_server = client.get_export(busy["id"])["server"]["pid"]
    idle_server = client.get_export(idle["id"])["server"]["pid"]
    with open(Path(busy["mountpoint"]) / "log", "w") as held:
        held.write("before\n")
        held.flush()
        offset = daemon.log_offset()
        assert daemon.stop() == 0
        stopped_log = daemon.log_since(offset)
        assert f"export left serving at stop export={busy['id']}" in stopped_log
        assert f"{os.getpid()} (" in stopped_log  # names who uses it
        # The one in use serves on while boxvold is down; the idle one is gone.
        assert _alive(busy_server) and mounted_at(busy["mountpoint"])
        held.write("while boxvold is down\n")
        held.flush()
        _wait_gone(idle_server)
        assert not mounted_at(idle["mountpoint"])
        daemon.start()
        assert client.get_export(busy["id"])["server"]["pid"] == busy_server  # re-adopted
        held.write("after\n")
        held.flush()
    try:
        log = (Path(busy["mountpoint"]) / "log").read_text()
        assert log == "before\nwhile boxvold is down\nafter\n"  # no byte lost
        assert client.get_export(idle["id"])["server"]["pid"] not in (None, idle_server)
    finally:
        assert daemon.stop() == 0  # nobody uses anything now: all of it goes
    assert not _alive(busy_server)
    assert mounts_under(str(runtime_dir)) == []


def test_a_virtiofs_export_with_a_vmm_connected_is_kept_and_an_idle_one_is_not(
    home: Path, runtime_dir: Path
) -> None:
    daemon = Daemon(home, runtime_dir)
    daemon.start()
    client = daemon.client()
    client.create_volume("shared")
    used = client.create_export("shared", kind="virtiofs", consumer={"vm": "vm1", "tag": "a"})
    idle = client.create_export("shared", kind="virtiofs", consumer={"vm": "vm2", "tag": "b"})
    used_pid = client.get_export(used["id"])["virtiofsd"]["pid"]
    idle_pid = client.get_export(idle["id"])["virtiofsd"]["pid"]
    vmm = socket.socket(socket.AF_UNIX)  # stands in for QEMU's vhost-user connection
    vmm.connect(used["socket"])
    try:
        wait_for("virtiofsd to accept the connection", lambda: _connected(used["socket"]))
        offset = daemon.log_offset()
        assert daemon.stop() == 0
        assert "reason=a VMM is connected to its vhost-user socket" in daemon.log_since(offset)
        assert _alive(used_pid)
        _wait_gone(idle_pid)
    finally:
        vmm.close()  # the "guest" goes: this virtiofsd's one session ends
    _wait_gone(used_pid)
    daemon.start()
    try:
        for export in (used, idle):
            assert client.get_export(export["id"])["virtiofsd"]["pid"]  # armed again
    finally:
        for export in (used, idle):
            client.remove_export(export["id"])
        assert daemon.stop() == 0


def _connected(socket_path: str) -> bool:
    with open("/proc/net/unix") as table:
        return connected_at(table.read(), socket_path)
