"""Sized volumes on a real boxvold: an ext4 image per volume, loop-mounted at its directory.

Caps are the kernel's (ENOSPC through a FUSE view and at the volume itself); refusals change
nothing; images survive restarts and crashes, are checked before they are mounted, and one
that cannot be repaired is reported, never re-created. The guest side is in tests/vm.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
from pathlib import Path

import pytest

from tests.helpers import Daemon, boxvol, held_in_another_namespace, ok
from volumed.errors import ImageUnavailable
from volumed.fs.fuse_mount import mounted_at


def _named(daemon: Daemon, name: str) -> Path:
    return daemon.home / "volumes" / "named" / name


def _images(daemon: Daemon) -> list[str]:
    return sorted(os.listdir(daemon.home / "images"))


def _fill(path: Path, chunk: int = 1 << 20) -> int:
    """Write to ``path`` until the filesystem refuses; the bytes written."""
    written = 0
    data = b"\xa5" * chunk
    with path.open("wb") as out:
        try:
            while True:
                written += out.write(data)
                out.flush()
                os.fsync(out.fileno())
        except OSError as exc:
            assert exc.errno == errno.ENOSPC, exc
    return written


def test_a_sized_volume_is_its_own_filesystem_with_its_cap(daemon: Daemon) -> None:
    ok(daemon, "create", "small", "--size", "64M")
    directory = _named(daemon, "small")
    assert mounted_at(str(directory))
    assert os.listdir(directory) == ["lost+found"]  # ext4's own, as on any ext4 disk
    assert oct(directory.stat().st_mode & 0o777) == "0o700"
    [inspected] = json.loads(ok(daemon, "inspect", "small"))
    assert inspected["backing"] == "image" and inspected["size_bytes"] == 64 << 20
    image = inspected["usage"]["image"]
    assert image["file"] == f"images/{inspected['id']}.ext4"
    assert 60 << 20 < image["size_bytes"] <= 64 << 20
    assert image["allocated_bytes"] < 8 << 20  # sparse

    written = _fill(directory / "big")
    assert 55 << 20 < written <= 64 << 20
    # The host's filesystem never saw those bytes beyond the image; boxvold answers.
    assert daemon.client().health()["status"] == "ok"
    (directory / "big").unlink()


def test_writes_through_a_fuse_export_stop_at_the_cap(daemon: Daemon) -> None:
    ok(daemon, "create", "capped", "--size", "32M")
    ok(daemon, "create", "other", "--size", "32M")
    client = daemon.client()
    mountpoint = Path(client.create_export("capped")["mountpoint"])
    other = Path(client.create_export("other")["mountpoint"])
    statfs = os.statvfs(mountpoint)
    assert 28 << 20 < statfs.f_blocks * statfs.f_frsize <= 32 << 20  # df shows the cap
    assert _fill(mountpoint / "big") > 25 << 20
    (other / "fine").write_bytes(b"y" * (4 << 20))  # another sized volume is unaffected
    assert (other / "fine").stat().st_size == 4 << 20
    for export in client.list_exports():
        client.remove_export(export["id"])


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--size", "4M"), "at least 8.0M"),
        (("--size", "1P"), "fits; give a smaller --size"),
        (("--inodes", "1000"), "needs a size"),
        (("--size", "16M", "--inodes", "20000"), "holds at most 16384 inodes"),
    ],
)
def test_refused_sizes_change_nothing(daemon: Daemon, args: tuple[str, ...], message: str) -> None:
    result = boxvol(daemon, "create", "nope", *args)
    assert result.returncode != 0
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert ok(daemon, "ls", "-q") == ""
    assert not _named(daemon, "nope").exists()
    assert _images(daemon) == []


def test_too_big_names_free_space_and_reserve(daemon: Daemon) -> None:
    result = boxvol(daemon, "create", "huge", "--size", "1P")
    assert "free and boxvold keeps 1.0M of it in reserve, so at most" in result.stderr


def test_resize_grows_only_while_not_exported(daemon: Daemon) -> None:
    ok(daemon, "create", "grow", "--size", "16M")
    (_named(daemon, "grow") / "kept").write_bytes(b"k" * 1000)
    shrink = boxvol(daemon, "resize", "grow", "--size", "8M")
    assert shrink.returncode != 0 and "cannot shrink" in shrink.stderr
    export = daemon.client().create_export("grow")
    busy = boxvol(daemon, "resize", "grow", "--size", "32M")
    assert busy.returncode != 0 and "only while it is not exported" in busy.stderr
    daemon.client().remove_export(export["id"])
    assert ok(daemon, "resize", "grow", "--size", "32M") == "grow 32M\n"
    [inspected] = json.loads(ok(daemon, "inspect", "grow"))
    assert inspected["size_bytes"] == 32 << 20
    assert inspected["usage"]["image"]["size_bytes"] > 28 << 20
    assert (_named(daemon, "grow") / "kept").read_bytes() == b"k" * 1000
    ok(daemon, "create", "plain")
    uncapped = boxvol(daemon, "resize", "plain", "--size", "32M")
    assert uncapped.returncode != 0 and "has no size cap" in uncapped.stderr


def test_rm_takes_the_image_and_its_mount(daemon: Daemon) -> None:
    ok(daemon, "create", "gone", "--size", "16M")
    directory = _named(daemon, "gone")
    with (directory / "held").open("w"):
        busy = boxvol(daemon, "rm", "gone")
        assert busy.returncode != 0 and "busy" in busy.stderr
        assert mounted_at(str(directory)) and _images(daemon) != []  # nothing changed
    ok(daemon, "rm", "gone")
    assert not directory.exists() and not mounted_at(str(directory))
    assert _images(daemon) == [] and os.listdir(daemon.home / "trash") == []


def test_images_survive_restarts_and_crashes(home: Path, runtime_dir: Path) -> None:
    daemon = Daemon(home, runtime_dir)
    daemon.start()
    ok(daemon, "create", "kept", "--size", "16M")
    directory = _named(daemon, "kept")
    (directory / "data").write_bytes(b"d" * 4096)
    assert daemon.stop() == 0
    assert not mounted_at(str(directory))  # a clean stop unmounts
    daemon.start()
    try:
        assert mounted_at(str(directory))
        assert (directory / "data").read_bytes() == b"d" * 4096
        daemon.stop(signal.SIGKILL)
        assert mounted_at(str(directory))  # a crash leaves it mounted ...
        daemon.start()
        assert "image adopted" in daemon.log.read_text()  # ... and the next boxvold adopts it
        [inspected] = json.loads(ok(daemon, "inspect", "kept"))
        assert inspected["usage"]["image"]["size_bytes"] > 12 << 20  # the cap survived
        export = daemon.client().create_export("kept")
        assert (Path(export["mountpoint"]) / "data").read_bytes() == b"d" * 4096
        daemon.client().remove_export(export["id"])
    finally:
        assert daemon.stop() == 0
    assert not mounted_at(str(directory))


def test_an_unclean_image_is_checked_and_a_broken_one_reported(
    home: Path, runtime_dir: Path
) -> None:
    daemon = Daemon(home, runtime_dir)
    daemon.start()
    ok(daemon, "create", "dirty", "--size", "16M")
    ok(daemon, "create", "broken", "--size", "16M")
    ids = {v["name"]: v["id"] for v in daemon.client().list_volumes()}
    (_named(daemon, "dirty") / "f").write_text("still here")
    assert daemon.stop() == 0
    dirty = home / "images" / f"{ids['dirty']}.ext4"
    broken = home / "images" / f"{ids['broken']}.ext4"
    # Mark one as not cleanly unmounted; wipe the other's superblocks.
    subprocess.run(
        ["debugfs", "-w", "-R", "ssv state 0", str(dirty)], check=True, capture_output=True
    )
    with broken.open("r+b") as image:
        image.write(bytes(8 << 20))
    daemon.start()
    try:
        health = daemon.client().health()
        actions = {(a["action"], a["key"]) for a in health["reconciled"]}
        assert ("image-repaired", "dirty") in actions
        assert ("image-unavailable", "broken") in actions
        assert (_named(daemon, "dirty") / "f").read_text() == "still here"
        # The broken one is listed, never served from the bare directory, never re-created.
        assert {v["name"] for v in daemon.client().list_volumes()} == {"dirty", "broken"}
        assert not mounted_at(str(_named(daemon, "broken")))
        refused = boxvol(daemon, "export", "create", "broken")
        assert refused.returncode != 0 and "image is not mounted" in refused.stderr
        with pytest.raises(ImageUnavailable):
            daemon.client().create_export("broken")
        assert broken.exists()
        ok(daemon, "rm", "broken")  # removing it is always possible
        assert not broken.exists()
    finally:
        assert daemon.stop() == 0


def test_an_orphan_image_is_quarantined_never_deleted(home: Path, runtime_dir: Path) -> None:
    daemon = Daemon(home, runtime_dir)
    daemon.start()
    assert daemon.stop() == 0
    orphan = home / "images" / "01HZX4J3M8ZKQ6W9V2T7N5R1BC.ext4"
    orphan.write_bytes(b"precious")
    daemon.start()
    try:
        assert not orphan.exists()
        [kept] = [p for p in (home / "quarantine").iterdir() if p.name.startswith("image-")]
        assert kept.read_bytes() == b"precious"
    finally:
        assert daemon.stop() == 0


def test_an_image_still_in_use_elsewhere_is_mounted_from_its_own_loop_device(
    home: Path, runtime_dir: Path
) -> None:
    """A process in another mount namespace (as a guest's virtiofsd) keeps the image's loop
    device through a clean stop; the next boxvold mounts that very device (one superblock,
    no e2fsck of a live filesystem), never a second loop device on the same image."""
    daemon = Daemon(home, runtime_dir)
    daemon.start()
    ok(daemon, "create", "shared", "--size", "16M")
    directory = _named(daemon, "shared")
    try:
        with held_in_another_namespace(directory) as holder:
            assert daemon.stop() == 0
            assert not mounted_at(str(directory))
            offset = daemon.log_offset()
            daemon.start()
            assert "image still attached" in daemon.log_since(offset)
            (directory / "seen").write_text("same filesystem")
            with open(f"/proc/{holder.pid}/cwd/seen") as through_holder:
                assert through_holder.read() == "same filesystem"
    finally:
        assert daemon.stop() == 0


def test_resize_refuses_an_image_mounted_elsewhere(daemon: Daemon) -> None:
    """A filesystem another mount namespace still uses is live: never checked or resized."""
    ok(daemon, "create", "held", "--size", "16M")
    directory = _named(daemon, "held")
    (directory / "kept").write_text("kept")
    with held_in_another_namespace(directory):
        refused = boxvol(daemon, "resize", "held", "--size", "32M")
        assert refused.returncode == 1 and "still in use by another process" in refused.stderr
        assert mounted_at(str(directory)) and (directory / "kept").read_text() == "kept"
        [inspected] = json.loads(ok(daemon, "inspect", "held"))
        assert inspected["size_bytes"] == 16 << 20
    assert ok(daemon, "resize", "held", "--size", "32M") == "held 32M\n"
