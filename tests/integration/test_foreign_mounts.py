"""A mount boxvold did not make over a volume's directory (e.g. root's ``mount --bind``) is
refused by every path that reaches volume data, and removal changes nothing while it is there.

These use real bind mounts (the tests run as root) and always unmount in a ``finally``.
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import trio

from tests.helpers import Daemon, boxvol, ok
from volumed.errors import ForeignMount
from volumed.gate import open_volume_directory, volume_directory
from volumed.locations import Layout
from volumed.model import Volume
from volumed.mounts import fdinfo_mount_id, find_mount, parse_mountinfo


def mount_bind(source: Path, target: Path) -> int:
    """``mount --bind source target``; the new mount's id."""
    subprocess.run(["mount", "--bind", str(source), str(target)], check=True, timeout=30)
    fd = os.open(target, os.O_PATH | os.O_CLOEXEC)
    try:
        return fdinfo_mount_id(Path(f"/proc/self/fdinfo/{fd}").read_text())
    finally:
        os.close(fd)


def unmount(mount_id: int) -> None:
    """Unmount the mount ``mount_id`` wherever it is now (code that fails may have carried it
    along with a renamed directory). If it is busy (boxvold still holds an fd in it), detach
    it lazily so that nothing is left behind, and fail."""
    entry = find_mount(parse_mountinfo(Path("/proc/self/mountinfo").read_text()), mount_id)
    if entry is None:
        raise AssertionError(f"mount {mount_id} vanished: someone else unmounted it")
    result = subprocess.run(
        ["umount", entry.mount_point], capture_output=True, text=True, timeout=30, check=False
    )
    if result.returncode != 0:
        subprocess.run(["umount", "--lazy", entry.mount_point], check=True, timeout=30)
        raise AssertionError(f"umount {entry.mount_point} failed: {result.stderr}")


@contextlib.contextmanager
def bind_mount(source: Path, target: Path) -> Iterator[int]:
    """A bind mount for the ``with`` block; its mount id. Blocking: only for tests whose
    boxvold runs in another process (or not at all)."""
    mount_id = mount_bind(source, target)
    try:
        yield mount_id
    finally:
        unmount(mount_id)


def foreign_dir(tmp_path: Path) -> Path:
    """A host directory that must never be served, measured or removed through a volume."""
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "secret").write_text("host data")
    return foreign


def error_of(response: httpx.Response) -> dict[str, Any]:
    error: dict[str, Any] = response.json()["error"]
    return error


def assert_names_the_mount(message: str, directory: Path) -> None:
    assert str(directory) in message, message
    assert "/foreign" in message, message  # the mount's root: what was mounted there
    assert f"umount {directory}" in message, message


async def test_api_refuses_a_foreign_mount_until_it_is_unmounted(
    api: httpx.AsyncClient, home: Path, tmp_path: Path
) -> None:
    assert (await api.post("/v1/volumes", json={"name": "data"})).status_code == 201
    directory = home / "volumes" / "named" / "data"
    (directory / "mine").write_text("volume data")
    foreign = foreign_dir(tmp_path)
    # boxvold runs on this very loop: mount and umount must not block it.
    mount_id = await trio.to_thread.run_sync(mount_bind, foreign, directory)
    try:
        created = await api.post("/v1/exports", json={"volume": "data"})
        assert created.status_code == 409, created.text
        assert error_of(created)["code"] == "foreign_mount"
        assert_names_the_mount(error_of(created)["message"], directory)
        assert (await api.get("/v1/exports")).json()["exports"] == []

        removed = await api.delete("/v1/volumes/data", params={"force": "true"})
        assert removed.status_code == 409, removed.text
        assert error_of(removed)["code"] == "foreign_mount"
        assert_names_the_mount(error_of(removed)["message"], directory)
        assert (await api.get("/v1/volumes/data")).status_code == 200

        pruned = await api.post("/v1/volumes/prune", json={"all": True})
        assert pruned.status_code == 200, pruned.text
        assert pruned.json()["removed"] == []

        df = await api.get("/v1/system/df")
        assert df.status_code == 200, df.text
        (row,) = df.json()["volumes"]
        # Not the foreign directory's usage: nothing walks into it.
        assert (row["name"], row["bytes"], row["inodes"]) == ("data", 0, 0)

        assert (foreign / "secret").read_text() == "host data"
    finally:
        await trio.to_thread.run_sync(unmount, mount_id)

    created = await api.post("/v1/exports", json={"volume": "data"})
    assert created.status_code == 201, created.text
    mountpoint = created.json()["mountpoint"]
    listing = await trio.to_thread.run_sync(os.listdir, mountpoint)
    assert listing == ["mine"]
    assert (await api.delete("/v1/volumes/data", params={"force": "true"})).status_code == 200
    assert (foreign / "secret").read_text() == "host data"


