"""Export policies as views, on a plain directory (no mount)."""

from __future__ import annotations

import errno
import functools
import os
import signal
import stat
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.helpers import REPO
from volumed.fs.passthrough import AttrChange, Caller, Passthrough, View
from volumed.fs.views import (
    READ_OPERATIONS,
    WRITE_OPERATIONS,
    OwnerMapped,
    ReadOnly,
    make_view,
    presented_owner,
    public_operations,
)

ROOT = Caller(0, 0)
USER = Caller(4242, 4242)
SET_ID = stat.S_ISUID | stat.S_ISGID


@pytest.fixture
def root_fd(tmp_path: Path) -> Iterator[int]:
    (tmp_path / "f").write_text("data")
    (tmp_path / "d").mkdir()
    fd = os.open(tmp_path, os.O_PATH | os.O_DIRECTORY)
    yield fd
    os.close(fd)


def test_make_view_picks_the_policy() -> None:
    assert type(make_view(read_only=False, owner=None)) is Passthrough
    plain = make_view(read_only=True, owner=None)
    assert isinstance(plain, ReadOnly) and type(plain.inner) is Passthrough
    mapped = make_view(read_only=False, owner=(7, 8))
    assert isinstance(mapped, OwnerMapped) and presented_owner(mapped) == (7, 8)
    both = make_view(read_only=True, owner=(7, 8))
    assert isinstance(both, ReadOnly) and isinstance(both.inner, OwnerMapped)
    assert presented_owner(both) == (7, 8)  # seen through the wrapper
    assert presented_owner(plain) is None
    assert presented_owner(Passthrough()) is None


@pytest.mark.parametrize("inner", [Passthrough(), OwnerMapped(7, 8)], ids=["plain", "mapped"])
def test_read_only_refuses_every_mutation(root_fd: int, tmp_path: Path, inner: View) -> None:
    view = ReadOnly(inner)
    fd, _ = view.lookup(root_fd, b"f")
    try:
        assert view.read(view.open(fd, os.O_RDONLY), 0, 10) == b"data"
        assert view.statfs(root_fd).f_bsize > 0
        mutations: dict[str, Callable[[], object]] = {
            "setattr": lambda: view.setattr(fd, AttrChange(mode=0o777), ROOT),
            "create": lambda: view.create(root_fd, b"n", 0o644, os.O_WRONLY, ROOT),
            "mknod": lambda: view.mknod(root_fd, b"n", stat.S_IFIFO | 0o644, 0, ROOT),
            "mkdir": lambda: view.mkdir(root_fd, b"n", 0o755, ROOT),
            "symlink": lambda: view.symlink(root_fd, b"n", b"t", ROOT),
            "link": lambda: view.link(fd, root_fd, b"n"),
            "unlink": lambda: view.unlink(root_fd, b"f"),
            "rmdir": lambda: view.rmdir(root_fd, b"d"),
            "rename": lambda: view.rename(root_fd, b"f", root_fd, b"g", 0),
            "write": lambda: view.write(view.open(fd, os.O_RDONLY), 0, b"x"),
            "setxattr": lambda: view.setxattr(fd, b"user.a", b"1"),
            "removexattr": lambda: view.removexattr(fd, b"user.a"),
        }
        assert set(mutations) == WRITE_OPERATIONS  # each refusal is tried here
        opens_for_writing = [
            os.O_WRONLY,
            os.O_RDWR,
            os.O_RDONLY | os.O_TRUNC,
            os.O_RDONLY | os.O_APPEND,
            os.O_RDONLY | os.O_CREAT,
        ]
        for flags in opens_for_writing:
            mutations[f"open {flags:#o}"] = functools.partial(view.open, fd, flags)
        for name, mutation in mutations.items():
            with pytest.raises(OSError) as caught:
                mutation()
            assert caught.value.errno == errno.EROFS, name
    finally:
        os.close(fd)
    assert sorted(os.listdir(tmp_path)) == ["d", "f"]
    assert _mode(tmp_path, "f") == 0o644


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


def test_read_only_sorts_every_operation_of_the_interface() -> None:
    # Every public operation is a read (delegated) or a write (refused), but open, which
    # ReadOnly decides by its flags: exactly once each, and nothing else exists.
    operations = public_operations(Passthrough)
    assert operations == public_operations(View)
    assert READ_OPERATIONS.isdisjoint(WRITE_OPERATIONS)
    assert operations == READ_OPERATIONS | WRITE_OPERATIONS | {"open"}
    assert public_operations(ReadOnly) == {"open"}


def test_read_only_delegates_the_reads_to_the_view_it_wraps() -> None:
    inner = OwnerMapped(7, 8)
    view = ReadOnly(inner)
    for name in READ_OPERATIONS:
        assert getattr(view, name) == getattr(inner, name), name
    assert view.permitted_mode(0o6755) == 0o755  # the mapping's rule holds under the wrapper
    with pytest.raises(AttributeError):  # an operation nobody sorted does not exist
        view.punch_hole  # noqa: B018


def test_a_view_with_an_unsorted_operation_cannot_be_wrapped() -> None:
    class Grown(Passthrough):
        def punch_hole(self, io_fd: int, offset: int, length: int) -> None:
            raise AssertionError("never called")

    with pytest.raises(TypeError, match="punch_hole"):
        ReadOnly(Grown())


