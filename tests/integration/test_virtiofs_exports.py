"""virtio-fs exports at the process level: the socket boxvold binds, the virtiofsd it
spawns, re-arms and stops, and re-adoption across a restart. (Guests: tests/vm.)"""

from __future__ import annotations

import grp
import os
import signal
import socket
import stat
from pathlib import Path

import pytest

from guest.processes import command_lines
from tests.helpers import Daemon, wait_for
from volumed.errors import Conflict, InUse, InvalidArgument
from volumed.fs.fuse_mount import mounted_at
from volumed.vhost import connected_at


def virtiofsd_pids() -> dict[int, str]:
    return command_lines(program="virtiofsd")


def test_socket_process_and_teardown(daemon: Daemon) -> None:
    client = daemon.client()
    client.create_volume("data")
    before = set(virtiofsd_pids())
    export = client.create_export("data", kind="virtiofs", consumer={"vm": "vm1", "tag": "data"})
    assert export["via"] == "direct" and export["mountpoint"] is None
    socket_path = Path(export["socket"])
    assert socket_path.parent == daemon.runtime_dir / "vhost"
    mode = socket_path.stat().st_mode
    assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o660
    assert socket_path.stat().st_gid == grp.getgrnam("kvm").gr_gid
    assert stat.S_IMODE(socket_path.parent.stat().st_mode) == 0o750
    pid = export["virtiofsd"]["pid"]
    virtiofsd_log = socket_path.with_suffix(".log")
    assert pid in set(virtiofsd_pids()) - before, (
        daemon.log.read_text(),
        virtiofsd_log.read_text() if virtiofsd_log.exists() else "(no virtiofsd log)",
        Path(f"/proc/{pid}/cmdline").read_bytes() if Path(f"/proc/{pid}").exists() else "gone",
    )
    command = virtiofsd_pids()[pid]
    assert "modcaps=-mknod" in command or "--modcaps=-mknod" in command
    assert str(daemon.home / "volumes" / "named" / "data") in command
    assert client.get_volume("data")["in_use"] is True
    with pytest.raises(InUse):
        client.remove_volume("data")
    client.remove_export(export["id"])
    assert pid not in virtiofsd_pids()
    assert not socket_path.exists()
    assert set(virtiofsd_pids()) <= before


def test_read_only_goes_through_the_fuse_view(daemon: Daemon) -> None:
    client = daemon.client()
    client.create_volume("data")
    export = client.create_export(
        "data", kind="virtiofs", read_only=True, consumer={"vm": "vm1", "tag": "ro"}
    )
    assert export["via"] == "fuse"
    assert export["mountpoint"] and Path(export["mountpoint"]).is_dir()
    assert export["mountpoint"] in virtiofsd_pids()[export["virtiofsd"]["pid"]]
    with pytest.raises(OSError):
        (Path(export["mountpoint"]) / "x").write_text("no")
    client.remove_volume("data", force=True)
    assert export["virtiofsd"]["pid"] not in virtiofsd_pids()


def test_bad_requests(daemon: Daemon) -> None:
    client = daemon.client()
    client.create_volume("data")
    client.create_export("data", kind="virtiofs", consumer={"vm": "vm1", "tag": "t"})
    with pytest.raises(Conflict, match="already has an export tagged 't'"):
        client.create_export("data", kind="virtiofs", consumer={"vm": "vm1", "tag": "t"})
    for consumer, needle in [
        (None, 'needs "consumer"'),
        ({"vm": "vm1", "tag": "x" * 37}, "invalid tag"),
        ({"vm": "vm1", "tag": "a/b"}, "invalid tag"),
        ({"vm": "", "tag": "ok"}, "invalid VM name"),
    ]:
        with pytest.raises(InvalidArgument, match=needle):
            client.create_export("data", kind="virtiofs", consumer=consumer)
    with pytest.raises(InvalidArgument, match="via 'fuse'"):
        client.create_export(
            "data", kind="virtiofs", owner=(1, 1), consumer={"vm": "vm1", "tag": "o"}
        )
    with pytest.raises(InvalidArgument, match="kind 'virtiofs'"):
        client.create_export("data", via="direct")
    assert len(client.list_exports()) == 1


