"""Supervision of the server process behind one FUSE export (``volumed.fs.server``).

For each export with a FUSE view, boxvold opens the volume's directory through the gate,
mounts ``/dev/fuse`` at ``<runtime>/fs/<export-id>`` (``volumed.fs.fuse_mount``) and starts
the export's server with both fds; the server says "ready" on a pipe once it serves. While
the export exists the supervisor restarts a server that dies: the dead mount (ENOTCONN) is
detached, a fresh one is mounted at the same path, the restart is counted and its exit
status kept for ``boxvol export ls``/``inspect``, and ``on_restart`` runs (a virtiofsd on the
view is re-armed). A server that dies at once is retried with a growing pause. Removing the
export, or stopping boxvold, stops the server and detaches its mount.

Must not import pyfuse3: boxvold's process never loads it (the servers do).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Container

import trio

from volumed.errors import StorageError
from volumed.exports import Export, encode_export
from volumed.fs.fuse_mount import detach, mount_fuse, mounted_at
from volumed.supervision import Supervisor

log = logging.getLogger(__name__)

#: A server that exits sooner than this after it was ready counts as crashing at once.
QUICK_EXIT = 1.0
FIRST_BACKOFF = 0.05
MAX_BACKOFF = 5.0
#: How long a server gets to start serving, and to stop on SIGTERM before SIGKILL.
START_TIMEOUT = 30.0
STOP_GRACE = 5.0


def server_command(export: Export, fuse_fd: int, root_fd: int, ready_fd: int) -> list[str]:
    """The command line of an export's server."""
    return [
        sys.executable,
        "-m",
        "volumed.fs.server",
        "--fuse-fd",
        str(fuse_fd),
        "--root-fd",
        str(root_fd),
        "--ready-fd",
        str(ready_fd),
        "--export",
        encode_export(export),
    ]