def test_a_passthrough_operation_nobody_sorted_fails_the_import() -> None:
    code = textwrap.dedent(
        """
        from volumed.fs import passthrough
        passthrough.Passthrough.punch_hole = lambda self, io_fd, offset, length: None
        import volumed.fs.views
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=False
    )
    assert done.returncode != 0
    assert "TypeError" in done.stderr and "punch_hole" in done.stderr


def _mode(tmp_path: Path, name: str) -> int:
    return stat.S_IMODE(os.lstat(tmp_path / name).st_mode)


def test_owner_mapping_never_stores_set_id_bits(root_fd: int, tmp_path: Path) -> None:
    view = OwnerMapped(65534, 65534)
    nobody = Caller(65534, 65534)
    fd, _ = view.lookup(root_fd, b"f")
    try:
        view.setattr(fd, AttrChange(mode=0o6755), nobody)
        assert _mode(tmp_path, "f") == 0o755
        view.setattr(fd, AttrChange(mode=0o7755), ROOT)  # root through the mapping too
        assert _mode(tmp_path, "f") == 0o1755
    finally:
        os.close(fd)
    io_fd, fd, _ = view.create(root_fd, b"c", 0o6755, os.O_WRONLY, nobody)
    os.close(io_fd)
    os.close(fd)
    fd, _ = view.mknod(root_fd, b"n", stat.S_IFREG | 0o6755, 0, nobody)
    os.close(fd)
    os.chmod(tmp_path / "d", 0o2777)  # made setgid behind the mapping's back
    d_fd, _ = view.lookup(root_fd, b"d")
    try:
        fd, _ = view.mkdir(d_fd, b"sub", 0o2777, nobody)
        os.close(fd)
        view.setattr(d_fd, AttrChange(mode=0o2777), nobody)
    finally:
        os.close(d_fd)
    assert (_mode(tmp_path, "c"), _mode(tmp_path, "n")) == (0o755, 0o755)
    assert (_mode(tmp_path, "d/sub"), _mode(tmp_path, "d")) == (0o777, 0o777)


def test_a_chown_through_the_mapping_clears_set_id_bits(root_fd: int, tmp_path: Path) -> None:
    os.chmod(tmp_path / "f", 0o6755)  # planted from elsewhere
    view = OwnerMapped(65534, 65534)
    fd, _ = view.lookup(root_fd, b"f")
    try:
        st = view.setattr(fd, AttrChange(uid=65534, gid=65534), ROOT)
    finally:
        os.close(fd)
    assert stat.S_IMODE(st.st_mode) == _mode(tmp_path, "f") == 0o755


def test_chmod_keeps_setgid_only_for_a_group_of_the_caller(root_fd: int, tmp_path: Path) -> None:
    view = Passthrough()
    os.chown(tmp_path / "f", 4242, 777)
    fd, _ = view.lookup(root_fd, b"f")
    try:
        view.setattr(fd, AttrChange(mode=0o2755), USER)
        assert _mode(tmp_path, "f") == 0o755
        view.setattr(fd, AttrChange(mode=0o2755), Caller(4242, 4242, frozenset({777})))
        assert _mode(tmp_path, "f") == 0o2755
        view.setattr(fd, AttrChange(mode=0o2755, gid=4242), USER)  # the group it gets
        assert _mode(tmp_path, "f") == 0o2755
    finally:
        os.close(fd)


def test_supplementary_groups_come_from_the_calling_process() -> None:
    process = subprocess.Popen(
        ["sleep", "60"], user=4242, group=4242, extra_groups=[778], process_group=0
    )
    try:
        assert Caller(4242, 4242, pid=process.pid).in_group(778)
        assert not Caller(4242, 4242, pid=process.pid).in_group(779)
        # Another identity at that pid (a reused pid): its groups are not the caller's.
        assert not Caller(4243, 4242, pid=process.pid).in_group(778)
        assert not Caller(4242, 4242).in_group(778)
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    assert not Caller(4242, 4242, pid=process.pid).in_group(778)


def test_every_unprivileged_write_and_truncating_open_clears_setuid(
    root_fd: int, tmp_path: Path
) -> None:
    view = Passthrough()
    fd, _ = view.lookup(root_fd, b"f")
    try:
        io_fd = view.open(fd, os.O_WRONLY, USER)
        try:
            for _ in range(2):  # a bit set while the file is open goes at the next write
                os.chmod(tmp_path / "f", 0o6755)
                view.write(io_fd, 0, b"x", unprivileged=True)
                assert _mode(tmp_path, "f") == 0o755
            os.chmod(tmp_path / "f", 0o6755)
            view.write(io_fd, 0, b"x")
            assert _mode(tmp_path, "f") == 0o6755
        finally:
            os.close(io_fd)
        os.close(view.open(fd, os.O_WRONLY | os.O_TRUNC, ROOT))
        assert _mode(tmp_path, "f") == 0o6755
        os.close(view.open(fd, os.O_WRONLY | os.O_TRUNC, USER))
        assert _mode(tmp_path, "f") == 0o755
    finally:
        os.close(fd)
