"""Export lifecycle: creates, lists and removes exports, and re-establishes them at start.

It keeps three things in step: the registry's export rows (which make a volume "in use"),
the filesystem's view of each export, and the volume directories opened through the gate.
Runs on the trio loop; registry and gate work go to worker threads.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
from collections.abc import Callable
from typing import Any, TypeVar

import trio
from ulid import ULID

from volumed.errors import BoxvolError, NotFound
from volumed.exports import Export, ExportPolicy, check_consumer, check_policy
from volumed.fs.nodes import ExportState
from volumed.fs.operations import BoxvolFS
from volumed.fs.views import make_view
from volumed.gate import open_volume_directory
from volumed.model import Volume
from volumed.store import VolumeStore, utc_now

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclasses.dataclass(frozen=True, slots=True)
class LiveExport:
    """An export with the volume it serves and where it can be reached."""

    export: Export
    volume: Volume
    mountpoint: str

    def to_json(self) -> dict[str, Any]:
        """The API's view of an export."""
        return {
            "id": self.export.id,
            "kind": self.export.kind,
            "volume": {"id": self.volume.id, "name": self.volume.name},
            **self.export.policy.to_json(),
            "consumer": self.export.consumer,
            "created_at": self.export.created_at,
            "mountpoint": self.mountpoint,
        }


class ExportManager:
    """Every live export of one boxvold."""

    def __init__(
        self, store: VolumeStore, fs: BoxvolFS, mount_root: str, writer: trio.CapacityLimiter
    ) -> None:
        self.store = store
        self.fs = fs
        self.mount_root = mount_root
        self._writer = writer
        self._live: dict[str, tuple[LiveExport, ExportState]] = {}
        #: Export creation and removal (and forced volume removal) happen one at a time.
        self.lock = trio.Lock()

    async def _thread(self, fn: Callable[..., T], *args: Any) -> T:
        return await trio.to_thread.run_sync(functools.partial(fn, *args), limiter=self._writer)

    def _attach(self, export: Export, volume: Volume, fd: int, st: os.stat_result) -> LiveExport:
        view = make_view(read_only=export.policy.read_only, owner=export.policy.owner)
        state = ExportState(export, view)
        self.fs.add_export(state, fd, st)
        live = LiveExport(export, volume, os.path.join(self.mount_root, export.id))
        self._live[export.id] = (live, state)
        return live

    async def restore(self) -> None:
        """Re-establish the exports the registry records (after a restart or a crash)."""
        for export_id, volume_id, kind, created_at, spec in await self._thread(
            self.store.registry.exports
        ):
            volume = await self._thread(self.store.registry.by_id, volume_id)
            opened = None
            reason = f"volume {volume_id} is gone"
            if volume is not None and kind == "fuse":
                try:
                    opened = await self._thread(open_volume_directory, self.store.layout, volume)
                except (OSError, BoxvolError) as exc:
                    reason = str(exc)
            if volume is None or opened is None:
                log.warning("export dropped id=%s reason=%s", export_id, reason)
                await self._thread(self.store.registry.remove_export, export_id)
                continue
            fd, st = opened
            export = Export(
                id=export_id,
                volume_id=volume_id,
                kind="fuse",
                policy=ExportPolicy.from_json(spec),
                created_at=created_at,
                consumer=_str_or_none(spec.get("consumer")),
            )
            self._attach(export, volume, fd, st)
            log.info("export restored id=%s volume=%s", export_id, volume.key)

    async def create(self, ref: str, policy: ExportPolicy, consumer: str | None) -> LiveExport:
        """Export the volume ``ref`` names under ``policy``."""
        check_policy(policy)
        check_consumer(consumer)
        async with self.lock:
            volume = await self._thread(self.store.resolve, ref)
            fd, st = await self._thread(open_volume_directory, self.store.layout, volume)
            export = Export(
                id=str(ULID()),
                volume_id=volume.id,
                kind="fuse",
                policy=policy,
                created_at=utc_now(),
                consumer=consumer,
            )
            spec = {**policy.to_json(), "consumer": consumer}
            try:
                await self._thread(
                    self.store.registry.add_export,
                    export.id,
                    volume.id,
                    export.kind,
                    export.created_at,
                    spec,
                )
            except BaseException:
                os.close(fd)
                raise
            live = self._attach(export, volume, fd, st)
        log.info(
            "export created id=%s volume=%s read_only=%s owner=%s cache=%s",
            export.id,
            volume.key,
            policy.read_only,
            policy.owner,
            policy.cache,
        )
        return live

    def get(self, export_id: str) -> LiveExport:
        """A live export by id (any case)."""
        entry = self._live.get(export_id.upper())
        if entry is None:
            raise NotFound(f"no export with id {export_id!r}; list exports with 'boxvol export ls'")
        return entry[0]

    def list(self, volume_id: str | None = None) -> list[LiveExport]:
        """Live exports (of one volume if given), oldest first."""
        return [
            live
            for live, _ in sorted(self._live.values(), key=lambda e: e[0].export.id)
            if volume_id is None or live.volume.id == volume_id
        ]

    async def remove(self, export_id: str) -> LiveExport:
        """Tear an export down: its directory vanishes and its open files go stale."""
        async with self.lock:
            return await self._remove_locked(export_id)

    async def _remove_locked(self, export_id: str) -> LiveExport:
        live = self.get(export_id)
        _, state = self._live.pop(live.export.id)
        await self.fs.remove_export(state)
        await self._thread(self.store.registry.remove_export, live.export.id)
        log.info("export removed id=%s volume=%s", live.export.id, live.volume.key)
        return live

    async def remove_volume(self, ref: str, *, force: bool) -> Volume:
        """Remove a volume; with ``force`` its exports are torn down first."""
        async with self.lock:
            volume = await self._thread(self.store.resolve, ref)
            if force:
                for live in self.list(volume.id):
                    await self._remove_locked(live.export.id)
            return await self._thread(functools.partial(self.store.remove, volume.id, force=force))

    async def close(self) -> None:
        """Drop every export from the filesystem (the registry keeps them for next start)."""
        for _, state in list(self._live.values()):
            await self.fs.remove_export(state)
        self._live.clear()


def _str_or_none(value: object) -> str | None:
    return value if isinstance(value, str) else None