def test_rm_force_is_refused_before_it_changes_anything(daemon: Daemon, tmp_path: Path) -> None:
    ok(daemon, "create", "data")
    export_id, mountpoint = ok(daemon, "export", "create", "data").split()
    (Path(mountpoint) / "mine").write_text("volume data")
    directory = daemon.home / "volumes" / "named" / "data"
    with bind_mount(foreign_dir(tmp_path), directory):
        refused = boxvol(daemon, "rm", "-f", "data")
        assert refused.returncode == 1, refused.stderr
        assert_names_the_mount(refused.stderr, directory)

        # All or nothing: the volume, its export and the export's view are as they were.
        assert ok(daemon, "ls", "-q", "--filter", "in-use=true") == "data\n"
        assert ok(daemon, "export", "ls", "-q") == f"{export_id}\n"
        assert (Path(mountpoint) / "mine").read_text() == "volume data"
        df = json.loads(ok(daemon, "df", "--format", "json"))
        assert [v["name"] for v in df["volumes"]] == ["data"]

    assert ok(daemon, "rm", "-f", "data") == "data\n"
    assert ok(daemon, "ls", "-q") == ""
    assert ok(daemon, "export", "ls", "-q") == ""


def test_rm_never_deletes_through_a_mount_inside_the_volume(daemon: Daemon, tmp_path: Path) -> None:
    ok(daemon, "create", "data")
    inside = daemon.home / "volumes" / "named" / "data" / "sub"
    inside.mkdir()
    foreign = foreign_dir(tmp_path)
    with bind_mount(foreign, inside):
        refused = boxvol(daemon, "rm", "data")
        assert refused.returncode == 1, refused.stderr
        assert_names_the_mount(refused.stderr, inside)
        assert (foreign / "secret").read_text() == "host data"
        assert ok(daemon, "ls", "-q") == "data\n"
    assert ok(daemon, "rm", "data") == "data\n"
    assert (foreign / "secret").read_text() == "host data"


def test_a_restored_export_is_not_served_through_a_foreign_mount(
    daemon: Daemon, tmp_path: Path
) -> None:
    ok(daemon, "create", "data")
    export_id, mountpoint = ok(daemon, "export", "create", "data").split()
    dropped_id = ok(daemon, "export", "create", "data").split()[0]
    (Path(mountpoint) / "mine").write_text("volume data")
    directory = daemon.home / "volumes" / "named" / "data"
    assert daemon.stop() == 0
    with bind_mount(foreign_dir(tmp_path), directory):
        offset = daemon.log_offset()
        daemon.start()
        assert not os.path.exists(Path(mountpoint) / "secret")
        assert not os.path.exists(mountpoint)
        log = daemon.log_since(offset)
        assert f"export not served id={export_id}" in log, log
        assert_names_the_mount(log, directory)
        # Reconciliation left the mounted-over directory alone, and said so.
        actions = daemon.client().health()["reconciled"]
        assert [(a["action"], a["key"]) for a in actions] == [("foreign-mount", "data")]
        # The export is kept (not served), so the volume stays in use and is not pruned.
        assert ok(daemon, "ls", "-q", "--filter", "in-use=true") == "data\n"
        assert "Deleted" not in ok(daemon, "prune", "-f", "--all")
        assert ok(daemon, "ls", "-q") == "data\n"
        # An export kept this way can still be dropped by its id.
        assert ok(daemon, "export", "ls", "-q") == ""
        ok(daemon, "export", "rm", dropped_id)
        assert daemon.stop() == 0

    daemon.start()
    assert ok(daemon, "export", "ls", "-q") == f"{export_id}\n"
    assert (Path(mountpoint) / "mine").read_text() == "volume data"


def test_start_up_leaves_a_mounted_over_stray_directory_alone(
    daemon: Daemon, tmp_path: Path
) -> None:
    assert daemon.stop() == 0
    stray = daemon.home / "volumes" / "named" / "stray"
    stray.mkdir()
    foreign = foreign_dir(tmp_path)
    foreign.chmod(0o755)
    with bind_mount(foreign, stray):
        daemon.start()
        # Neither adopted (a chmod through the mount) nor quarantined (a rename of it).
        assert ok(daemon, "ls", "-q") == ""
        assert stat.S_IMODE(foreign.stat().st_mode) == 0o755
        assert (stray / "secret").read_text() == "host data"
        actions = daemon.client().health()["reconciled"]
        assert [(a["action"], a["key"]) for a in actions] == [("foreign-mount", "stray")]
        assert daemon.stop() == 0
    daemon.start()
    assert ok(daemon, "ls", "-q") == "stray\n"


def test_the_gate_accepts_only_the_mounts_boxvold_made(tmp_path: Path) -> None:
    layout = Layout(str(tmp_path / "home"))
    directory = Path(layout.named) / "data"
    directory.mkdir(parents=True)
    os.makedirs(layout.anonymous)
    volume = Volume(id="01HZX4J3M8ZKQ6W9V2T7N5R1BC", kind="named", created_at="", name="data")
    # Even a directory bound over itself is refused: same inode, another mount.
    with bind_mount(directory, directory) as mount_id:
        try:
            volume_directory(layout, volume)
        except ForeignMount as exc:
            assert f"umount {directory}" in exc.message
        else:
            raise AssertionError("a foreign mount passed the gate")
        assert volume_directory(layout, volume, own_mounts={mount_id}) == str(directory)
        fd, _ = open_volume_directory(layout, volume, own_mounts={mount_id})
        os.close(fd)
