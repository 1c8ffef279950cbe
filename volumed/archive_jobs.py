"""boxvold's side of archives: resolve the volume, open it through the gate, and run one
archive worker (``volumed.archive_worker``) with the data fd the client passed.

The data never flows through boxvold: the client's pipe end goes straight to the worker
(``pass_fds``) and boxvold closes its own copy at once; its loop only waits for the worker's
exit and reads the worker's small JSON report. The worker runs in the volume's sandbox, so
everything that touches volume data happens in a child process.

A restore marks its volume busy (``VolumeStore.occupied``) for its whole run, after checking
it has no live export under the export manager's lock: no export of it may appear, and it is
not removed or resized, while the worker replaces its content; other volumes are not held up.
An archive marks it too (archives may overlap one another, not a restore). A missing named
volume is created by the restore and removed again if the restore fails. Must not import
pyfuse3.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import trio

from volumed import errors
from volumed.export_manager import ExportManager
from volumed.gate import open_volume_directory
from volumed.model import Volume
from volumed.names import is_valid_name
from volumed.store import VolumeStore

log = logging.getLogger(__name__)
T = TypeVar("T")

#: Archive workers at once (each reads or writes a whole volume; the rest queue).
MAX_WORKERS = 2
#: The most a worker's report may hold (it is a few counts).
MAX_REPORT_BYTES = 1 << 16
#: Seconds a worker gets to clean up after SIGTERM (a restore deletes its staging tree;
#: one killed before it is done leaves the tree to the next restore's repair).
STOP_GRACE = 10.0


def worker_command(
    mode: str, root_fd: int, data_fd: int, report_fd: int, *, force: bool, image: bool
) -> list[str]:
    """The command line of an archive worker."""
    command = [
        sys.executable,
        "-m",
        "volumed.archive_worker",
        mode,
        "--root-fd",
        str(root_fd),
        "--data-fd",
        str(data_fd),
        "--report-fd",
        str(report_fd),
    ]
    return [*command, *(["--force"] if force else []), *(["--image"] if image else [])]


class ArchiveJobs:
    """Archives and restores of one boxvold's volumes."""

    def __init__(
        self, store: VolumeStore, exports: ExportManager, writer: trio.CapacityLimiter
    ) -> None:
        self.store = store
        self.exports = exports
        self._writer = writer
        self._workers = trio.CapacityLimiter(MAX_WORKERS)

    async def _thread(
        self, fn: Callable[..., T], *args: Any, limiter: trio.CapacityLimiter | None = None
    ) -> T:
        return await trio.to_thread.run_sync(functools.partial(fn, *args), limiter=limiter)

    async def archive(self, ref: str, data_fd: int) -> dict[str, Any]:
        """Write the volume ``ref`` names as a tar stream to ``data_fd`` (which this takes
        over and closes); the worker's report."""
        with _owned(data_fd):
            volume = await self._thread(self.store.resolve, ref)
            with self.store.occupied(volume, "being archived", shared=True):
                async with self._workers:
                    root_fd = await self._open(volume)
                    report = await _run_worker("pack", volume, root_fd, data_fd, force=False)
        log.info(
            "volume archived id=%s key=%s entries=%d bytes=%d skipped=%s",
            volume.id,
            volume.key,
            report["entries"],
            report["bytes"],
            report["skipped"],
        )
        return report

    async def restore(self, ref: str, data_fd: int, *, force: bool) -> dict[str, Any]:
        """Replace the content of the volume ``ref`` names with the tar stream read from
        ``data_fd`` (taken over and closed), all or nothing; a missing named volume is
        created (and removed again on failure). The worker's report, with ``created``."""
        with _owned(data_fd), contextlib.ExitStack() as marks:
            async with self.exports.lock:
                volume, created = await self._resolve_or_create(ref)
                try:
                    await self._thread(self._check_not_in_use, volume)
                    marks.enter_context(self.store.occupied(volume, "being restored"))
                except BaseException:
                    if created:
                        with trio.CancelScope(shield=True):
                            await self._remove_created(volume)
                    raise
            try:
                async with self._workers:
                    root_fd = await self._open(volume)
                    report = await _run_worker("unpack", volume, root_fd, data_fd, force=force)
            except BaseException:
                marks.close()
                if created:
                    with trio.CancelScope(shield=True):
                        await self._remove_created(volume)
                raise
        log.info(
            "volume restored id=%s key=%s created=%s entries=%d bytes=%d skipped=%s neutralised=%s",
            volume.id,
            volume.key,
            created,
            report["entries"],
            report["bytes"],
            report["skipped"],
            report["neutralised"],
        )
        return {**report, "created": created}

    def _check_not_in_use(self, volume: Volume) -> None:
        state = self.store.state(volume.id)
        if state.in_use:
            raise errors.InUse(
                f"volume {volume.key!r} has {state.exports} live export(s): a restore "
                "replaces its content under them; remove them first "
                f"('boxvol export ls --volume {volume.key}')"
            )

    async def _resolve_or_create(self, ref: str) -> tuple[Volume, bool]:
        try:
            return await self._thread(self.store.resolve, ref), False
        except errors.NotFound:
            if not is_valid_name(ref):
                raise
        volume = await self._thread(
            functools.partial(self.store.create, name=ref), limiter=self._writer
        )
        return volume, True

    async def _remove_created(self, volume: Volume) -> None:
        try:
            await self._thread(
                functools.partial(self.store.remove, volume.id, force=True), limiter=self._writer
            )
        except errors.BoxvolError as exc:
            log.error("removing a volume a failed restore created failed id=%s: %s", volume.id, exc)

    async def _open(self, volume: Volume) -> int:
        fd, _ = await self._thread(
            functools.partial(
                open_volume_directory, self.store.layout, volume, own_mounts=self.store.own_mounts
            )
        )
        return fd


