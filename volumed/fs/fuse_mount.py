"""FUSE mounts made by boxvold for its export servers, without libfuse or pyfuse3.

boxvold opens ``/dev/fuse``, mounts it at ``<runtime>/fs/<export-id>`` with mount(2) in the
host's mount namespace (directly, or through ``nsenter`` when boxvold runs in a namespace of
its own: ``volumed.host_namespace``), and hands the fd to the export's server process
(``volumed.fs.server``), which serves it from its sandbox; the mount is visible to host
programs, virtiofsd and VMMs by its path, while the server never sees the host. A server that
dies leaves a dead mount (ENOTCONN): ``detach`` clears it before a new one is made.

Must not import pyfuse3: boxvold's own process never loads it.
"""

from __future__ import annotations

import ctypes
import logging
import os
import stat

from volumed.host_namespace import command_prefix
from volumed.mounts import parse_mountinfo

log = logging.getLogger(__name__)

FS_NAME = "boxvol"
_MS_NOSUID = 2
_MS_NODEV = 4
_MNT_DETACH = 2
_libc = ctypes.CDLL(None, use_errno=True)


def mount_options(fd: int, root_mode: int) -> str:
    """The FUSE mount data: the device fd, the root's type, root as the mounting user,
    ``allow_other`` (a container's uid and virtiofsd reach the export) and
    ``default_permissions`` (the kernel checks every access against the presented
    attributes)."""
    return (
        f"fd={fd},rootmode={stat.S_IFMT(root_mode):o},user_id=0,group_id=0,"
        "allow_other,default_permissions"
    )


def mount_fuse(mountpoint: str) -> int:
    """Open ``/dev/fuse`` and mount it at ``mountpoint`` (a directory, made if missing);
    the open device fd, to be served. Blocking. Raises OSError, leaving nothing mounted."""
    os.makedirs(mountpoint, mode=0o755, exist_ok=True)
    fd = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
    data = mount_options(fd, stat.S_IFDIR)
    prefix = command_prefix()
    if prefix:
        try:
            _run_in_host(
                [
                    *prefix,
                    "mount",
                    "-i",
                    "-t",
                    f"fuse.{FS_NAME}",
                    "-o",
                    f"nosuid,nodev,{data}",
                    FS_NAME,
                    mountpoint,
                ],
                f"cannot mount FUSE at {mountpoint}",
                pass_fds=(fd,),
            )
        except BaseException:
            os.close(fd)
            raise
        return fd
    result = _libc.mount(
        FS_NAME.encode(),
        os.fsencode(mountpoint),
        f"fuse.{FS_NAME}".encode(),
        _MS_NOSUID | _MS_NODEV,
        data.encode(),
    )
    if result != 0:
        err = ctypes.get_errno()
        os.close(fd)
        raise OSError(err, f"cannot mount FUSE at {mountpoint}: {os.strerror(err)}")
    return fd


def _run_in_host(argv: list[str], what: str, pass_fds: tuple[int, ...] = ()) -> None:
    """Run a mount or umount command (in the host's mount namespace); OSError if it fails."""
    import subprocess

    result = subprocess.run(
        argv, capture_output=True, text=True, errors="replace", pass_fds=pass_fds, check=False
    )
    if result.returncode != 0:
        raise OSError(0, f"{what}: {' '.join(result.stderr.split()) or result.returncode}")


def mounted_at(mountpoint: str) -> bool:
    """True if something is mounted exactly at ``mountpoint`` (per /proc/self/mountinfo)."""
    target = os.path.realpath(mountpoint)
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as table:
        return any(entry.mount_point == target for entry in parse_mountinfo(table.read()))


def mounts_under(root: str) -> list[str]:
    """Mount points at or below ``root``, deepest first."""
    top = os.path.realpath(root)
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as table:
        points = [
            entry.mount_point
            for entry in parse_mountinfo(table.read())
            if entry.mount_point == top or entry.mount_point.startswith(top + "/")
        ]
    return sorted(set(points), key=len, reverse=True)


def detach_all_under(root: str) -> list[str]:
    """Detach every mount at or below ``root`` (what a crashed boxvold left). Blocking."""
    detached = []
    for point in mounts_under(root):
        try:
            _detach(point)
        except OSError as exc:
            log.warning("cannot detach a stale mount mountpoint=%s error=%s", point, exc)
        else:
            detached.append(point)
    return detached


def detach(mountpoint: str) -> bool:
    """Lazily unmount whatever is mounted at ``mountpoint`` (a dead server's mount, one
    being torn down). Blocking. True if something was detached."""
    if not mounted_at(mountpoint):
        return False
    _detach(mountpoint)
    return True


def _detach(mountpoint: str) -> None:
    """umount2(MNT_DETACH) at ``mountpoint``, in the host's mount namespace."""
    prefix = command_prefix()
    if prefix:
        _run_in_host(
            [*prefix, "umount", "-l", mountpoint], f"cannot detach the mount at {mountpoint}"
        )
        return
    if _libc.umount2(os.fsencode(mountpoint), _MNT_DETACH) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"cannot detach the mount at {mountpoint}: {os.strerror(err)}")
