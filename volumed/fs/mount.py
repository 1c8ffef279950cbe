"""Mounting boxvold's filesystem, and clearing a mount a crashed boxvold left behind."""

from __future__ import annotations

import ctypes
import logging
import os

import pyfuse3
import trio

from volumed.fs.operations import BoxvolFS
from volumed.mounts import parse_mountinfo

log = logging.getLogger(__name__)

FS_NAME = "boxvol"
_MNT_DETACH = 2
_libc = ctypes.CDLL(None, use_errno=True)

#: allow_other lets a container's uid or virtiofsd reach an export; default_permissions makes
#: the kernel check every access against the attributes the export presents.
MOUNT_OPTIONS = frozenset(
    {"allow_other", "default_permissions", f"fsname={FS_NAME}", f"subtype={FS_NAME}"}
)


def mounted_at(mountpoint: str) -> bool:
    """True if something is mounted exactly at ``mountpoint`` (per /proc/self/mountinfo)."""
    target = os.path.realpath(mountpoint)
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as table:
        return any(entry.mount_point == target for entry in parse_mountinfo(table.read()))


def detach_stale_mount(mountpoint: str) -> bool:
    """Lazily unmount whatever is left at ``mountpoint`` (e.g. after a SIGKILL).

    Blocking. Returns True if something was detached.
    """
    if not mounted_at(mountpoint):
        return False
    if _libc.umount2(os.fsencode(mountpoint), _MNT_DETACH) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"cannot detach the stale mount at {mountpoint}: {os.strerror(err)}")
    log.warning("detached a stale mount mountpoint=%s", mountpoint)
    return True


async def serve_fuse(
    fs: BoxvolFS,
    mountpoint: str,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Mount ``fs`` at ``mountpoint`` and serve it until cancelled; unmounts on the way out."""
    await trio.to_thread.run_sync(detach_stale_mount, mountpoint)
    os.makedirs(mountpoint, mode=0o755, exist_ok=True)
    pyfuse3.init(fs, mountpoint, set(MOUNT_OPTIONS))
    fs.mounted = True
    log.info("fuse mounted mountpoint=%s", mountpoint)
    try:
        task_status.started()
        await pyfuse3.main()
    finally:
        fs.mounted = False
        pyfuse3.close(unmount=True)
        log.info("fuse unmounted mountpoint=%s", mountpoint)
