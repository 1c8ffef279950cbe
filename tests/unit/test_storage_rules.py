"""Pure rules of sized volumes, the reserve and gc; the registry's upgrade to images."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from volumed.gc import Finding, is_ours, reclaimed_bytes, virtiofsd_source
from volumed.images import fsck_verdict, image_mount_at, journal_mib, mkfs_command
from volumed.mounts import MountEntry
from volumed.registry import SCHEMA_VERSION, Registry
from volumed.reserve import restore_allowed


@pytest.mark.parametrize(
    ("size", "journal"),
    [(8 << 20, 1), (64 << 20, 1), (1 << 30, 16), (4 << 30, 64), (1 << 40, 64)],
)
def test_journal_is_a_64th_between_1_and_64_mib(size: int, journal: int) -> None:
    assert journal_mib(size) == journal


def test_mkfs_takes_the_inode_count_or_the_ratio() -> None:
    counted = mkfs_command("/i.ext4", 64 << 20, 5000)
    assert counted[-1] == "/i.ext4" and counted[5:7] == ["-N", "5000"]
    assert counted[3:5] == ["-m", "0"]
    ratio = mkfs_command("/i.ext4", 64 << 20, None)
    assert ratio[5:7] == ["-i", "16384"]
    assert "size=1" in ratio


@pytest.mark.parametrize(
    ("status", "mountable", "repaired"),
    [(0, True, False), (1, True, True), (2, True, True), (4, False, False), (8, False, False)],
)
def test_fsck_verdicts(status: int, mountable: bool, repaired: bool) -> None:
    verdict = fsck_verdict(status, "img: some words\nimg: last line\n")
    assert (verdict.mountable, verdict.repaired) == (mountable, repaired)
    if not mountable:
        assert "last line" in verdict.detail and str(status) in verdict.detail


def test_the_topmost_mount_at_a_directory_counts() -> None:
    entries = [
        MountEntry(40, 1, "/", "/h/v/a", "ext4", "/dev/loop0"),
        MountEntry(41, 40, "/", "/h/v/a", "tmpfs", "none"),
        MountEntry(42, 1, "/", "/h/v/b", "ext4", "/dev/loop1"),
    ]
    found = image_mount_at(entries, "/h/v/a")
    assert found is not None and found.mount_id == 41
    assert image_mount_at(entries, "/h/v/c") is None


@pytest.mark.parametrize(
    ("present", "free", "allowed"),
    [(0, 128 << 20, True), (0, (128 << 20) - 1, False), (64 << 20, 1 << 40, False)],
)
def test_the_reserve_comes_back_only_with_room_for_it_twice(
    present: int, free: int, allowed: bool
) -> None:
    assert restore_allowed(present, 64 << 20, free) is allowed


def test_virtiofsd_sources_of_both_dialects() -> None:
    c = [b"/usr/lib/qemu/virtiofsd", b"--fd=3", b"-o", b"source=/h/v/named/x,sandbox=namespace"]
    rust = [b"/usr/libexec/virtiofsd", b"--fd=3", b"--shared-dir=/r/fs/01AB"]
    assert virtiofsd_source(c) == "/h/v/named/x"
    assert virtiofsd_source(rust) == "/r/fs/01AB"
    assert virtiofsd_source([b"/bin/sleep", b"source=/h/v/named/x"]) is None
    assert virtiofsd_source([]) is None
    roots = ("/h/v/named", "/h/v/anonymous", "/r/fs")
    assert is_ours("/h/v/named/x", roots) and is_ours("/r/fs/01AB/", roots)
    assert not is_ours("/h/v/named/x/deeper", roots) and not is_ours("/srv/x", roots)


def test_quarantined_data_is_not_counted_as_reclaimed() -> None:
    findings = [
        Finding("trash", "a", 100, "delete"),
        Finding("orphan-directory", "b", 1000, "quarantine"),
    ]
    assert reclaimed_bytes(findings) == 100


def test_a_version_1_registry_gains_backing_and_a_current_one_is_not_written(
    tmp_path: Path,
) -> None:
    path = tmp_path / "registry.sqlite3"
    old = sqlite3.connect(path)
    old.executescript(
        """
        CREATE TABLE volumes (id TEXT PRIMARY KEY, name TEXT UNIQUE, kind TEXT NOT NULL,
            created_at TEXT NOT NULL, labels TEXT NOT NULL DEFAULT '{}', size_bytes INTEGER,
            inode_limit INTEGER, consumer TEXT);
        INSERT INTO volumes VALUES ('01HZX4J3M8ZKQ6W9V2T7N5R1BC', 'old', 'named',
            '2026-01-01T00:00:00.000Z', '{}', 1073741824, NULL, NULL);
        PRAGMA user_version = 1;
        """
    )
    old.commit()
    old.close()
    registry = Registry(str(path))
    [volume] = registry.all()
    assert volume.backing == "directory" and volume.size_bytes == 1 << 30  # unenforced
    registry.close()
    before = path.stat().st_mtime_ns
    again = Registry(str(path))
    assert again.all() == [volume]
    again.close()
    assert path.stat().st_mtime_ns == before  # nothing written to open a current one
    with sqlite3.connect(path) as check:
        assert check.execute("PRAGMA user_version").fetchone() == (SCHEMA_VERSION,)
