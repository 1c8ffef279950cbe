"""The FUSE boundary maps errors once: OSError to its errno, anything else to a logged EIO."""

from __future__ import annotations

import errno
import logging

import pyfuse3
import pytest

from volumed.fs.operations import fuse_edge


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
