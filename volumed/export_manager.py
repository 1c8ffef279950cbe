"""Export lifecycle: creates, lists and removes exports, and re-establishes them at start.

It keeps in step the registry's export rows (which make a volume "in use"), the server
process behind each FUSE view (``volumed.export_server``; one process and one mount per
export), the virtiofsd supervisors of virtio-fs exports, and the volume directories opened
through the gate. Runs on the trio loop; registry and gate work go to worker threads. Must not
import pyfuse3: only the export servers load it.

A recorded export whose volume directory has a foreign mount on it at start (the gate raises
``ForeignMount``) is kept but not served: its row stays, so the volume stays in use and is not
pruned, and it is served again at the first start after the mount is gone. Dropping the row
would lose the export for good over a state the operator fixes with one ``umount``.
"""

from __future__ import annotations

import builtins
import contextlib
import dataclasses
import functools
import logging
import os
from collections.abc import Callable
from typing import Any, TypeVar

import trio
from ulid import ULID

from volumed.errors import BoxvolError, Conflict, ForeignMount, NotFound
from volumed.export_server import FuseServerSupervisor, kill_and_wait, stop_orphans
from volumed.exports import (
    DEFAULT_CACHE,
    Export,
    ExportPolicy,
    VirtiofsTarget,
    check_consumer,
    check_policy,
    check_target,
)
from volumed.fs.fuse_mount import detach, mounts_under
from volumed.gate import open_volume_directory, volume_directory
from volumed.gc import (
    Finding,
    FindingKind,
    allocated_bytes,
    is_ours,
    log_findings,
    virtiofsd_source,
)
from volumed.model import Volume
from volumed.stop_policy import ExportUse, StopPolicy
from volumed.store import VolumeStore, utc_now
from volumed.vhost import VhostSupervisor
from volumed.virtiofsd import Virtiofsd, find_virtiofsd

log = logging.getLogger(__name__)
T = TypeVar("T")
VHOST_DIR_MODE = 0o750
#: Others may enter an export whose id they know, not list the exports.
MOUNT_ROOT_MODE = 0o711
#: What ``ExportManager.counts`` sorts exports by.
EXPORT_STATES = ("serving", "unserved")


@dataclasses.dataclass(slots=True)
class LiveExport:
    """An export with the volume it serves, where it is reached, and what serves it."""

    export: Export
    volume: Volume
    mountpoint: str | None
    socket: str | None = None
    #: The server process of its FUSE view, if it has one.
    server: FuseServerSupervisor | None = None
    supervisor: VhostSupervisor | None = None

    def to_json(self) -> dict[str, Any]:
        """The API's view of an export."""
        body: dict[str, Any] = {
            "id": self.export.id,
            "kind": self.export.kind,
            "volume": {"id": self.volume.id, "name": self.volume.name},
            **self.export.policy.to_json(),
            "consumer": self.export.consumer,
            "created_at": self.export.created_at,
            "mountpoint": self.mountpoint,
            "server": self.server.status() if self.server else None,
        }
        target = self.export.virtiofs
        if target is not None:
            body["consumer"] = target.consumer_json()
            body.update(via=target.via, tag=target.tag, socket=self.socket)
            body["virtiofsd"] = self.supervisor.status() if self.supervisor else None
        return body


