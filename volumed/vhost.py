"""Supervision of the virtiofsd behind one virtio-fs export.

boxvold owns the vhost-user socket: it binds and listens itself (mode 0660, the group QEMU
runs with) and hands the listening fd to virtiofsd, which serves one connection (one boot
or one hot-plug) and exits. While the export exists the supervisor re-arms a fresh
virtiofsd after each exit, records crashes, and backs off when one crashes at once; while
it backs off the socket is closed, so a VMM that connects then is refused at once instead of
waiting in the backlog. A virtiofsd serving a volume directly outlives a clean boxvold stop
and is re-adopted at the next start (found through its pidfile); removing the export always
stops it.

After a crash of boxvold (SIGKILL), a virtiofsd serving a volume directly is re-adopted, and
so is one serving a FUSE view whose server was re-adopted too (``source_survived``). One
serving a FUSE view that did not survive (its server died meanwhile) has lost that source. If
no guest is connected to it, it is stopped and a fresh one is armed on the new view, so the
next boot gets a working share.
If a guest is connected, the guest gets I/O errors on the share until it lets go of it;
stopping that virtiofsd would hang the guest's I/O instead (QEMU 7.2 cannot reconnect a
vhost-user-fs device), so it is re-adopted, reported as ``source_lost``, left running when
boxvold stops cleanly, and replaced by a fresh one once the guest's session ends.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import time
from collections.abc import Awaitable, Callable

import trio

from volumed.supervision import Supervisor
from volumed.unix_sockets import bind_private, check_socket_path
from volumed.virtiofsd import Virtiofsd

log = logging.getLogger(__name__)

#: A virtiofsd that exits sooner than this after starting counts as crashing at once.
QUICK_EXIT = 1.0
MAX_BACKOFF = 5.0
STOP_GRACE = 5.0


def bind_vhost_socket(path: str, gid: int | None) -> socket.socket:
    """A listening vhost-user socket at ``path``, 0660 and owned by group ``gid``."""
    check_socket_path(path, "vhost-user socket")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    sock = bind_private(path, 0o660)
    if gid is not None:
        os.chown(path, -1, gid)
    sock.listen(1)
    return sock


#: /proc/net/unix's state of a connected socket (SS_CONNECTED).
_CONNECTED = "03"


def connected_at(proc_net_unix: str, path: str) -> bool:
    """True if ``proc_net_unix`` (the text of /proc/net/unix) lists a connected socket bound
    to ``path``: a connection accepted on the listener there shares its address, while the
    listener itself is unconnected and a VMM's end has no address."""
    for line in proc_net_unix.splitlines()[1:]:
        fields = line.split(None, 7)
        if len(fields) == 8 and fields[5] == _CONNECTED and fields[7] == path:
            return True
    return False


def unix_socket_tables() -> str:
    """/proc/net/unix of boxvold's network namespace and of the host's (PID 1's). The end a
    VMM's connection gets on our side is made in the VMM's namespace, and under systemd
    (PrivateNetwork=yes) that is not ours: QEMU runs in the host's. A VMM in a third network
    namespace is not seen. Blocking."""
    tables = []
    for path in ("/proc/self/net/unix", "/proc/1/net/unix"):
        try:
            with open(path) as table:
                tables.append(table.read())
        except OSError:
            continue
    # One header line (connected_at skips it), then every table's rows.
    return "\n".join(["header", *(line for t in tables for line in t.splitlines()[1:])])


def _guest_connected(path: str) -> bool:
    """Blocking: whether a VMM is connected to the vhost-user socket at ``path``."""
    return connected_at(unix_socket_tables(), path)


def _alive_virtiofsd(pid: int, marker: str) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
            args = cmdline.read().split(b"\0")
    except OSError:
        return False
    return any(b"virtiofsd" in arg for arg in args[:1]) and any(
        marker.encode() in arg for arg in args
    )


