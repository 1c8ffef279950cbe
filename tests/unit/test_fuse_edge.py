"""The FUSE boundary maps errors once: OSError to its errno, anything else to a logged EIO;
and its handlers on a plain directory (no mount): one handle table, statfs through the view."""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import cast

import pyfuse3
import pytest

from volumed.exports import CACHE_POLICIES
from volumed.fs.nodes import ROOT_INODE, ExportState
from volumed.fs.operations import BoxvolFS, fuse_edge
from volumed.fs.passthrough import Passthrough


@fuse_edge
async def _raises(exc: BaseException) -> None:
    raise exc


async def test_oserror_passes_its_errno() -> None:
    with pytest.raises(pyfuse3.FUSEError) as caught:
        await _raises(OSError(errno.EXDEV, "across exports"))
    assert caught.value.errno == errno.EXDEV


async def test_an_oserror_without_errno_is_eio() -> None:
    with pytest.raises(pyfuse3.FUSEError) as caught:
        await _raises(OSError("odd"))
    assert caught.value.errno == errno.EIO


async def test_a_bug_is_logged_and_answered_with_eio(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.ERROR), pytest.raises(pyfuse3.FUSEError) as caught:
        await _raises(KeyError("bug"))
    assert caught.value.errno == errno.EIO
    assert "fuse handler failed op=_raises" in caplog.text


async def test_fuse_errors_pass_unchanged() -> None:
    with pytest.raises(pyfuse3.FUSEError) as caught:
        await _raises(pyfuse3.FUSEError(errno.ENOENT))
    assert caught.value.errno == errno.ENOENT


# -- one handle table, at the edge ---------------------------------------------------------


class _StatfsSpy(Passthrough):
    """The passthrough, counting statfs calls (the edge must ask the view, not the OS)."""

    def __init__(self) -> None:
        self.statfs_calls = 0

    def statfs(self, fd: int) -> os.statvfs_result:
        self.statfs_calls += 1
        return super().statfs(fd)


@pytest.fixture
def fs(tmp_path: Path) -> Iterator[BoxvolFS]:
    (tmp_path / "f").write_text("data")
    (tmp_path / "d").mkdir()
    root_fd = os.open(tmp_path, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    state = ExportState("e1", CACHE_POLICIES["none"], _StatfsSpy())
    served = BoxvolFS(state, root_fd, os.fstat(root_fd))
    yield served
    assert state.root is not None
    state.root.retire()


async def _inode(fs: BoxvolFS, name: bytes) -> int:
    entry = await fs.lookup(ROOT_INODE, name, pyfuse3.RequestContext())
    return int(entry.st_ino)


async def _errno_of(call: Awaitable[object]) -> int:
    with pytest.raises(pyfuse3.FUSEError) as caught:
        await call
    return int(caught.value.errno)


async def test_files_and_directories_share_one_handle_id_space(fs: BoxvolFS) -> None:
    ctx = pyfuse3.RequestContext()
    file_fh = (await fs.open(await _inode(fs, b"f"), os.O_RDONLY, ctx)).fh
    dir_fh = await fs.opendir(ROOT_INODE, ctx)
    other_dir_fh = await fs.opendir(await _inode(fs, b"d"), ctx)
    assert len({file_fh, dir_fh, other_dir_fh}) == 3
    await fs.release(file_fh)
    await fs.releasedir(dir_fh)
    await fs.releasedir(other_dir_fh)
    for fh in (file_fh, dir_fh):
        assert await _errno_of(fs.read(fh, 0, 4)) == errno.EBADF
        assert await _errno_of(fs.fsyncdir(fh, False)) == errno.EBADF


async def test_a_handle_of_the_other_kind_is_ebadf(fs: BoxvolFS) -> None:
    ctx = pyfuse3.RequestContext()
    inode = await _inode(fs, b"f")
    file_fh = (await fs.open(inode, os.O_RDWR, ctx)).fh
    dir_fh = await fs.opendir(ROOT_INODE, ctx)
    # Called one at a time, so a failure leaves no coroutine un-awaited behind it.
    as_files: list[Callable[[], Awaitable[object]]] = [
        lambda: fs.read(dir_fh, 0, 4),
        lambda: fs.write(dir_fh, 0, b"x"),
        lambda: fs.fsync(dir_fh, False),
        lambda: fs.setattr(inode, pyfuse3.EntryAttributes(), pyfuse3.SetattrFields(), dir_fh, ctx),
        lambda: fs.release(dir_fh),
    ]
    as_dirs: list[Callable[[], Awaitable[object]]] = [
        lambda: fs.readdir(file_fh, 0, cast(pyfuse3.ReaddirToken, None)),
        lambda: fs.fsyncdir(file_fh, False),
        lambda: fs.releasedir(file_fh),
    ]
    for call in as_files + as_dirs:
        assert await _errno_of(call()) == errno.EBADF
    # Both survived the wrong release: each still answers as its own kind.
    assert await fs.read(file_fh, 0, 4) == b"data"
    await fs.fsyncdir(dir_fh, False)
    await fs.release(file_fh)
    await fs.releasedir(dir_fh)


async def test_handles_of_a_removed_export_are_stale(fs: BoxvolFS) -> None:
    ctx = pyfuse3.RequestContext()
    file_fh = (await fs.open(await _inode(fs, b"f"), os.O_RDONLY, ctx)).fh
    dir_fh = await fs.opendir(ROOT_INODE, ctx)
    fs.root.alive = False
    assert await _errno_of(fs.read(file_fh, 0, 4)) == errno.ESTALE
    assert await _errno_of(fs.fsyncdir(dir_fh, False)) == errno.ESTALE


async def test_statfs_asks_the_view(fs: BoxvolFS, tmp_path: Path) -> None:
    data = await fs.statfs(pyfuse3.RequestContext())
    view = fs.root.view
    assert isinstance(view, _StatfsSpy) and view.statfs_calls == 1
    assert data.f_blocks == os.statvfs(tmp_path).f_blocks
