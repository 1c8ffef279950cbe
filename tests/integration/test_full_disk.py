"""A full disk stays recoverable: boxvold's home on a small ext4 filesystem made for the test,
filled from inside an export, as a runaway guest would fill it."""

from __future__ import annotations

import errno
import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import Daemon, boxvol, ok
from volumed.errors import DISK_FULL_HINT

DISK_SIZE = "192M"
RESERVE = "64M"


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 192 MiB ext4 filesystem (no root-reserved blocks), loop-mounted for this test."""
    image = tmp_path / "disk.img"
    mountpoint = tmp_path / "disk"
    mountpoint.mkdir()
    subprocess.run(["truncate", "-s", DISK_SIZE, str(image)], check=True)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-m", "0", str(image)], check=True)
    subprocess.run(["mount", "-o", "loop", str(image), str(mountpoint)], check=True)
    try:
        yield mountpoint
    finally:
        subprocess.run(["umount", str(mountpoint)], check=True)


def _fill_through_export(daemon: Daemon, volume: str) -> None:
    ok(daemon, "create", volume)
    mountpoint = Path(daemon.client().create_export(volume)["mountpoint"])
    chunk = b"\x5a" * (1 << 20)
    with (mountpoint / "runaway").open("wb") as out, pytest.raises(OSError) as caught:
        while True:
            out.write(chunk)
            out.flush()
            os.fsync(out.fileno())
    assert caught.value.errno == errno.ENOSPC


def _reserve(daemon: Daemon) -> dict[str, int]:
    reserve: dict[str, int] = json.loads(ok(daemon, "df", "--format", "json"))["reserve"]
    return reserve


def _failed_with_hint(result: subprocess.CompletedProcess[str]) -> None:
    assert result.returncode == 1, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith("boxvol: error: ")
    assert lines[1] == f"boxvol: hint: {DISK_FULL_HINT}"
    assert "boxvol reserve-release" in lines[1]


def test_a_full_home_is_recovered_with_reserve_release(small_disk: Path, runtime_dir: Path) -> None:
    home = small_disk / "home"
    daemon = Daemon(home, runtime_dir, log=small_disk.parent / "boxvold.log")
    daemon.start("--reserve-size", RESERVE)
    try:
        assert _reserve(daemon) == {"target_bytes": 64 << 20, "present_bytes": 64 << 20}
        _fill_through_export(daemon, "runaway")

        # Full: a removal is refused before it changes anything, with the hint.
        _failed_with_hint(boxvol(daemon, "rm", "-f", "runaway"))
        [export] = daemon.client().list_exports()
        assert export["volume"]["name"] == "runaway"
        [listed] = daemon.client().list_volumes()
        assert listed["in_use"]

        released = ok(daemon, "reserve-release")
        assert released.startswith("released 64M")
        # Still no room for the reserve twice over: it stays released.
        assert _reserve(daemon)["present_bytes"] == 0
        ok(daemon, "rm", "-f", "runaway")
        assert daemon.client().list_volumes() == []
        assert daemon.client().list_exports() == []
        # Room again: the reserve came back by itself.
        assert _reserve(daemon)["present_bytes"] == 64 << 20
    finally:
        assert daemon.stop() == 0, daemon.log.read_text()


def test_boxvold_starts_on_a_full_home(small_disk: Path, runtime_dir: Path) -> None:
    home = small_disk / "home"
    daemon = Daemon(home, runtime_dir, log=small_disk.parent / "boxvold.log")
    daemon.start("--reserve-size", RESERVE)
    _fill_through_export(daemon, "runaway")
    # Stopped cleanly while full (the export's server stops with it), then started again:
    # start-up needs no free space (it releases the reserve, and says so).
    assert daemon.stop() == 0
    st = os.statvfs(small_disk)
    assert st.f_bavail * st.f_frsize < 8 << 20
    offset = daemon.log_offset()
    daemon.start("--reserve-size", RESERVE)
    try:
        assert "reserve released at start" in daemon.log_since(offset)
        assert [v["name"] for v in daemon.client().list_volumes()] == ["runaway"]
        ok(daemon, "rm", "-f", "runaway")
        assert _reserve(daemon)["present_bytes"] == 64 << 20
    finally:
        assert daemon.stop() == 0, daemon.log.read_text()