class VhostSupervisor(Supervisor):
    """Keeps a virtiofsd armed on one export's socket while the export exists."""

    process_name = "virtiofsd"

    def __init__(
        self,
        export_id: str,
        *,
        socket_path: str,
        source: str,
        virtiofsd: Virtiofsd,
        gid: int | None,
        keep_on_shutdown: bool,
        source_survived: bool = False,
        keep_at_stop: Callable[[], Awaitable[bool]] | None = None,
    ) -> None:
        super().__init__(export_id, keep_at_stop)
        self.socket_path = socket_path
        self.source = source
        self.virtiofsd = virtiofsd
        self.gid = gid
        #: True for direct exports, whose source does not go away with boxvold: a virtiofsd
        #: left by a crashed boxvold is re-adopted as it is.
        self.keep_on_shutdown = keep_on_shutdown
        #: The FUSE view it serves outlived the previous boxvold (its server was re-adopted):
        #: a virtiofsd left on it is re-adopted as one on a volume is, its source intact.
        self.source_survived = source_survived
        base = os.path.splitext(socket_path)[0]
        self.pidfile = base + ".pid"
        self.logfile = base + ".log"
        #: True while an adopted virtiofsd serves a FUSE view that died with boxvold.
        self.source_lost = False
        #: Set by ``restart``: the next exit is a replacement, not a crash.
        self._replace = False

    def status(self) -> dict[str, object]:
        """What the API reports about the daemon behind the export."""
        return {**super().status(), "source_lost": self.source_lost}

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run until stopped (or boxvold shuts down)."""
        try:
            with trio.CancelScope() as scope:
                self._scope = scope
                adopted = self._adoptable_pid()
                if (
                    adopted is not None
                    and not self.keep_on_shutdown
                    and not self.source_survived
                    and not await trio.to_thread.run_sync(_guest_connected, self.socket_path)
                ):
                    await self._stop_idle_lost(adopted)
                    adopted = None
                if adopted is not None:
                    task_status.started()
                    task_status = trio.TASK_STATUS_IGNORED
                    await self._serve_adopted(adopted)
                await self._keep_armed(task_status)
        finally:
            self._done.set()

    async def stop(self) -> None:
        """Stop supervising and stop virtiofsd; the socket goes away."""
        await self._halt()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.socket_path)
        for leftover in (self.pidfile, self.logfile):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(leftover)

    async def restart(self) -> None:
        """Replace the running virtiofsd with a fresh one: its source (an export server's
        FUSE mount) was mounted again after that server died."""
        pid = self.pid
        if pid is None:
            return
        self._replace = True
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)

    def _adoptable_pid(self) -> int | None:
        try:
            with open(self.pidfile) as pidfile:
                pid = int(pidfile.read().strip())
        except (OSError, ValueError):
            return None
        return pid if _alive_virtiofsd(pid, self.source) else None

    async def _stop_idle_lost(self, pid: int) -> None:
        """Stop a virtiofsd left by a crashed boxvold on a FUSE view that died with it, while
        no guest uses it: the next guest to connect would get a dead share."""
        log.warning(
            "virtiofsd left by the previous boxvold export=%s pid=%d serves a FUSE view that "
            "died with it and no guest is connected: stopping it and arming a fresh one",
            self.export_id,
            pid,
        )
        try:
            pidfd = os.pidfd_open(pid)
        except ProcessLookupError:
            return
        try:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
            with trio.move_on_after(STOP_GRACE):
                await trio.lowlevel.wait_readable(pidfd)
                return
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            await trio.lowlevel.wait_readable(pidfd)
        finally:
            os.close(pidfd)

    async def _serve_adopted(self, pid: int) -> None:
        self.source_lost = not (self.keep_on_shutdown or self.source_survived)
        if self.source_lost:
            log.warning(
                "virtiofsd re-adopted export=%s pid=%d source_lost=true: its FUSE view died "
                "with the previous boxvold, so the guest gets I/O errors on this share until "
                "it lets go of it (shut the domain down, or detach the share; a reboot inside "
                "the guest keeps the connection); a fresh virtiofsd is armed then",
                self.export_id,
                pid,
            )
        else:
            log.info("virtiofsd re-adopted export=%s pid=%d", self.export_id, pid)
        try:
            await self._wait_adopted(pid)
        finally:
            self.source_lost = False

    async def _wait_adopted(self, pid: int) -> None:
        self.pid = pid
        try:
            pidfd = os.pidfd_open(pid)
        except ProcessLookupError:
            return
        try:
            try:
                await trio.lowlevel.wait_readable(pidfd)
            except BaseException:
                # Kept when boxvold stops: one in use (stop_policy), and one whose guest still
                # holds a lost FUSE view (stopping it would hang the guest).
                with trio.CancelScope(shield=True):
                    kept = self.source_lost or await self._kept()
                if self._stopping or not kept:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGTERM)
                raise
        finally:
            os.close(pidfd)
        self.pid = None
        log.info("re-adopted virtiofsd exited export=%s", self.export_id)

    async def _keep_armed(self, task_status: trio.TaskStatus[None]) -> None:
        backoff = 0.1
        while True:
            try:
                listener = await trio.to_thread.run_sync(
                    bind_vhost_socket, self.socket_path, self.gid
                )
            except OSError as exc:
                if task_status is not trio.TASK_STATUS_IGNORED:
                    raise  # the export is being created: its creator gets the error
                log.error(
                    "cannot bind the vhost-user socket export=%s socket=%s: %s; retrying in %.1f s",
                    self.export_id,
                    self.socket_path,
                    exc,
                    backoff,
                )
                await trio.sleep(backoff)
                backoff = min(backoff * 2, MAX_BACKOFF)
                continue
            with listener:
                while True:
                    started = time.monotonic()
                    status = await self._run_once(listener, task_status)
                    task_status = trio.TASK_STATUS_IGNORED
                    if self._replace:
                        self._replace = False
                        log.info("virtiofsd re-armed on a fresh source export=%s", self.export_id)
                        continue
                    self.last_exit = status
                    if status == 0:
                        log.info("virtiofsd session ended export=%s; re-arming", self.export_id)
                        backoff = 0.1
                        continue
                    self.restarts += 1
                    log.warning(
                        "virtiofsd crashed export=%s status=%s restarts=%d log=%s",
                        self.export_id,
                        status,
                        self.restarts,
                        self.logfile,
                    )
                    if time.monotonic() - started < QUICK_EXIT:
                        break
            # Crashing at once: refuse connections while backing off.
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.socket_path)
            log.warning(
                "virtiofsd backing off export=%s seconds=%.1f (socket closed meanwhile)",
                self.export_id,
                backoff,
            )
            await trio.sleep(backoff)
            backoff = min(backoff * 2, MAX_BACKOFF)

    async def _run_once(self, listener: socket.socket, task_status: trio.TaskStatus[None]) -> int:
        fd = listener.fileno()
        command = self.virtiofsd.command(fd=fd, source=self.source)
        with open(self.logfile, "ab") as logfile:
            process = await trio.lowlevel.open_process(
                command,
                pass_fds=(fd,),
                stdin=subprocess.DEVNULL,
                stdout=logfile,
                stderr=logfile,
                start_new_session=True,
            )
        self.pid = process.pid
        with open(self.pidfile, "w") as pidfile:
            pidfile.write(f"{process.pid}\n")
        log.info(
            "virtiofsd armed export=%s pid=%d socket=%s source=%s",
            self.export_id,
            process.pid,
            self.socket_path,
            self.source,
        )
        task_status.started()
        try:
            return await process.wait()
        except BaseException:
            with trio.CancelScope(shield=True):
                kept = await self._kept()
            if not kept:
                await self._terminate(process)
            raise
        finally:
            if process.returncode is not None:
                self.pid = None

    async def _terminate(self, process: trio.Process) -> None:
        with trio.move_on_after(STOP_GRACE, shield=True) as grace:
            process.terminate()
            await process.wait()
        if grace.cancelled_caught:
            process.kill()
            with trio.CancelScope(shield=True):
                await process.wait()
        log.info("virtiofsd stopped export=%s status=%s", self.export_id, process.returncode)