class FuseServerSupervisor(Supervisor):
    """Keeps one export's FUSE server serving at its mountpoint while the export exists."""

    process_name = "export server"

    def __init__(
        self,
        export: Export,
        *,
        mountpoint: str,
        open_root: Callable[[], tuple[int, os.stat_result]],
        state_dir: str,
        on_restart: Callable[[], Awaitable[None]] | None = None,
        keep_at_stop: Callable[[], Awaitable[bool]] | None = None,
    ) -> None:
        super().__init__(export.id, keep_at_stop)
        self.export = export
        self.mountpoint = mountpoint
        #: Opens the volume's directory through the gate (blocking; run in a thread).
        self.open_root = open_root
        self.logfile = os.path.join(state_dir, f"{export.id}.log")
        #: The running server's pid, for a boxvold that starts after a crash of this one.
        self.pidfile = os.path.join(state_dir, f"{export.id}.pid")
        self.on_restart = on_restart
        #: The server was left serving by a previous boxvold (a crash) and taken over.
        self.adopted = False

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve until stopped (or boxvold shuts down). The first start's failure is
        raised (the export is not created); later ones are retried."""
        try:
            with trio.CancelScope() as scope:
                self._scope = scope
                adopted = await trio.to_thread.run_sync(self._adoptable_pid)
                if adopted is not None:
                    self.adopted = True
                    task_status.started()
                    status = await self._watch_adopted(adopted)
                else:
                    status = await self._run_once(task_status, first=True)
                backoff = FIRST_BACKOFF
                while not self._stopping:
                    self.restarts += 1
                    self.last_exit = status
                    log.warning(
                        "export server died export=%s status=%s restarts=%d log=%s",
                        self.export.id,
                        status,
                        self.restarts,
                        self.logfile,
                    )
                    await trio.to_thread.run_sync(detach, self.mountpoint)
                    started = time.monotonic()
                    try:
                        status = await self._run_once(trio.TASK_STATUS_IGNORED, first=False)
                    except (OSError, StorageError) as exc:
                        log.error("export server restart failed export=%s: %s", self.export.id, exc)
                        status = -1
                    if time.monotonic() - started < QUICK_EXIT:
                        await trio.sleep(backoff)
                        backoff = min(backoff * 2, MAX_BACKOFF)
                    else:
                        backoff = FIRST_BACKOFF
        finally:
            self._done.set()

    async def stop(self) -> None:
        """Stop the server, detach its mount and remove its mountpoint, log and pidfile."""
        await self._halt()
        await trio.to_thread.run_sync(self._clean_up)

    def _clean_up(self) -> None:
        detach(self.mountpoint)
        for path in (self.pidfile, self.logfile):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        with contextlib.suppress(OSError):
            os.rmdir(self.mountpoint)

    def _adoptable_pid(self) -> int | None:
        """The server a previous boxvold left serving this export, if it still does: its
        pidfile names a live ``volumed.fs.server`` of this export and the mount is there
        (read from mountinfo: the mount itself is never touched, its server may be stuck)."""
        pid = _server_of(self.pidfile, self.export.id)
        if pid is None or not mounted_at(self.mountpoint):
            return None
        return pid

    async def _watch_adopted(self, pid: int) -> int:
        """Follow an adopted server until it ends (-1: a non-child's status is unknown); on
        cancellation, stop it and detach its mount as for one of ours."""
        self.pid = pid
        log.info("export server re-adopted export=%s pid=%d", self.export.id, pid)
        try:
            pidfd = os.pidfd_open(pid)
        except ProcessLookupError:
            self.pid = None
            return -1
        try:
            await trio.lowlevel.wait_readable(pidfd)
        except BaseException:
            with trio.CancelScope(shield=True):
                if not await self._kept():
                    await trio.to_thread.run_sync(kill_and_wait, pid)
                    await trio.to_thread.run_sync(detach, self.mountpoint)
            raise
        finally:
            os.close(pidfd)
            self.pid = None
        return -1

    async def _run_once(self, task_status: trio.TaskStatus[None], *, first: bool) -> int:
        """Mount, start a server and wait for it to end; its exit status."""
        root_fd, _st = await trio.to_thread.run_sync(self.open_root)
        # A dead mount (its server died while no boxvold watched) is cleared first.
        await trio.to_thread.run_sync(detach, self.mountpoint)
        try:
            fuse_fd = await trio.to_thread.run_sync(mount_fuse, self.mountpoint)
        except OSError as exc:
            os.close(root_fd)
            raise StorageError(
                f"cannot mount the FUSE view of export {self.export.id}: {exc}; check that "
                "/dev/fuse exists and that boxvold may use it (DeviceAllow= in its unit)"
            ) from exc
        except BaseException:
            os.close(root_fd)
            raise
        ready_r, ready_w = os.pipe2(os.O_CLOEXEC)
        try:
            # Shielded: a cancellation landing once the child exists would lose it.
            with open(self.logfile, "ab") as logfile, trio.CancelScope(shield=True):
                process = await trio.lowlevel.open_process(
                    server_command(self.export, fuse_fd, root_fd, ready_w),
                    pass_fds=(fuse_fd, root_fd, ready_w),
                    stdin=subprocess.DEVNULL,
                    stdout=logfile,
                    stderr=logfile,
                    start_new_session=True,
                )
        except BaseException:
            os.close(ready_r)
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(detach, self.mountpoint)
            raise
        finally:
            os.close(fuse_fd)
            os.close(root_fd)
            os.close(ready_w)
        self.pid = process.pid
        try:
            _write_pidfile(self.pidfile, process.pid)  # a few bytes in boxvold's runtime dir
            try:
                ready = await self._await_ready(ready_r)
            finally:
                os.close(ready_r)
            if not ready:
                await self._gone(process)
                self._raise_not_started(process)
            log.info(
                "export server serving export=%s pid=%d mountpoint=%s%s",
                self.export.id,
                process.pid,
                self.mountpoint,
                "" if first else " (restarted)",
            )
            task_status.started()
            if not first and self.on_restart is not None:
                await self.on_restart()
            return await process.wait()
        except BaseException:
            with trio.CancelScope(shield=True):
                kept = await self._kept()
            if not kept:
                await self._gone(process)
            raise
        finally:
            if process.returncode is not None:
                self.pid = None

    async def _gone(self, process: trio.Process) -> None:
        """The server stopped (terminated if it still runs) and its mount detached."""
        with trio.CancelScope(shield=True):
            await self._terminate(process)
            await trio.to_thread.run_sync(detach, self.mountpoint)

    def _raise_not_started(self, process: trio.Process) -> None:
        raise StorageError(
            f"the FUSE server of export {self.export.id} exited with status "
            f"{process.returncode} before serving; see {self.logfile}"
        )

    async def _await_ready(self, ready_r: int) -> bool:
        """True once the server said "ready"; False if it exited or took too long."""
        with trio.move_on_after(START_TIMEOUT):
            await trio.lowlevel.wait_readable(ready_r)
            return os.read(ready_r, 16).startswith(b"ready")
        return False

    async def _terminate(self, process: trio.Process) -> None:
        if process.returncode is not None:
            return
        with trio.move_on_after(STOP_GRACE) as grace:
            process.terminate()
            await process.wait()
        if grace.cancelled_caught:
            process.kill()
            await process.wait()
        log.info("export server stopped export=%s status=%s", self.export.id, process.returncode)


def _write_pidfile(path: str, pid: int) -> None:
    with open(path, "w") as pidfile:
        pidfile.write(f"{pid}\n")


def _server_of(pidfile: str, export_id: str) -> int | None:
    """The pid a pidfile names if it is a live server of ``export_id``."""
    try:
        with open(pidfile) as f:
            pid = int(f.read().strip())
        with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
            argv = cmdline.read().split(b"\0")
        with open(f"/proc/{pid}/stat", "rb") as stat:
            state = stat.read().rsplit(b")", 1)[1].split()[0]
    except (OSError, ValueError):
        return None
    if b"volumed.fs.server" not in argv or export_id.encode() not in b" ".join(argv):
        return None
    return None if state in (b"Z", b"X") else pid


def stop_orphans(state_dir: str, keep: Container[str]) -> list[int]:
    """Stop the export servers a crashed boxvold left running for exports not in ``keep``
    (found by their pidfiles, checked by command line). Blocking."""
    stopped: list[int] = []
    try:
        names = os.listdir(state_dir)
    except FileNotFoundError:
        return stopped
    for name in names:
        export_id = name[: -len(".pid")]
        if not name.endswith(".pid") or export_id in keep:
            continue
        path = os.path.join(state_dir, name)
        pid = _server_of(path, export_id)
        if pid is not None:
            kill_and_wait(pid)
            stopped.append(pid)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
    return stopped


def kill_and_wait(pid: int) -> None:
    """SIGTERM ``pid``, SIGKILL it after STOP_GRACE, and wait until it is gone. Blocking."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + STOP_GRACE
    while time.monotonic() < deadline:
        if not os.path.exists(f"/proc/{pid}"):
            return
        time.sleep(0.02)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