@contextlib.contextmanager
def _owned(fd: int) -> Iterator[None]:
    """Close ``fd`` at the end of the block whatever happens (a worker got its own copy)."""
    try:
        yield
    finally:
        os.close(fd)


async def _run_worker(
    mode: str, volume: Volume, root_fd: int, data_fd: int, *, force: bool
) -> dict[str, Any]:
    """Run one worker on ``volume``'s ``root_fd`` (closed here) and ``data_fd`` (the caller
    closes it); its report, or the error it reported raised."""
    try:
        report_r, report_w = os.pipe2(os.O_CLOEXEC)
    except BaseException:
        os.close(root_fd)
        raise
    try:
        # Shielded: a cancellation landing once the child exists would lose it.
        with trio.CancelScope(shield=True):
            process = await trio.lowlevel.open_process(
                worker_command(
                    mode, root_fd, data_fd, report_w, force=force, image=volume.backing == "image"
                ),
                pass_fds=(root_fd, data_fd, report_w),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
            )
    except BaseException:
        os.close(report_r)
        raise
    finally:
        os.close(root_fd)
        os.close(report_w)
    stream = trio.lowlevel.FdStream(report_r)
    try:
        raw = bytearray()
        while chunk := await stream.receive_some(MAX_REPORT_BYTES):
            raw += chunk
            if len(raw) > MAX_REPORT_BYTES:
                break
        status = await process.wait()
    except BaseException:
        with trio.CancelScope(shield=True):
            await _stop(process)
        raise
    finally:
        with trio.CancelScope(shield=True):
            await stream.aclose()
    return _answer(mode, status, bytes(raw))


async def _stop(process: trio.Process) -> None:
    if process.returncode is not None:
        return
    process.terminate()
    with trio.move_on_after(STOP_GRACE):
        await process.wait()
        return
    process.kill()
    await process.wait()


def _answer(mode: str, status: int, raw: bytes) -> dict[str, Any]:
    """The report a worker wrote, or the error it reported raised."""
    try:
        answer = json.loads(raw)
    except ValueError:
        answer = None
    if isinstance(answer, dict) and isinstance(answer.get("report"), dict) and status == 0:
        report: dict[str, Any] = answer["report"]
        return report
    error = answer.get("error") if isinstance(answer, dict) else None
    if isinstance(error, dict):
        raise errors.from_code(str(error.get("code")), str(error.get("message")))
    raise errors.StorageError(
        f"the archive worker ({mode}) exited with status {status} without a report; "
        "see boxvold's log"
    )