class ExportManager:
    """Every live export of one boxvold."""

    def __init__(
        self,
        store: VolumeStore,
        runtime_dir: str,
        writer: trio.CapacityLimiter,
        *,
        vhost_gid: int | None = None,
        virtiofsd: Callable[[], Virtiofsd] = find_virtiofsd,
    ) -> None:
        self.store = store
        self.mount_root = os.path.join(runtime_dir, "fs")
        #: The export servers' logs and pidfiles (not under the mount root: it lists exports).
        self.servers_dir = os.path.join(runtime_dir, "servers")
        self.vhost_dir = os.path.join(runtime_dir, "vhost")
        self.vhost_gid = vhost_gid
        self._find_virtiofsd = virtiofsd
        self._virtiofsd: Virtiofsd | None = None
        self._writer = writer
        self._live: dict[str, LiveExport] = {}
        #: Recorded exports restore refused to serve (a foreign mount), by id: neither a FUSE
        #: view nor a virtiofsd. ``remove`` still drops their rows.
        self._unserved: dict[str, LiveExport] = {}
        self._nursery: trio.Nursery | None = None
        #: Cache mode of a new export whose request names none (config ``export_cache``;
        #: a SIGHUP may change it).
        self.default_cache = DEFAULT_CACHE
        #: virtiofsd's ``--cache`` for the virtiofsd of a new export (``virtiofsd_cache``).
        self.virtiofsd_cache = "auto"
        #: Restarts of the servers of exports removed since boxvold started, so that the
        #: totals ``restarts`` reports never go down.
        self._removed_restarts = {"fuse_server": 0, "virtiofsd": 0}
        #: Export creation and removal (and forced volume removal) happen one at a time.
        self.lock = trio.Lock()
        #: Which exports keep serving when boxvold stops: those in use.
        self.stop_policy = StopPolicy(self._uses)

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Host the export servers and virtiofsd supervisors until cancelled; clears the
        mounts a crashed boxvold left and restores the recorded exports first."""
        await trio.to_thread.run_sync(self._prepare_mount_root)
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            await self.restore()
            await trio.to_thread.run_sync(self._clear_leftovers)
            task_status.started()
            await trio.sleep_forever()

    async def _thread(self, fn: Callable[..., T], *args: Any) -> T:
        return await trio.to_thread.run_sync(functools.partial(fn, *args), limiter=self._writer)

    # -- establishing ----------------------------------------------------------------

    async def _establish(self, export: Export, volume: Volume) -> LiveExport:
        """Give a recorded export its FUSE view and/or its virtiofsd."""
        live = LiveExport(export, volume, mountpoint=None)
        if export.served_by_fuse_view:
            mountpoint = os.path.join(self.mount_root, export.id)

            async def rearm_virtiofsd() -> None:
                if live.supervisor is not None:
                    await live.supervisor.restart()

            live.server = FuseServerSupervisor(
                export,
                mountpoint=mountpoint,
                open_root=functools.partial(
                    open_volume_directory,
                    self.store.layout,
                    volume,
                    own_mounts=self.store.own_mounts,
                ),
                state_dir=self.servers_dir,
                on_restart=rearm_virtiofsd,
                keep_at_stop=functools.partial(self.stop_policy.keeps, export.id),
            )
            assert self._nursery is not None
            await self._nursery.start(live.server.serve)
            live.mountpoint = mountpoint
        if export.virtiofs is not None:
            try:
                live.supervisor = await self._start_virtiofsd(
                    export,
                    volume,
                    live.mountpoint,
                    source_survived=live.server is not None and live.server.adopted,
                )
            except BaseException:
                if live.server is not None:
                    await live.server.stop()
                raise
            live.socket = live.supervisor.socket_path
        self._live[export.id] = live
        return live

    async def _start_virtiofsd(
        self, export: Export, volume: Volume, fuse_view: str | None, *, source_survived: bool
    ) -> VhostSupervisor:
        assert export.virtiofs is not None and self._nursery is not None
        if self._virtiofsd is None:
            self._virtiofsd = await trio.to_thread.run_sync(self._find_virtiofsd)
        source: str = (
            fuse_view
            if fuse_view is not None
            else await self._thread(
                functools.partial(
                    volume_directory, self.store.layout, volume, own_mounts=self.store.own_mounts
                )
            )
        )
        await trio.to_thread.run_sync(self._prepare_vhost_dir)
        supervisor = VhostSupervisor(
            export.id,
            socket_path=os.path.join(self.vhost_dir, f"{export.id}.sock"),
            source=source,
            virtiofsd=dataclasses.replace(self._virtiofsd, cache=self.virtiofsd_cache),
            gid=self.vhost_gid,
            keep_on_shutdown=fuse_view is None,
            source_survived=source_survived,
            keep_at_stop=functools.partial(self.stop_policy.keeps, export.id),
        )
        await self._nursery.start(supervisor.serve)
        return supervisor

    def _uses(self) -> builtins.list[ExportUse]:
        """What the stop policy needs of every live export."""
        return [
            ExportUse(
                export_id=export_id,
                mountpoint=live.mountpoint,
                socket=live.supervisor.socket_path if live.supervisor else None,
                own_pids=frozenset(
                    pid
                    for pid in (
                        live.server.pid if live.server else None,
                        live.supervisor.pid if live.supervisor else None,
                    )
                    if pid
                ),
            )
            for export_id, live in self._live.items()
        ]

    def _prepare_mount_root(self) -> None:
        os.makedirs(self.servers_dir, mode=0o700, exist_ok=True)
        os.makedirs(self.mount_root, mode=MOUNT_ROOT_MODE, exist_ok=True)
        os.chmod(self.mount_root, MOUNT_ROOT_MODE)

    def _clear_leftovers(self) -> None:
        """After restore: stop the servers and detach the mounts a previous boxvold left
        that no live export owns (its export was removed, or could not be restored)."""
        owned = {live.export.id for live in self._live.values() if live.server is not None}
        for pid in stop_orphans(self.servers_dir, keep=owned):
            log.warning("stopped an export server a previous boxvold left pid=%d", pid)
        for point in mounts_under(self.mount_root):
            if os.path.basename(point) not in owned or os.path.dirname(point) != os.path.realpath(
                self.mount_root
            ):
                detach(point)
                log.warning("detached a stale mount mountpoint=%s", point)
        for name in os.listdir(self.mount_root):
            path = os.path.join(self.mount_root, name)
            if name not in owned and os.path.isdir(path) and not os.path.islink(path):
                with contextlib.suppress(OSError):
                    os.rmdir(path)  # an empty mountpoint of an export that is gone

    def _prepare_vhost_dir(self) -> None:
        os.makedirs(self.vhost_dir, mode=VHOST_DIR_MODE, exist_ok=True)
        if self.vhost_gid is not None:
            os.chown(self.vhost_dir, -1, self.vhost_gid)
        os.chmod(self.vhost_dir, VHOST_DIR_MODE if self.vhost_gid is not None else 0o700)

    async def restore(self) -> None:
        """Re-establish the exports the registry records (after a restart or a crash)."""
        for row in await self._thread(self.store.registry.exports):
            export = Export.from_row(*row)
            volume = await self._thread(self.store.registry.by_id, export.volume_id)
            reason = f"volume {export.volume_id} is gone"
            if volume is not None:
                try:
                    await self._establish(export, volume)
                except ForeignMount as exc:
                    log.error(
                        "export not served id=%s kind=%s volume=%s reason=%s; it stays "
                        "recorded (the volume in use) and is served at the first start after "
                        "the mount is gone, or dropped with 'boxvol export rm %s'",
                        export.id,
                        export.kind,
                        volume.key,
                        exc.message,
                        export.id,
                    )
                    self._unserved[export.id] = LiveExport(export, volume, mountpoint=None)
                    continue
                except (OSError, BoxvolError) as exc:
                    reason = str(exc)
                else:
                    log.info(
                        "export restored id=%s kind=%s volume=%s",
                        export.id,
                        export.kind,
                        volume.key,
                    )
                    continue
            log.warning("export dropped id=%s reason=%s", export.id, reason)
            await self._thread(self.store.registry.remove_export, export.id)

    # -- the API's operations --------------------------------------------------------

    async def create(
        self,
        ref: str,
        policy: ExportPolicy,
        consumer: str | None = None,
        virtiofs: VirtiofsTarget | None = None,
    ) -> LiveExport:
        """Export the volume ``ref`` names: a FUSE view, or (``virtiofs`` given) a
        vhost-user socket for one guest."""
        check_policy(policy)
        check_consumer(consumer)
        if virtiofs is not None:
            check_target(virtiofs)
        async with self.lock:
            if virtiofs is not None:
                self._check_tag_free(virtiofs)
            volume = await self._thread(self.store.resolve, ref)
            self.store.check_not_busy(volume)
            export = Export(
                id=str(ULID()),
                volume_id=volume.id,
                kind="fuse" if virtiofs is None else "virtiofs",
                policy=policy,
                created_at=utc_now(),
                consumer=consumer,
                virtiofs=virtiofs,
            )
            await self._thread(
                self.store.registry.add_export,
                export.id,
                volume.id,
                export.kind,
                export.created_at,
                export.spec(),
            )
            try:
                live = await self._establish(export, volume)
            except BaseException:
                await self._thread(self.store.registry.remove_export, export.id)
                raise
        log.info(
            "export created id=%s kind=%s volume=%s read_only=%s owner=%s cache=%s virtiofs=%s",
            export.id,
            export.kind,
            volume.key,
            policy.read_only,
            policy.owner,
            policy.cache,
            virtiofs,
        )
        return live

    def _check_tag_free(self, target: VirtiofsTarget) -> None:
        for live in self._live.values():
            other = live.export.virtiofs
            if other is not None and (other.guest, other.tag) == (target.guest, target.tag):
                raise Conflict(
                    f"VM {target.vm!r} already has an export tagged {target.tag!r} "
                    f"({live.export.id}); pick another tag or remove that export first"
                )

    def get(self, export_id: str) -> LiveExport:
        """A live export by id (any case)."""
        live = self._live.get(export_id.upper())
        if live is None:
            raise NotFound(f"no export with id {export_id!r}; list exports with 'boxvol export ls'")
        return live

    def list(self, volume_id: str | None = None, vm: str | None = None) -> list[LiveExport]:
        """Live exports (of one volume, for one VM, if given), oldest first."""
        return [
            live
            for _, live in sorted(self._live.items())
            if (volume_id is None or live.volume.id == volume_id)
            and (vm is None or (live.export.virtiofs is not None and live.export.virtiofs.vm == vm))
        ]

    def counts(self) -> dict[tuple[str, str], int]:
        """Exports by (kind, state): ``serving``, or ``unserved`` (kept but not served: a
        foreign mount on its volume at start). Every kind and state is present."""
        found = {(kind, state): 0 for kind in ("fuse", "virtiofs") for state in EXPORT_STATES}
        for state, exports in (("serving", self._live), ("unserved", self._unserved)):
            for live in exports.values():
                found[live.export.kind, state] += 1
        return found

    def restarts(self) -> dict[str, int]:
        """Restarts since boxvold started of the export servers (``fuse_server``) and of
        virtiofsd (``virtiofsd``) boxvold supervises; they only grow."""
        total = dict(self._removed_restarts)
        for live in self._live.values():
            if live.server is not None:
                total["fuse_server"] += live.server.restarts
            if live.supervisor is not None:
                total["virtiofsd"] += live.supervisor.restarts
        return total

    async def collect_garbage(self, *, dry_run: bool) -> builtins.list[Finding]:
        """Find (and unless ``dry_run`` reclaim) what boxvol created and lost track of: the
        home's leftovers (``VolumeStore.collect_garbage``) and the runtime's (sockets,
        pidfiles and logs of exports that are gone, export servers and virtiofsd processes
        nobody supervises, mounts no export owns). Live exports are never touched."""
        async with self.lock:
            findings = await self._thread(
                functools.partial(self.store.collect_garbage, dry_run=dry_run)
            )
            return findings + await self._thread(self._runtime_garbage, dry_run)

    def _runtime_garbage(self, dry_run: bool) -> builtins.list[Finding]:
        """Blocking: the runtime side of ``collect_garbage``."""
        known = {*self._live, *self._unserved}
        live_pids = {
            pid
            for live in self._live.values()
            for pid in (
                live.supervisor.pid if live.supervisor else None,
                live.server.pid if live.server else None,
            )
            if pid
        }
        findings: builtins.list[Finding] = []
        for pid, source in _boxvol_virtiofsd(self._virtiofsd_roots()):
            if pid in live_pids:
                continue
            findings.append(Finding("stray-virtiofsd", str(pid), 0, "stop", f"serving {source}"))
            if not dry_run:
                kill_and_wait(pid)
        stray_servers = [
            name[: -len(".pid")]
            for name in _listdir(self.servers_dir)
            if name.endswith(".pid") and name[: -len(".pid")] not in known
        ]
        if stray_servers:
            for export_id in stray_servers:
                findings.append(Finding("stray-server", export_id, 0, "stop"))
            if not dry_run:
                stop_orphans(self.servers_dir, keep=known)
        for directory in (self.vhost_dir, self.servers_dir):
            for name in _listdir(directory):
                if name.split(".", 1)[0] in known or (
                    directory == self.servers_dir and name.endswith(".pid")  # stray-server
                ):
                    continue
                path = os.path.join(directory, name)
                kind: FindingKind = "stale-socket" if name.endswith(".sock") else "stale-file"
                findings.append(Finding(kind, path, allocated_bytes(path), "unlink"))
                if not dry_run:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(path)
        root = os.path.realpath(self.mount_root)
        for point in mounts_under(self.mount_root):
            if os.path.dirname(point) == root and os.path.basename(point) in known:
                continue
            findings.append(Finding("stale-mount", point, 0, "detach"))
            if not dry_run:
                detach(point)
        for name in _listdir(self.mount_root):
            path = os.path.join(self.mount_root, name)
            if name in known or not os.path.isdir(path) or os.path.islink(path):
                continue
            findings.append(Finding("stale-mountpoint", path, 0, "rmdir"))
            if not dry_run:
                with contextlib.suppress(OSError):
                    os.rmdir(path)
        log_findings(findings, dry_run=dry_run)
        return findings

    def _virtiofsd_roots(self) -> tuple[str, ...]:
        layout = self.store.layout
        return (layout.named, layout.anonymous, os.path.realpath(self.mount_root))

    async def remove(self, export_id: str) -> LiveExport:
        """Tear an export down: virtiofsd stops, its directory vanishes, open files go stale."""
        async with self.lock:
            return await self._remove_locked(export_id)

    async def _remove_locked(self, export_id: str) -> LiveExport:
        unserved = self._unserved.pop(export_id.upper(), None)
        live = unserved if unserved is not None else self.get(export_id)
        self._live.pop(live.export.id, None)
        if live.supervisor is not None:
            await live.supervisor.stop()
            self._removed_restarts["virtiofsd"] += live.supervisor.restarts
        if live.server is not None:
            await live.server.stop()
            self._removed_restarts["fuse_server"] += live.server.restarts
        await self._thread(self.store.registry.remove_export, live.export.id)
        log.info("export removed id=%s volume=%s", live.export.id, live.volume.key)
        return live

    async def remove_volume(self, ref: str, *, force: bool) -> Volume:
        """Remove a volume; with ``force`` its exports are torn down first.

        All or nothing: everything that can refuse the removal (in use without ``force``, a
        foreign mount, a tampered directory) is checked before the first export goes.
        """
        async with self.lock:
            volume = await self._thread(self.store.resolve, ref)
            await self._thread(
                functools.partial(self.store.check_removable, volume.id, force=force)
            )
            if force:
                for live in self.list(volume.id):
                    await self._remove_locked(live.export.id)
            removed = await self._thread(
                functools.partial(self.store.remove, volume.id, force=force)
            )
            # Their rows went with the volume's.
            for export_id in [i for i, u in self._unserved.items() if u.volume.id == volume.id]:
                del self._unserved[export_id]
            return removed


def _listdir(path: str) -> list[str]:
    try:
        return sorted(os.listdir(path))
    except FileNotFoundError:
        return []


def _boxvol_virtiofsd(roots: tuple[str, ...]) -> list[tuple[int, str]]:
    """Every virtiofsd process sharing a directory directly under one of ``roots`` (only
    boxvold starts those), with what it shares. Blocking: reads /proc."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as cmdline:
                args = cmdline.read().split(b"\0")
        except OSError:
            continue
        source = virtiofsd_source(args)
        if source is not None and is_ours(source, roots):
            found.append((int(entry), source))
    return found
