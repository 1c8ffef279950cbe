"""What boxvold's two process supervisors share (``export_server.FuseServerSupervisor`` and
``vhost.VhostSupervisor``): the state the API reports about the process, the cancel scope a
stop cancels, and the question a stop of boxvold asks (``volumed.stop_policy``)."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import trio

log = logging.getLogger(__name__)


class Supervisor:
    """One supervised process of one export: its pid, restarts and last exit status.

    Attributes:
        keep_at_stop: asked when boxvold stops (not when the export is removed); True leaves
            the process serving, for the next boxvold to re-adopt.
    """

    #: What the process is, in log lines ("export server", "virtiofsd").
    process_name = "process"

    def __init__(self, export_id: str, keep_at_stop: Callable[[], Awaitable[bool]] | None) -> None:
        self.export_id = export_id
        self.keep_at_stop = keep_at_stop
        self.pid: int | None = None
        self.restarts = 0
        self.last_exit: int | None = None
        self._stopping = False
        self._scope: trio.CancelScope | None = None
        self._done = trio.Event()

    def status(self) -> dict[str, object]:
        """What the API reports about the process behind the export."""
        return {"pid": self.pid, "restarts": self.restarts, "last_exit": self.last_exit}

    async def _halt(self) -> None:
        """Stop supervising (the export is being removed) and wait until ``serve`` ended."""
        self._stopping = True
        if self._scope is not None:
            self._scope.cancel()
        await self._done.wait()

    async def _kept(self) -> bool:
        """At boxvold's stop (not the export's removal): whether the process keeps serving."""
        if self._stopping or self.keep_at_stop is None or not await self.keep_at_stop():
            return False
        log.info("%s left serving export=%s pid=%s", self.process_name, self.export_id, self.pid)
        return True
