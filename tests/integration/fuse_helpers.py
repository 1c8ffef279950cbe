"""Helpers for tests that drive boxvold's FUSE exports from this process or as another uid."""

from __future__ import annotations

import ctypes
import os
import subprocess
from pathlib import Path

_libc = ctypes.CDLL(None, use_errno=True)
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
_SYS_OPENAT2 = 437
RESOLVE_NO_SYMLINKS = 0x04
RESOLVE_BENEATH = 0x08


def renameat2(old: Path, new: Path, flags: int) -> None:
    """rename(2) with flags, on absolute paths."""
    if _libc.renameat2(-100, bytes(old), -100, bytes(new), flags) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), str(old))


class _OpenHow(ctypes.Structure):
    _fields_ = (("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64))


def openat2(dir_fd: int, path: str, flags: int, resolve: int) -> int:
    """openat2(2): resolve ``path`` under ``dir_fd`` with kernel-enforced rules."""
    how = _OpenHow(flags | os.O_CLOEXEC, 0, resolve)
    fd = _libc.syscall(_SYS_OPENAT2, dir_fd, path.encode(), ctypes.byref(how), ctypes.sizeof(how))
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), path)
    return int(fd)


def run_as(uid: int, gid: int, code: str, *args: str, umask: int = 0o022) -> str:
    """Run Python ``code`` as uid/gid (no supplementary groups); returns its stdout."""
    result = subprocess.run(
        # Debian's interpreter: the venv's may live under a home other users cannot enter.
        ["/usr/bin/python3", "-c", code, *args],
        user=uid,
        group=gid,
        extra_groups=[],
        umask=umask,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout
