"""What keeps serving when boxvold stops: the exports in use, and only those.

A stop (``systemctl stop``, SIGTERM) must not cut a guest or a program off its data, and must
not leave anything nobody uses. So at a stop each export is asked once: is it in use? A
virtio-fs export is while a VMM is connected to its vhost-user socket; a FUSE view is while
a process other than boxvol's own has a file, directory, cwd or root under its mountpoint.
An export in use keeps its server and virtiofsd running (logged as a report: what, and why);
the next boxvold re-adopts them, so a restart never cuts anyone off. Everything else is
stopped and its mount removed. An export removed through the API is always stopped.

The decision is made once for every export (one scan of /proc), the first time a supervisor
asks. Blocking scans run in a worker thread.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable, Iterable

import trio

from volumed.vhost import connected_at, unix_socket_tables

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True, slots=True)
class ExportUse:
    """What a stop needs to know of one live export."""

    export_id: str
    #: Its FUSE view's mountpoint, if it has one.
    mountpoint: str | None
    #: Its vhost-user socket, if it is a virtio-fs export.
    socket: str | None
    #: Processes of its own (its server, its virtiofsd): never counted as users.
    own_pids: frozenset[int]


def holders(mountpoint: str, opened: Iterable[tuple[int, str]], own: frozenset[int]) -> list[int]:
    """Pids (other than ``own``) whose opened paths (pid, path) lie at or under
    ``mountpoint``, sorted."""
    top = mountpoint.rstrip("/")
    return sorted(
        {
            pid
            for pid, path in opened
            if pid not in own and (path == top or path.startswith(top + "/"))
        }
    )


def opened_paths() -> list[tuple[int, str]]:
    """(pid, path) for every cwd, root and open file of every process. Blocking: /proc."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        pid = int(entry)
        base = f"/proc/{entry}"
        links = ["cwd", "root"]
        try:
            links += [f"fd/{fd}" for fd in os.listdir(f"{base}/fd")]
        except OSError:
            pass
        for link in links:
            try:
                found.append((pid, os.readlink(f"{base}/{link}")))
            except OSError:
                continue
    return found


def reasons_in_use(uses: list[ExportUse]) -> dict[str, str]:
    """Why each export in use is (export id -> reason); exports not in use are absent.
    Blocking: reads /proc."""
    unix = unix_socket_tables()
    opened = opened_paths() if any(u.mountpoint for u in uses) else []
    reasons = {}
    for use in uses:
        if use.socket is not None and connected_at(unix, use.socket):
            reasons[use.export_id] = "a VMM is connected to its vhost-user socket"
            continue
        if use.mountpoint is not None:
            pids = holders(use.mountpoint, opened, use.own_pids)
            if pids:
                reasons[use.export_id] = "processes use its mountpoint: " + ", ".join(
                    f"{pid} ({_command(pid)})" for pid in pids[:5]
                )
    return reasons


def _command(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as comm:
            return comm.read().strip()
    except OSError:
        return "?"


class StopPolicy:
    """Decides, once per stop, which exports keep serving (see the module doc)."""

    def __init__(self, snapshot: Callable[[], list[ExportUse]]) -> None:
        self._snapshot = snapshot
        self._lock = trio.Lock()
        self._reasons: dict[str, str] | None = None

    async def keeps(self, export_id: str) -> bool:
        """True if the export is in use and keeps serving through this stop (logged)."""
        async with self._lock:
            if self._reasons is None:
                reasons = await trio.to_thread.run_sync(reasons_in_use, self._snapshot())
                for kept, why in sorted(reasons.items()):
                    log.warning("export left serving at stop export=%s reason=%s", kept, why)
                self._reasons = reasons
        return export_id in self._reasons
