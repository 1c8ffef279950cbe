"""Mounts the host sees, even when boxvold runs in a mount namespace of its own.

A FUSE export's mount and a sized volume's image mount are used by their paths: host
programs, virtiofsd, QEMU, a container runtime must find them. systemd's sandboxing
(``ProtectSystem=``, ``PrivateTmp=``, ``ProtectHome=``, ``PrivateMounts=``...) puts boxvold in a
mount namespace of its own, a slave of the host's: the host's mounts propagate into it, its
own never propagate out. So when boxvold's mount namespace is not the one of the process
that started it (systemd, PID 1: the host's), it makes (and removes) those mounts in that
namespace, through ``nsenter`` (setns needs a single-threaded process, and boxvold runs
worker threads), and sees them by propagation. Paths are the same in both namespaces: the
directories boxvold writes are the host's.

Started by hand in the host's namespace, the prefix is empty and mounts are made directly.
Blocking: reads two /proc links, once.
"""

from __future__ import annotations

import functools
import logging
import os

log = logging.getLogger(__name__)


def differs_from_host(own: str, host: str | None) -> bool:
    """True if this process's mount namespace (``own``, the text of its ns link) is not the
    host's (``host``; None when it cannot be read, e.g. without access to PID 1)."""
    return host is not None and own != host


@functools.cache
def command_prefix() -> tuple[str, ...]:
    """What runs a mount or umount command in the host's mount namespace: nothing when
    boxvold is in it already, else ``nsenter --mount=/proc/PPID/ns/mnt --``."""
    own = os.readlink("/proc/self/ns/mnt")
    # The starter's namespace: PID 1 under systemd, the shell or test that started us else.
    starter = f"/proc/{os.getppid()}/ns/mnt"
    try:
        host: str | None = os.readlink(starter)
    except OSError as exc:
        log.warning("cannot see the starter's mount namespace (%s); mounting in our own", exc)
        host = None
    if not differs_from_host(own, host):
        return ()
    log.info("mounts are made in the host's mount namespace own=%s host=%s", own, host)
    return ("nsenter", f"--mount={starter}", "--")
