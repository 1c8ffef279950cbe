"""``boxvol gc`` on a real boxvold: every kind of leftover is found (with its size) by a dry
run that changes nothing, then reclaimed, with orphan data quarantined and everything live
(a FUSE export, a direct virtio-fs export and its virtiofsd, a sized volume) untouched."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
from pathlib import Path

from tests.helpers import Daemon, ok
from volumed.fs.fuse_mount import mounted_at
from volumed.virtiofsd import find_virtiofsd

GHOST_ID = "01HZX4J3M8ZKQ6W9V2T7N5R1BC"


def _plant_leftovers(daemon: Daemon) -> dict[str, Path]:
    """One leftover of each kind boxvol can lose track of; what each is, by kind."""
    home, runtime = daemon.home, daemon.runtime_dir
    ghost = home / "volumes" / "named" / "ghost"
    ghost.mkdir()
    (ghost / "data").write_bytes(b"g" * (1 << 20))
    image = home / "images" / f"{GHOST_ID}.ext4"
    image.write_bytes(b"i" * 8192)
    ok(daemon, "create", "lost")
    shutil.rmtree(home / "volumes" / "named" / "lost")
    trash = home / "trash" / GHOST_ID
    trash.mkdir()
    (trash / "junk").write_bytes(b"t" * 4096)
    stale_socket = runtime / "vhost" / f"{GHOST_ID}.sock"
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(stale_socket))
    stale_pidfile = runtime / "servers" / f"{GHOST_ID}.pid"
    stale_pidfile.write_text("999999\n")
    stale_mount = runtime / "fs" / GHOST_ID
    stale_mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "none", str(stale_mount)], check=True)
    return {
        "orphan-directory": ghost,
        "orphan-image": image,
        "trash": trash,
        "stale-socket": stale_socket,
        "stray-server": stale_pidfile,
        "stale-mount": stale_mount,
    }


def test_gc_finds_and_reclaims_every_kind_and_nothing_live(daemon: Daemon) -> None:
    client = daemon.client()
    ok(daemon, "create", "live")
    ok(daemon, "create", "capped", "--size", "16M")
    fuse = client.create_export("live")
    (Path(fuse["mountpoint"]) / "kept").write_text("live data")
    direct = client.create_export("live", kind="virtiofs", consumer={"vm": "vm1", "tag": "t"})
    serving = client.get_export(direct["id"])["virtiofsd"]["pid"]
    planted = _plant_leftovers(daemon)
    stray = subprocess.Popen(
        [
            find_virtiofsd().path,
            f"--socket-path={daemon.runtime_dir}/stray.sock",
            "-o",
            f"source={daemon.home}/volumes/named/live",
        ],
        stderr=subprocess.DEVNULL,
    )
    try:
        dry = json.loads(ok(daemon, "gc", "--dry-run", "--format", "json"))
        kinds = {f["kind"] for f in dry["findings"]}
        assert kinds == {*planted, "row-without-data", "stray-virtiofsd", "stale-mountpoint"}
        sizes = {f["kind"]: f["bytes"] for f in dry["findings"]}
        assert sizes["orphan-directory"] >= 1 << 20 and sizes["orphan-image"] >= 8192
        assert sizes["trash"] >= 4096
        [virtiofsd] = [f for f in dry["findings"] if f["kind"] == "stray-virtiofsd"]
        assert virtiofsd["what"] == str(stray.pid)
        # A dry run changes nothing.
        assert all(path.exists() for path in planted.values())
        assert mounted_at(str(planted["stale-mount"])) and stray.poll() is None
        assert {v["name"] for v in client.list_volumes()} == {"live", "capped", "lost"}

        table = ok(daemon, "gc")
        assert table.splitlines()[0].split() == ["KIND", "WHAT", "SIZE", "ACTION"]
        assert "orphan data is quarantined, never deleted" in table
        assert stray.wait(timeout=30) is not None
    finally:
        if stray.poll() is None:
            stray.kill()
            stray.wait()
    assert not any(path.exists() for path in planted.values())
    assert not mounted_at(str(planted["stale-mount"]))
    assert {v["name"] for v in client.list_volumes()} == {"live", "capped"}
    quarantined = sorted(p.name for p in (daemon.home / "quarantine").iterdir())
    assert any(name.startswith("named-ghost-") for name in quarantined)
    assert any(name.startswith(f"image-{GHOST_ID}.ext4-") for name in quarantined)
    [ghost] = (daemon.home / "quarantine").glob("named-ghost-*")
    assert (ghost / "data").read_bytes() == b"g" * (1 << 20)  # data is never deleted

    # Everything live is as it was.
    assert (Path(fuse["mountpoint"]) / "kept").read_text() == "live data"
    assert client.get_export(direct["id"])["virtiofsd"]["pid"] == serving
    assert os.path.exists(f"/proc/{serving}")
    assert mounted_at(str(daemon.home / "volumes" / "named" / "capped"))
    assert ok(daemon, "gc") == "nothing to reclaim\n"
