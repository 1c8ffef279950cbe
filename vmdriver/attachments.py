"""The attach workflow, written once for every VMM backend (``vmdriver.backends.base``).

It owns what does not depend on the VMM:

- specs parsed and checked before anything changes (a host path never gets near a VMM);
- volumes and virtio-fs exports from boxvold, and the attachment **record** kept with each
  export's consumer in boxvold: the backend URI, the VM instance, the tag and the guest path.
  ``boxvol vm ls`` reads those records for any backend; nothing depends on a VMM keeping them;
- rollback of a half-done attach, in reverse order and with detach's rule;
- the order of a detach: the device gone from the guest (confirmed by the VMM), then the
  export (which stops virtiofsd), then the anonymous volume made for the attachment;
- release of a VM instance that ended, and reconcile: the records of this backend whose VM
  instance no longer exists are released. Records are matched by backend URI *and* instance,
  never by a VM's name, so a watcher on one connection cannot release another connection's or
  another VM's volumes;
- one change at a time per VM instance (``vmdriver.locks``).

Talks to boxvold through ``volumed.client`` and to the VMM through the backend; every method
except ``watch`` blocks.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import logging
import re
from collections.abc import Iterator, Sequence
from typing import Any

import trio

from vmdriver.backends.base import Backend, Device, NewDevice, VmRef
from vmdriver.domain_xml import alias_for_tag, derive_tag
from vmdriver.driver import (
    VIAS,
    Attachment,
    AttachmentNotFound,
    DomainStateConflict,
    LifecycleEvent,
    Released,
    Scope,
    Via,
    VolumeRef,
    check_specs_against,
)
from vmdriver.locks import DEFAULT_WAIT as DEFAULT_LOCK_WAIT
from vmdriver.locks import default_lock_dir, domain_lock
from volumed.client import Client, ensure_spec_volumes
from volumed.errors import BoxvolError, InUse, InvalidArgument, NotFound
from volumed.specs import VolumeSpec, parse_specs

log = logging.getLogger(__name__)

#: How long a detach waits for the guest to release a device by default.
DEFAULT_REMOVAL_TIMEOUT = 60.0
#: How long a rollback waits for a device it added to go again.
ROLLBACK_REMOVAL_TIMEOUT = 30.0
#: A VM instance that can name its lock file as it is.
_LOCK_KEY = re.compile(r"[0-9a-fA-F-]{36}")
#: How often the watcher reconciles besides its start (events can be missed).
RECONCILE_EVERY = 60.0


def anonymous_consumer(backend_uri: str, instance: str) -> str:
    """The consumer of an anonymous volume made for a VM instance: ``vm:URI#INSTANCE``."""
    return f"vm:{backend_uri}#{instance}"


@dataclasses.dataclass(frozen=True, slots=True)
class Record:
    """One attachment as boxvold keeps it: a virtio-fs export and its consumer."""

    export_id: str
    vm: str
    tag: str
    instance: str
    guest_path: str
    read_only: bool
    via: str
    socket: str | None
    volume: VolumeRef

    @classmethod
    def of(cls, export: dict[str, Any], backend_uri: str) -> Record | None:
        """The record an export holds for ``backend_uri``, None if it holds none for it."""
        consumer = export.get("consumer")
        if export.get("kind") != "virtiofs" or not isinstance(consumer, dict):
            return None
        if consumer.get("backend") != backend_uri or not consumer.get("instance"):
            return None
        volume = export.get("volume") or {}
        return cls(
            export_id=str(export["id"]),
            vm=str(consumer.get("vm")),
            tag=str(consumer.get("tag")),
            instance=str(consumer["instance"]),
            guest_path=str(consumer.get("guest_path") or ""),
            read_only=bool(export.get("read_only")),
            via=str(export.get("via") or "direct"),
            socket=export.get("socket"),
            volume=VolumeRef(str(volume.get("id")), volume.get("name")),
        )


class _Step:
    """One spec's progress through ``attach`` (what a rollback has to undo)."""

    def __init__(self, spec: VolumeSpec, volume: dict[str, Any]) -> None:
        self.spec = spec
        self.volume = volume
        self.export: dict[str, Any] | None = None
        self.device: Device | None = None