def test_a_dead_virtiofsd_is_rearmed(daemon: Daemon) -> None:
    client = daemon.client()
    client.create_volume("data")
    export = client.create_export("data", kind="virtiofs", consumer={"vm": "vm1", "tag": "d"})
    first = export["virtiofsd"]["pid"]
    os.kill(first, signal.SIGKILL)
    wait_for(
        "virtiofsd to be re-armed",
        lambda: client.get_export(export["id"])["virtiofsd"]["pid"] not in (None, first),
    )
    status = client.get_export(export["id"])["virtiofsd"]
    assert status["restarts"] == 1
    assert status["last_exit"] == -signal.SIGKILL
    assert status["pid"] in virtiofsd_pids()
    assert "virtiofsd crashed" in daemon.log.read_text()
    client.remove_export(export["id"])
    assert status["pid"] not in virtiofsd_pids()


def test_a_virtiofsd_crashing_at_once_is_backed_off_with_its_socket_closed(
    home: Path, runtime_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A virtiofsd that dies as it starts (a stand-in found on PATH, beside the real crash
    # above): while boxvold backs off, a VMM connecting must be refused, not queued.
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "virtiofsd").write_text("#!/bin/sh\nexit 3\n")
    (bindir / "virtiofsd").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bindir}:{os.environ['PATH']}")
    daemon = Daemon(home, runtime_dir)
    daemon.start()
    try:
        client = daemon.client()
        client.create_volume("data")
        export = client.create_export("data", kind="virtiofs", consumer={"vm": "vm1", "tag": "c"})
        wait_for(
            "the crashing virtiofsd to be restarted",
            lambda: client.get_export(export["id"])["virtiofsd"]["restarts"] >= 4,
        )

        def refused() -> bool:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as vmm:
                vmm.settimeout(1.0)
                try:
                    vmm.connect(export["socket"])
                except (FileNotFoundError, ConnectionRefusedError):
                    return True
                except (TimeoutError, BlockingIOError):  # queued in a full backlog: not refused
                    return False
            return False

        wait_for("a VMM refused while boxvold backs off", refused)
        assert "virtiofsd backing off" in daemon.log.read_text()
        assert client.get_export(export["id"])["virtiofsd"]["last_exit"] == 3
        client.remove_export(export["id"])
        assert not Path(export["socket"]).exists()
    finally:
        assert daemon.stop() == 0


def test_virtiofsd_in_use_survives_a_restart_and_is_readopted(
    home: Path, runtime_dir: Path
) -> None:
    """A guest connected to a share keeps it while boxvold restarts, served directly or
    through a FUSE view (whose server stays too); the next boxvold re-adopts both."""
    daemon = Daemon(home, runtime_dir)
    daemon.start()
    client = daemon.client()
    client.create_volume("data")
    direct = client.create_export("data", kind="virtiofs", consumer={"vm": "vm1", "tag": "a"})
    via_fuse = client.create_export(
        "data", kind="virtiofs", via="fuse", consumer={"vm": "vm1", "tag": "b"}
    )
    pids = {e["id"]: e["virtiofsd"]["pid"] for e in (direct, via_fuse)}
    server = client.get_export(via_fuse["id"])["server"]["pid"]
    vmms = [socket.socket(socket.AF_UNIX) for _ in range(2)]  # stand-ins for QEMU
    for vmm, export in zip(vmms, (direct, via_fuse), strict=True):
        vmm.connect(export["socket"])
    try:
        _wait_connected(direct["socket"], via_fuse["socket"])
        assert daemon.stop() == 0
        assert set(pids.values()) <= set(virtiofsd_pids())
        assert Path(f"/proc/{server}").exists() and mounted_at(via_fuse["mountpoint"])
        daemon.start()
        log = daemon.log.read_text()
        for export_id, pid in pids.items():
            assert f"virtiofsd re-adopted export={export_id} pid={pid}" in log
            assert client.get_export(export_id)["virtiofsd"]["pid"] == pid
        assert client.get_export(via_fuse["id"])["server"]["pid"] == server
    finally:
        for vmm in vmms:
            vmm.close()
    try:
        client.remove_volume("data", force=True)
        assert not set(pids.values()) & set(virtiofsd_pids())
    finally:
        assert daemon.stop() == 0


