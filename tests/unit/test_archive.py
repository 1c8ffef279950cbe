"""volumed.archive on temporary directories: byte-for-byte round trips of an odd tree, hostile
archives that must leave nothing outside the target, and all-or-nothing restores."""

from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path

import pytest

from tests.helpers import SPARSE_FILE, make_odd_tree, tar_bytes, tar_member, tree_snapshot
from volumed import archive
from volumed.errors import BadArchive, Conflict


def _dir_fd(path: Path) -> int:
    return os.open(path, os.O_RDONLY | os.O_DIRECTORY)


def _pack(root: Path) -> tuple[bytes, archive.Report]:
    out = io.BytesIO()
    fd = _dir_fd(root)
    try:
        report = archive.pack(fd, out)
    finally:
        os.close(fd)
    return out.getvalue(), report


def _restore(data: bytes, root: Path, *, force: bool = False) -> archive.Report:
    fd = _dir_fd(root)
    try:
        return archive.restore(io.BytesIO(data), fd, force=force)
    finally:
        os.close(fd)


def test_round_trip_is_byte_for_byte(tmp_path: Path) -> None:
    source, target = tmp_path / "source", tmp_path / "target"
    source.mkdir()
    target.mkdir()
    make_odd_tree(source)
    os.mkfifo(source / "fifo")
    data, packed = _pack(source)
    (source / "fifo").unlink()
    restored = _restore(data, target)
    assert tree_snapshot(target) == tree_snapshot(source)
    assert packed.skipped == {"fifo": 1}  # the tree's one fifo is not archived
    assert restored.entries == packed.entries
    assert restored.bytes == packed.bytes
    assert restored.skipped == {}
    assert restored.neutralised == {"symlinks_out": 2}
    sparse_source, sparse_target = (root / SPARSE_FILE for root in (source, target))
    assert os.stat(sparse_target).st_blocks <= os.stat(sparse_source).st_blocks
    assert os.stat(sparse_target).st_blocks * 512 < os.stat(sparse_target).st_size // 4


def test_pack_skips_reserved_names_and_other_filesystems(tmp_path: Path) -> None:
    (tmp_path / archive.STAGED).mkdir()
    (tmp_path / "kept").write_text("x")
    data, report = _pack(tmp_path)
    assert report.skipped == {"reserved": 1}
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        assert tar.getnames() == ["kept"]


