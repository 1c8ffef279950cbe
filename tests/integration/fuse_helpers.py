"""Helpers for tests that drive boxvold's FUSE exports from this process or as another uid."""

from __future__ import annotations

import ctypes
import os
import struct
import subprocess
from pathlib import Path
from typing import NamedTuple

from tests.helpers import Daemon

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


class Dirent(NamedTuple):
    """One entry as getdents64(2) returns it: what ``ls -a`` reads, dots included."""

    ino: int
    off: int
    type: int
    name: str


def getdents(fd: int, size: int = 4096) -> list[Dirent]:
    """One getdents64(2) call on the open directory ``fd`` into a ``size``-byte buffer
    (a small one makes the kernel come back for more at the last entry's offset)."""
    buf = ctypes.create_string_buffer(size)
    n = _libc.getdents64(fd, buf, size)
    if n < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    entries, pos = [], 0
    while pos < n:
        ino, off, reclen, kind = struct.unpack_from("<QqHB", buf.raw, pos)
        name = buf.raw[pos + 19 : pos + reclen].split(b"\0", 1)[0]
        entries.append(Dirent(ino, off, kind, os.fsdecode(name)))
        pos += reclen
    return entries


def read_directory(fd: int, size: int = 4096) -> list[Dirent]:
    """Every entry from the directory's current offset to its end, by getdents64 calls."""
    entries: list[Dirent] = []
    while batch := getdents(fd, size):
        entries.extend(batch)
    return entries


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


def run_as(
    uid: int, gid: int, code: str, *args: str, umask: int = 0o022, groups: tuple[int, ...] = ()
) -> str:
    """Run Python ``code`` as uid/gid with only ``groups`` as supplementary groups; returns
    its stdout."""
    result = subprocess.run(
        # Debian's interpreter: the venv's may live under a home other users cannot enter.
        ["/usr/bin/python3", "-c", code, *args],
        user=uid,
        group=gid,
        extra_groups=list(groups),
        umask=umask,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


class Export:
    """A volume, its backing directory and one export of it."""

    def __init__(self, daemon: Daemon, name: str, **policy: object) -> None:
        self.daemon = daemon
        client = daemon.client()
        volumes = {v["name"] for v in client.list_volumes()}
        if name not in volumes:
            client.create_volume(name)
        self.info = client.create_export(name, **policy)  # type: ignore[arg-type]
        self.id: str = self.info["id"]
        self.path = Path(self.info["mountpoint"])
        self.backing = daemon.home / "volumes" / "named" / name