def _wait_connected(*paths: str) -> None:
    def connected() -> bool:
        with open("/proc/net/unix") as table:
            text = table.read()
        return all(connected_at(text, path) for path in paths)

    wait_for("virtiofsd to accept the connections", connected)


def test_an_idle_virtiofsd_on_a_lost_fuse_view_is_replaced_after_a_crash(daemon: Daemon) -> None:
    # The FUSE view's server dies too while boxvold is down (a view that survives is
    # re-adopted with its virtiofsd: tests/vm/test_daemon_restart.py). No guest is connected:
    # the virtiofsd left on the dead view would hand the next boot a dead share, so the
    # restarted boxvold replaces it.
    client = daemon.client()
    client.create_volume("data")
    export = client.create_export(
        "data", kind="virtiofs", via="fuse", consumer={"vm": "vm1", "tag": "f"}
    )
    old = export["virtiofsd"]["pid"]
    # Once set up (it has entered the FUSE view) it waits for a VMM; a virtiofsd killed
    # with boxvold before that point just exits.
    virtiofsd_log = Path(export["socket"]).with_suffix(".log")
    wait_for(
        "virtiofsd to become ready",
        lambda: "Waiting for vhost-user socket connection" in virtiofsd_log.read_text(),
    )
    server = export["server"]["pid"]
    assert daemon.stop(signal.SIGKILL) == -signal.SIGKILL
    assert old in virtiofsd_pids()
    os.kill(server, signal.SIGKILL)
    wait_for("the server to die", lambda: not Path(f"/proc/{server}").exists())
    offset = daemon.log_offset()
    daemon.start()
    wait_for("the idle virtiofsd to stop", lambda: old not in virtiofsd_pids())
    status = client.get_export(export["id"])["virtiofsd"]
    assert status["pid"] in virtiofsd_pids() and status["pid"] != old
    assert status["source_lost"] is False
    logged = daemon.log_since(offset)
    assert f"export={export['id']} pid={old} serves a FUSE view that died" in logged
    client.remove_export(export["id"])
    assert status["pid"] not in virtiofsd_pids()


def test_cli_lists_virtiofs_exports(daemon: Daemon) -> None:
    import subprocess

    from tests.helpers import VENV_BIN

    client = daemon.client()
    client.create_volume("data")
    export = client.create_export("data", kind="virtiofs", consumer={"vm": "vm1", "tag": "t"})
    result = subprocess.run(
        [str(VENV_BIN / "boxvol"), "export", "ls"],
        env=daemon.env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    row = result.stdout.splitlines()[1]
    assert export["id"] in row and "vm=vm1 tag=t" in row and export["socket"] in row


def test_a_via_fuse_share_is_rearmed_when_its_server_is_replaced(daemon: Daemon) -> None:
    """virtiofsd serving an export's FUSE view is replaced by a fresh one on the new mount
    when the view's server dies and comes back (a replacement, not a crash)."""
    client = daemon.client()
    client.create_volume("data")
    export = client.create_export(
        "data", kind="virtiofs", via="fuse", consumer={"vm": "vm1", "tag": "t"}
    )
    server, virtiofsd = export["server"]["pid"], export["virtiofsd"]["pid"]
    assert export["mountpoint"] in virtiofsd_pids()[virtiofsd]
    os.kill(server, signal.SIGKILL)

    def replaced() -> bool:
        now = client.get_export(export["id"])
        return now["server"]["pid"] not in (None, server) and now["virtiofsd"]["pid"] not in (
            None,
            virtiofsd,
        )

    wait_for("a fresh server and a fresh virtiofsd", replaced)
    now = client.get_export(export["id"])
    # (The old virtiofsd may have died of its lost source before it was told to go: then
    # it counts as a crash. Either way a fresh one serves the new mount.)
    assert now["server"]["restarts"] == 1
    assert export["mountpoint"] in virtiofsd_pids()[now["virtiofsd"]["pid"]]
    assert virtiofsd not in virtiofsd_pids()
    client.remove_export(export["id"])