def _listing(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def test_hostile_archive_leaves_nothing_outside(tmp_path: Path) -> None:
    volume, outside = tmp_path / "volume", tmp_path / "outside"
    volume.mkdir()
    outside.mkdir()
    (outside / "secret").write_text("secret")
    hostile = tar_bytes(
        (tar_member("/abs.txt"), b"absolute"),
        (tar_member("../escape.txt"), b"escape"),
        (tar_member("a/../../escape2.txt"), b"escape"),
        (tar_member("link", tarfile.SYMTYPE, linkname=str(outside)), None),
        (tar_member("link/owned.txt"), b"through the link"),
        (tar_member("rel", tarfile.SYMTYPE, linkname="../outside"), None),
        (tar_member("rel/owned2.txt"), b"through the link"),
        (tar_member("dev", tarfile.CHRTYPE, devmajor=1, devminor=3), None),
        (tar_member("fifo", tarfile.FIFOTYPE), None),
        (tar_member("hard", tarfile.LNKTYPE, linkname=str(outside / "secret")), None),
        (tar_member("hard2", tarfile.LNKTYPE, linkname="../outside/secret"), None),
        (tar_member("hard3", tarfile.LNKTYPE, linkname="link"), None),
        (tar_member("suid", mode=0o4755), b"#!/bin/sh\n"),
        (tar_member(archive.OLD + "/x"), b"reserved"),
    )
    report = _restore(hostile, volume)
    assert sorted(os.listdir(outside)) == ["secret"]
    assert (outside / "secret").read_text() == "secret"
    assert not (tmp_path / "escape.txt").exists() and not (tmp_path / "escape2.txt").exists()
    assert _listing(volume) == ["abs.txt", "link", "rel", "suid"]
    assert (volume / "abs.txt").read_bytes() == b"absolute"
    assert os.stat(volume / "suid").st_mode & 0o7777 == 0o755
    assert report.skipped == {
        "parent_refs": 3,
        "through_symlink": 2,
        "device": 1,
        "fifo": 1,
        "bad_hardlink": 2,
        "reserved": 1,
    }
    assert report.neutralised == {"absolute_paths": 1, "symlinks_out": 2, "setid_bits": 1}


def test_a_later_member_does_not_turn_a_hard_link_target_into_a_link(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_text("secret")
    volume = tmp_path / "volume"
    volume.mkdir()
    report = _restore(
        tar_bytes(
            (tar_member("a"), b"regular"),
            (tar_member("a", tarfile.SYMTYPE, linkname=str(outside / "secret")), None),
            (tar_member("b", tarfile.LNKTYPE, linkname="a"), None),
        ),
        volume,
    )
    assert report.skipped == {"bad_hardlink": 1}
    assert _listing(volume) == ["a"]
    assert os.readlink(volume / "a") == str(outside / "secret")


def test_a_directory_is_never_replaced(tmp_path: Path) -> None:
    report = _restore(
        tar_bytes(
            (tar_member("d", tarfile.DIRTYPE, mode=0o755), None),
            (tar_member("d/x"), b"x"),
            (tar_member("d", tarfile.SYMTYPE, linkname="/"), None),
        ),
        tmp_path,
    )
    assert report.skipped == {"replaces_directory": 1}
    assert (tmp_path / "d" / "x").read_bytes() == b"x"


def _populated(root: Path) -> dict[bytes, object]:
    (root / "old.txt").write_text("old")
    (root / "dir").mkdir()
    (root / "dir" / "f").write_text("f")
    return tree_snapshot(root)


@pytest.mark.parametrize("cut", ["mid_member", "member_boundary", "empty", "garbage"])
def test_a_failed_restore_leaves_the_target_as_it_was(tmp_path: Path, cut: str) -> None:
    before = _populated(tmp_path)
    whole = tar_bytes((tar_member("a"), b"a" * 3000), (tar_member("b"), b"b" * 10))
    with tarfile.open(fileobj=io.BytesIO(whole)) as tar:
        boundary = tar.getmember("b").offset
    data = {
        "mid_member": whole[:2048],
        "member_boundary": whole[:boundary],
        "empty": b"",
        "garbage": b"not a tar archive" * 100,
    }[cut]
    with pytest.raises(BadArchive) as raised:
        _restore(data, tmp_path, force=True)
    assert "\n" not in raised.value.message
    assert tree_snapshot(tmp_path) == before


def test_a_non_empty_target_needs_force(tmp_path: Path) -> None:
    before = _populated(tmp_path)
    data = tar_bytes((tar_member("new.txt"), b"new"))
    with pytest.raises(Conflict, match="give --force"):
        _restore(data, tmp_path)
    assert tree_snapshot(tmp_path) == before
    _restore(data, tmp_path, force=True)
    assert _listing(tmp_path) == ["new.txt"]


def test_recovery_after_a_crash_in_each_phase(tmp_path: Path) -> None:
    # Crash while extracting: the staged tree goes.
    before = _populated(tmp_path)
    (tmp_path / archive.STAGED).mkdir()
    (tmp_path / archive.STAGED / "half").write_text("half")
    fd = _dir_fd(tmp_path)
    try:
        assert archive.recover(fd) == "undone"
        assert tree_snapshot(tmp_path) == before
        # Crash while moving the old entries out: they come back.
        (tmp_path / archive.STAGED).mkdir()
        (tmp_path / archive.OLD).mkdir()
        (tmp_path / "old.txt").rename(tmp_path / archive.OLD / "old.txt")
        assert archive.recover(fd) == "undone"
        assert tree_snapshot(tmp_path) == before
        # Crash after the commit point: the new entries move in, the old ones go.
        (tmp_path / archive.OLD).mkdir()
        (tmp_path / "old.txt").rename(tmp_path / archive.OLD / "old.txt")
        (tmp_path / "dir").rename(tmp_path / archive.OLD / "dir")
        (tmp_path / archive.SWAPPING).mkdir()
        (tmp_path / archive.SWAPPING / "new").write_text("new")
        (tmp_path / "moved-in").write_text("moved")
        assert archive.recover(fd) == "finished"
        assert _listing(tmp_path) == ["moved-in", "new"]
        assert archive.recover(fd) is None
    finally:
        os.close(fd)


def test_an_image_volumes_lost_and_found_stays_out_of_it(tmp_path: Path) -> None:
    (tmp_path / "lost+found").mkdir()
    (tmp_path / "lost+found" / "#123").write_text("fsck's")
    (tmp_path / "data").write_text("data")
    out = io.BytesIO()
    fd = _dir_fd(tmp_path)
    try:
        report = archive.pack(fd, out, keep=archive.IMAGE_ENTRIES)
        assert report.entries == 1
        (tmp_path / "data").unlink()
        # Only lost+found: empty as far as a restore is concerned, and it stays.
        archive.restore(io.BytesIO(out.getvalue()), fd, force=False, keep=archive.IMAGE_ENTRIES)
        hostile = tar_bytes((tar_member("lost+found/#123"), b"replaced"))
        restored = archive.restore(io.BytesIO(hostile), fd, force=True, keep=archive.IMAGE_ENTRIES)
    finally:
        os.close(fd)
    assert restored.skipped == {"reserved": 1}
    assert _listing(tmp_path) == ["lost+found", "lost+found/#123"]
    assert (tmp_path / "lost+found" / "#123").read_text() == "fsck's"
