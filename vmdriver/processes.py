"""Which process instance is on the other end of a VMM's API socket, and whether it lives.

A QEMU or Cloud Hypervisor started by another tool has no libvirt UUID. What identifies it
is its process: the pid the kernel reports for the socket's peer (``SO_PEERCRED``) together
with the process's start time (``/proc/PID/stat``, field 22), since pids are reused. boxvol
records that pair with each attachment; a record whose pair no longer names a live process
belongs to a VM that has ended.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import os
import socket
import struct
import urllib.parse
from collections.abc import Awaitable, Callable

import trio

from vmdriver.driver import HypervisorError, HypervisorUnavailable

log = logging.getLogger(__name__)

#: How often a watcher looks for a VMM at a socket that has none.
RETRY_SECONDS = 1.0

_UCRED = struct.Struct("3i")


@dataclasses.dataclass(frozen=True, slots=True)
class ProcessInstance:
    """One process instance: its pid and its start time in clock ticks since boot."""

    pid: int
    start_ticks: int

    def __str__(self) -> str:
        return f"pid={self.pid},start={self.start_ticks}"

    @classmethod
    def parse(cls, text: str) -> ProcessInstance | None:
        """The inverse of ``str``; None for text of another shape (another backend's id)."""
        fields = dict(part.partition("=")[::2] for part in text.split(","))
        try:
            return cls(int(fields["pid"]), int(fields["start"]))
        except (KeyError, ValueError):
            return None


def start_ticks(pid: int) -> int | None:
    """The start time of process ``pid`` (clock ticks since boot), None if it does not exist."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # The command name (field 2) may hold spaces and parentheses: split after its last ')'.
    fields = stat[stat.rindex(b")") + 2 :].split()
    return int(fields[19])


def peer_instance(sock: socket.socket | trio.socket.SocketType) -> ProcessInstance:
    """The process instance serving the other end of the connected unix socket ``sock``."""
    pid, _uid, _gid = _UCRED.unpack(
        sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    )
    ticks = start_ticks(pid) if pid > 0 else None
    if ticks is None:
        raise HypervisorError(f"the process behind socket peer pid {pid} is not visible here")
    return ProcessInstance(pid, ticks)


def alive(instance: ProcessInstance) -> bool:
    """Whether that very process still runs (not a zombie, not a new one with its pid)."""
    ticks = start_ticks(instance.pid)
    if ticks != instance.start_ticks:
        return False
    try:
        with open(f"/proc/{instance.pid}/stat", "rb") as f:
            state = f.read().rsplit(b")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state not in (b"Z", b"X")


async def wait_ended(instance: ProcessInstance) -> None:
    """Return once the process has ended (a pidfd becomes readable when it exits)."""
    try:
        pidfd = os.pidfd_open(instance.pid)
    except OSError as exc:
        if exc.errno == errno.ESRCH:
            return
        raise
    try:
        if not alive(instance):  # the pid was reused before the pidfd was taken
            return
        await trio.lowlevel.wait_readable(pidfd)
    finally:
        os.close(pidfd)


def socket_uri_path(uri: str, scheme: str, what: str, example: str) -> str:
    """The API socket a ``SCHEME:///ABSOLUTE/PATH`` URI names (``what`` and ``example`` for
    the message, e.g. "QMP" and "qmp.sock"); refuses anything else."""
    parts = urllib.parse.urlsplit(uri)
    if parts.scheme != scheme or parts.netloc or not parts.path.startswith("/"):
        raise HypervisorUnavailable(
            f"{uri!r} is not a {what} URI: give {scheme}:///ABSOLUTE/PATH/{example} (three slashes)"
        )
    if parts.query or parts.fragment:
        raise HypervisorUnavailable(f"a {what} URI takes no query or fragment: {uri!r}")
    return parts.path


def instance_alive(instance: str, what: str) -> bool:
    """Whether the VMM process a recorded ``pid=N,start=T`` names still runs."""
    process = ProcessInstance.parse(instance)
    if process is None:
        raise HypervisorError(f"{instance!r} is not a {what} process instance (pid=N,start=T)")
    return alive(process)


async def follow_processes(
    probe: Callable[[], Awaitable[ProcessInstance]],
    on_ended: Callable[[str], Awaitable[object]],
    what: str,
) -> None:
    """Follow the VMM processes behind one API socket, one after another, until cancelled:
    ``probe`` names the one serving now (HypervisorUnavailable while none does, retried
    every ``RETRY_SECONDS``); each one's end, seen through its pidfd, goes to ``on_ended``."""
    while True:
        try:
            instance = await probe()
        except HypervisorUnavailable as exc:
            log.debug("watch %s: %s", what, exc.message)
            await trio.sleep(RETRY_SECONDS)
            continue
        log.info("watch %s: following %s", what, instance)
        await wait_ended(instance)
        log.info("watch %s: %s ended", what, instance)
        await on_ended(str(instance))