class Attachments:
    """The attach workflow over one boxvold client and one backend.

    Attributes:
        client: boxvold's API client.
        backend: the VMM connection (``vmdriver.backends``).
    """

    def __init__(
        self,
        client: Client,
        backend: Backend,
        *,
        lock_dir: str | None = None,
        lock_wait: float = DEFAULT_LOCK_WAIT,
    ) -> None:
        self.client = client
        self.backend = backend
        self.lock_dir = lock_dir if lock_dir is not None else default_lock_dir()
        self.lock_wait = lock_wait

    def close(self) -> None:
        """Close the backend."""
        self.backend.close()

    def __enter__(self) -> Attachments:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- records ----------------------------------------------------------------------

    def records(self, instance: str | None = None) -> list[Record]:
        """This backend's attachment records in boxvold (of one VM instance, if given)."""
        found = []
        for export in self.client.list_exports():
            record = Record.of(export, self.backend.uri)
            if record is not None and (instance is None or record.instance == instance):
                found.append(record)
        return found

    def _vm(self, name: str) -> VmRef:
        """The VM called ``name``, checked against the name boxvol recorded for it."""
        vm = self.backend.lookup(name)
        if self.backend.names_vms:
            return vm  # libvirt names its domains (and renames them): its name is the truth
        for record in self.records(vm.instance):
            if record.vm != name:
                raise InvalidArgument(
                    f"{self.backend.label} VM at {self.backend.uri} is recorded as "
                    f"{record.vm!r}, not {name!r}: call it by that name"
                )
        return vm

    @contextlib.contextmanager
    def _changing(self, name: str) -> Iterator[VmRef]:
        """The VM, looked up again while this process holds its change lock."""
        vm = self.backend.lookup(name)
        key = vm.instance  # libvirt's UUID names its lock file, as operators expect
        if not _LOCK_KEY.fullmatch(key):
            key = hashlib.sha256(f"{self.backend.uri}#{vm.instance}".encode()).hexdigest()[:32]
        with domain_lock(self.lock_dir, key, name, wait=self.lock_wait):
            yield self._vm(name)

    def _scope(self, vm: VmRef, wanted: Scope | None) -> Scope:
        if wanted is None:
            return Scope(live=vm.running, config=vm.persistent)
        if wanted.live and not vm.running:
            raise DomainStateConflict(
                f"{self.backend.label} VM {vm.name} is not running: --live needs a running guest"
            )
        if wanted.config and not vm.persistent:
            raise DomainStateConflict(
                f"{self.backend.label} VM {vm.name} has no persistent definition: drop --config"
            )
        return wanted

    def _attachments(self, vm: VmRef) -> list[Attachment]:
        devices = {d.tag: d for d in self.backend.devices(vm)}
        out = []
        for record in self.records(vm.instance):
            device = devices.pop(record.tag, None)
            out.append(
                Attachment(
                    domain=vm.name,
                    tag=record.tag,
                    guest_path=record.guest_path,
                    read_only=record.read_only,
                    export_id=record.export_id,
                    volume=record.volume,
                    via=record.via,
                    alias=device.device_id if device else alias_for_tag(record.tag),
                    socket=record.socket,
                    live=device is not None and device.live,
                    config=device is not None and device.config,
                )
            )
        for device in devices.values():  # a device whose record is gone
            out.append(
                Attachment(
                    domain=vm.name,
                    tag=device.tag,
                    guest_path="",
                    read_only=False,
                    export_id=None,
                    volume=None,
                    alias=device.device_id,
                    live=device.live,
                    config=device.config,
                )
            )
        return out

    def list_attachments(self, name: str) -> list[Attachment]:
        """The VM's boxvol attachments: its records in boxvold and boxvol's devices."""
        return self._attachments(self._vm(name))

    # -- attach -----------------------------------------------------------------------

    def attach(
        self,
        name: str,
        specs: Sequence[VolumeSpec | str],
        *,
        scope: Scope | None = None,
        via: Via = "direct",
    ) -> list[Attachment]:
        """Attach one volume per spec to the VM ``name``, all or nothing: everything is
        checked before anything is created; on a failure, what this call did is undone in
        reverse order."""
        if via not in VIAS:
            raise InvalidArgument(f"invalid via {via!r}: give one of {', '.join(VIAS)}")
        if not specs:
            raise InvalidArgument("nothing to attach: give at least one -v SPEC")
        parsed = parse_specs([s if isinstance(s, str) else str(s) for s in specs])
        with self._changing(name) as vm:
            chosen = self._scope(vm, scope)
            existing = self._attachments(vm)
            check_specs_against(parsed, existing)
            self.backend.check_ready(vm, chosen, [spec.guest_path for spec in parsed])
            taken = {a.tag for a in existing} | vm.tags_in_use
            volumes = ensure_spec_volumes(
                self.client,
                list(parsed),
                consumer=anonymous_consumer(self.backend.uri, vm.instance),
            )
            steps = [_Step(spec, volume) for spec, volume in zip(parsed, volumes, strict=True)]
            try:
                for step in steps:
                    tag = derive_tag(step.volume.get("name"), step.volume["id"], taken)
                    taken.add(tag)
                    self._attach_one(vm, step, tag, chosen, via)
            except BaseException:
                self._roll_back(vm, chosen, steps)
                raise
        return [
            Attachment(
                domain=vm.name,
                tag=s.device.tag,
                guest_path=s.spec.guest_path,
                read_only=s.spec.read_only,
                export_id=str(s.export["id"]),
                volume=VolumeRef(s.volume["id"], s.volume.get("name")),
                via=via,
                alias=s.device.device_id,
                socket=s.export.get("socket"),
                live=chosen.live,
                config=chosen.config,
            )
            for s in steps
            if s.export is not None and s.device is not None
        ]

    def _attach_one(self, vm: VmRef, step: _Step, tag: str, scope: Scope, via: Via) -> None:
        export = self.client.create_export(
            step.volume["id"],
            kind="virtiofs",
            read_only=step.spec.read_only,
            via=via,
            consumer={
                "vm": vm.name,
                "tag": tag,
                "backend": self.backend.uri,
                "instance": vm.instance,
                "guest_path": step.spec.guest_path,
            },
        )
        step.export = export
        new = NewDevice(
            tag=tag,
            device_id=alias_for_tag(tag),
            socket=str(export["socket"]),
            guest_path=step.spec.guest_path,
            read_only=step.spec.read_only,
            export_id=str(export["id"]),
            volume_id=str(step.volume["id"]),
            volume_name=step.volume.get("name"),
            via=via,
        )
        log.info(
            "attaching %s to %s on %s as %s (%s)",
            step.volume["id"],
            vm.name,
            self.backend.uri,
            tag,
            scope,
        )
        self.backend.add_device(vm, new, scope)
        step.device = Device(tag, new.device_id, live=scope.live, config=scope.config)

    def _roll_back(self, vm: VmRef, scope: Scope, steps: Sequence[_Step]) -> None:
        """Undo a failed attach in reverse order, with detach's rule: an export and an
        anonymous volume only go once their device is confirmed gone. What cannot be undone
        is logged and left for ``detach`` (or the VM's end) to finish."""
        for step in reversed(steps):
            try:
                if step.device is not None:
                    self.backend.remove_device(vm, step.device, scope, ROLLBACK_REMOVAL_TIMEOUT)
                if step.export is not None:
                    self.client.remove_export(str(step.export["id"]))
                if step.spec.anonymous:
                    self.client.remove_volume(step.volume["id"], force=True)
            except BoxvolError as exc:
                log.error("could not undo the attachment of %s to %s: %s", step.spec, vm.name, exc)

    # -- detach -----------------------------------------------------------------------

    def detach(
        self,
        name: str,
        targets: Sequence[str] = (),
        *,
        scope: Scope | None = None,
        timeout: float = DEFAULT_REMOVAL_TIMEOUT,
    ) -> list[Attachment]:
        """Detach attachments by tag or guest path (every one if ``targets`` is empty). Per
        attachment: the device leaves the guest and the VMM confirms it, then the export is
        deleted, then an anonymous volume made for it is removed. A guest that does not let
        go in ``timeout`` stops the detach with an error, and its export keeps running."""
        with self._changing(name) as vm:
            chosen_scope = self._scope(vm, scope)
            attachments = self._attachments(vm)
            done = []
            for attachment in select(vm.name, attachments, targets):
                self._detach_one(vm, attachment, chosen_scope, timeout)
                done.append(attachment)
            return done

    def _detach_one(self, vm: VmRef, attachment: Attachment, scope: Scope, timeout: float) -> None:
        # Always asked, present or not: a backend also drops what it keeps beside a device
        # (libvirt's metadata copy), and finds nothing to do for a device already gone.
        device = Device(
            attachment.tag,
            attachment.alias or alias_for_tag(attachment.tag),
            live=attachment.live,
            config=attachment.config,
        )
        self.backend.remove_device(vm, device, scope, timeout)
        if (attachment.live and not scope.live) or (attachment.config and not scope.config):
            return  # still in a definition this detach was told to leave alone
        if attachment.export_id is not None:
            self._remove_export(attachment.export_id)
        if attachment.volume is not None:
            self._remove_anonymous(attachment.volume.id, vm.instance)

    def _remove_export(self, export_id: str) -> bool:
        try:
            self.client.remove_export(export_id)
        except NotFound:
            log.info("export %s was already gone", export_id)
            return False
        return True

    def _remove_anonymous(self, volume_id: str, instance: str) -> tuple[str, str] | None:
        """Remove the volume if it is the anonymous volume made for ``instance``; the
        reason it was kept, if it could not be removed."""
        try:
            volume = self.client.get_volume(volume_id)
        except NotFound:
            return None
        if volume.get("kind") != "anonymous" or volume.get("consumer") != anonymous_consumer(
            self.backend.uri, instance
        ):
            return None
        try:
            self.client.remove_volume(volume_id)
        except NotFound:
            pass
        except InUse as exc:
            return (volume_id, exc.message)
        return None

    # -- lifecycle --------------------------------------------------------------------

    def release(self, instance: str) -> Released:
        """Delete the exports and remove the anonymous volumes recorded for a VM instance
        of this backend that no longer exists. Refused while it exists."""
        if self.backend.instance_exists(instance):
            raise DomainStateConflict(
                f"the {self.backend.label} VM {instance} on {self.backend.uri} still exists; "
                "its volumes are released when it ends"
            )
        return self._release(instance)

    def _release(self, instance: str) -> Released:
        records = self.records(instance)
        name = records[0].vm if records else instance
        exports = [r.export_id for r in records if self._remove_export(r.export_id)]
        volumes, kept = [], []
        mine = anonymous_consumer(self.backend.uri, instance)
        for volume in self.client.list_volumes([("kind", "anonymous")]):
            if volume.get("consumer") != mine:
                continue
            try:
                self.client.remove_volume(volume["id"])
                volumes.append(volume["id"])
            except NotFound:
                pass
            except InUse as exc:
                kept.append((volume["id"], exc.message))
        released = Released(name, tuple(exports), tuple(volumes), tuple(kept))
        log.info(
            "released %s (%s on %s): exports %s, volumes %s, kept %s",
            name,
            instance,
            self.backend.uri,
            exports,
            volumes,
            kept,
        )
        return released

    def recorded_instances(self) -> dict[str, str]:
        """instance -> VM name of every VM instance this backend has records or anonymous
        volumes for in boxvold."""
        found = {r.instance: r.vm for r in self.records()}
        prefix = anonymous_consumer(self.backend.uri, "")
        for volume in self.client.list_volumes([("kind", "anonymous")]):
            consumer = volume.get("consumer")
            if isinstance(consumer, str) and consumer.startswith(prefix):
                found.setdefault(consumer[len(prefix) :], consumer[len(prefix) :])
        return found

    def reconcile(self) -> list[LifecycleEvent]:
        """Release every VM instance of this backend that boxvold still has records for but
        that no longer exists (ended while nothing watched); one ``gone`` event each. An
        instance whose existence cannot be told is kept for the next reconcile."""
        events = []
        for instance, name in self.recorded_instances().items():
            try:
                if self.backend.instance_exists(instance):
                    continue
                log.info("%s (%s) no longer exists on %s", name, instance, self.backend.uri)
                released = self._release(instance)
            except BoxvolError as exc:
                log.error("reconcile: kept the exports of %s: %s", name, exc.message)
                continue
            events.append(LifecycleEvent(released.domain, instance, "gone", released))
        return events

    async def watch(
        self,
        on_event: Any = None,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Release each VM instance of this backend when it ends, until cancelled;
        reconcile at start and every ``RECONCILE_EVERY`` seconds."""

        def report(events: Sequence[LifecycleEvent]) -> None:
            for event in events:
                if on_event is not None:
                    on_event(event)

        async def ended(instance: str) -> None:
            released = await trio.to_thread.run_sync(self._release, instance)
            report([LifecycleEvent(released.domain, instance, "stopped", released)])

        report(await trio.to_thread.run_sync(self.reconcile))
        async with trio.open_nursery() as nursery:
            await nursery.start(functools.partial(self.backend.watch, ended))
            task_status.started()
            while True:
                await trio.sleep(RECONCILE_EVERY)
                report(await trio.to_thread.run_sync(self.reconcile))


def select(domain: str, attachments: list[Attachment], targets: Sequence[str]) -> list[Attachment]:
    """The attachments named by tag or guest path; all of them if no target is given.
    Every target is resolved before anything is detached."""
    if not targets:
        return attachments
    chosen: list[Attachment] = []
    for target in targets:
        match = [a for a in attachments if target in (a.tag, a.guest_path)]
        if not match:
            known = ", ".join(f"{a.tag} ({a.guest_path or '?'})" for a in attachments) or "none"
            raise AttachmentNotFound(
                f"{domain} has no boxvol attachment with tag or guest path {target!r}; "
                f"attached: {known}"
            )
        chosen += [a for a in match if a not in chosen]
    return chosen
