"""Export policies as views, on a plain directory (no mount)."""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from volumed.fs.passthrough import AttrChange, Caller, Passthrough
from volumed.fs.views import OwnerMapped, ReadOnly, make_view, presented_owner

ROOT = Caller(0, 0)


@pytest.fixture
def root_fd(tmp_path: Path) -> Iterator[int]:
    (tmp_path / "f").write_text("data")
    (tmp_path / "d").mkdir()
    fd = os.open(tmp_path, os.O_PATH | os.O_DIRECTORY)
    yield fd
    os.close(fd)


def test_make_view_picks_the_policy() -> None:
    assert type(make_view(read_only=False, owner=None)) is Passthrough
    assert isinstance(make_view(read_only=True, owner=None), ReadOnly)
    both = make_view(read_only=True, owner=(7, 8))
    assert isinstance(both, ReadOnly) and isinstance(both, OwnerMapped)
    assert presented_owner(both) == (7, 8)
    assert presented_owner(Passthrough()) is None


def test_read_only_refuses_every_mutation(root_fd: int, tmp_path: Path) -> None:
    view = ReadOnly()
    fd, _ = view.lookup(root_fd, b"f")
    try:
        assert view.read(view.open(fd, os.O_RDONLY), 0, 10) == b"data"
        mutations: list[Callable[[], object]] = [
            lambda: view.setattr(fd, AttrChange(mode=0o777), ROOT),
            lambda: view.create(root_fd, b"n", 0o644, os.O_WRONLY, ROOT),
            lambda: view.mknod(root_fd, b"n", stat.S_IFIFO | 0o644, 0, ROOT),
            lambda: view.mkdir(root_fd, b"n", 0o755, ROOT),
            lambda: view.symlink(root_fd, b"n", b"t", ROOT),
            lambda: view.link(fd, root_fd, b"n"),
            lambda: view.unlink(root_fd, b"f"),
            lambda: view.rmdir(root_fd, b"d"),
            lambda: view.rename(root_fd, b"f", root_fd, b"g", 0),
            lambda: view.open(fd, os.O_WRONLY),
            lambda: view.open(fd, os.O_RDONLY | os.O_TRUNC),
            lambda: view.setxattr(fd, b"user.a", b"1"),
            lambda: view.removexattr(fd, b"user.a"),
        ]
        for mutation in mutations:
            with pytest.raises(OSError) as caught:
                mutation()
            assert caught.value.errno == errno.EROFS
    finally:
        os.close(fd)
    assert sorted(os.listdir(tmp_path)) == ["d", "f"]


def test_passthrough_never_leaves_the_directory(root_fd: int, tmp_path: Path) -> None:
    view = Passthrough()
    for name in (b".", b"..", b"a/b", b""):
        with pytest.raises(OSError) as caught:
            view.lookup(root_fd, name)
        assert caught.value.errno == errno.EINVAL
    os.symlink("/etc", tmp_path / "link")
    fd, st = view.lookup(root_fd, b"link")
    try:
        assert stat.S_ISLNK(st.st_mode)
        assert view.readlink(fd) == b"/etc"
        with pytest.raises(OSError) as caught:
            view.open(fd, os.O_RDONLY)
        assert caught.value.errno == errno.ELOOP
        with pytest.raises(OSError):
            view.list_directory(fd)
    finally:
        os.close(fd)


def test_device_nodes_and_foreign_xattrs_are_refused(root_fd: int) -> None:
    view = Passthrough()
    for kind in (stat.S_IFBLK, stat.S_IFCHR):
        with pytest.raises(PermissionError):
            view.mknod(root_fd, b"dev", kind | 0o600, os.makedev(8, 0), ROOT)
    fd, _ = view.lookup(root_fd, b"f")
    try:
        with pytest.raises(PermissionError):
            view.setxattr(fd, b"trusted.x", b"1")
        with pytest.raises(OSError) as caught:
            view.setxattr(fd, b"system.posix_acl_access", b"1")
        assert caught.value.errno == errno.EOPNOTSUPP
    finally:
        os.close(fd)


def test_owner_mapping_keeps_backing_ownership(root_fd: int, tmp_path: Path) -> None:
    view = OwnerMapped(4242, 4242)
    fd, st = view.mkdir(root_fd, b"new", 0o755, Caller(1000, 1000))
    os.close(fd)
    assert (st.st_uid, st.st_gid) == (0, 0)
    fd, _ = view.lookup(root_fd, b"f")
    try:
        view.setattr(fd, AttrChange(uid=4242, gid=4242), ROOT)
        assert os.stat(tmp_path / "f").st_uid == 0
        with pytest.raises(PermissionError):
            view.setattr(fd, AttrChange(uid=1), ROOT)
    finally:
        os.close(fd)
