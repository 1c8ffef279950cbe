"""The libvirt VM driver: virtio-fs shares served by boxvold, attached through libvirt.

Owns the libvirt edge: one connection per driver (any libvirt URI; ``qemu:///system`` by
default), libvirt's default event loop running in one daemon thread, the translation of libvirt
errors into boxvol's by error code (never by message text), and the order of operations that
keeps a guest from ever talking to a stopped virtiofsd:

- attach: volumes resolved (``ensure_spec_volumes``), a virtio-fs export per volume from
  boxvold (it owns the vhost-user socket and the virtiofsd behind it), then the device, then
  the record of the guest path (domain metadata, and ``boxvol.mount=`` on the kernel command
  line for guests booted from a kernel, like boxvol's test guest);
- detach: the device removed from the running guest and the removal *confirmed* by libvirt's
  DEVICE_REMOVED event, then from the persistent definition, then the export deleted (which
  stops virtiofsd). If the guest does not let go in time, the export stays;
- lifecycle: a stopped domain keeps its exports (boxvold re-arms virtiofsd for the next boot);
  an undefined one has its exports deleted and its anonymous volumes removed, when its event
  arrives or, if nothing was watching then, at the next ``reconcile`` (``vmdriver.libvirt_watch``
  runs one at start and after every reconnection).

Event callbacks run on libvirt's event thread and only hand what they saw to the side waiting
for it (a condition variable for device removals, a trio memory channel for lifecycle events);
they never change state themselves. Every method except ``watch_lifecycle`` blocks.

Talks to boxvold only through ``volumed.client``; boxvold never imports this module.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import libvirt
import trio

from vmdriver import domain_xml as dx
from vmdriver.attachments import select
from vmdriver.driver import (
    VIAS,
    Attachment,
    AttachmentNotFound,
    DeviceRemovalFailed,
    DeviceRemovalTimeout,
    DomainNotFound,
    DomainNotPrepared,
    DomainStateConflict,
    HypervisorError,
    HypervisorUnavailable,
    LifecycleEvent,
    LifecycleKind,
    PrepareResult,
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

DEFAULT_URI = "qemu:///system"
#: An anonymous volume made for a domain's attachment belongs to ``vm:<domain name>``.
VM_CONSUMER_PREFIX = "vm:"
#: How long a detach waits for the guest to release a device. Guests answer a PCIe unplug
#: request after the hot-plug controller's 5 s "attention" delay; TCG guests are slower still.
DEFAULT_REMOVAL_TIMEOUT = 60.0
#: After a failed unplug call, how long to watch whether the device leaves all the same.
ERROR_GRACE = 10.0
#: libvirt releases that attach virtio-fs to an externally started virtiofsd (<source socket>).
MIN_LIBVIRT_VERSION = 8_000_000  # 8.0.0

_AFFECT_LIVE = libvirt.VIR_DOMAIN_AFFECT_LIVE
_AFFECT_CONFIG = libvirt.VIR_DOMAIN_AFFECT_CONFIG
#: The persistent definition, secrets included: what is redefined must lose nothing (without
#: VIR_DOMAIN_XML_SECURE, graphics passwords would be dropped from it).
_CONFIG_XML = libvirt.VIR_DOMAIN_XML_INACTIVE | libvirt.VIR_DOMAIN_XML_SECURE


# -- libvirt errors, classified by code ----------------------------------------------------


def _codes(*names: str) -> set[int]:
    """The values of the libvirt error codes this libvirt-python knows (older ones lack some)."""
    return {getattr(libvirt, n) for n in names if hasattr(libvirt, n)}


#: One table, checked in order: libvirt error code -> boxvol error class.
_ERROR_TABLE: tuple[tuple[set[int], type[BoxvolError]], ...] = (
    (_codes("VIR_ERR_NO_DOMAIN"), DomainNotFound),
    (_codes("VIR_ERR_OPERATION_INVALID"), DomainStateConflict),
    (
        _codes(
            "VIR_ERR_NO_CONNECT",
            "VIR_ERR_INVALID_CONN",
            "VIR_ERR_AUTH_FAILED",
            "VIR_ERR_AUTH_CANCELLED",
            "VIR_ERR_AUTH_UNAVAILABLE",
            "VIR_ERR_RPC",
        ),
        HypervisorUnavailable,
    ),
    (_codes("VIR_ERR_DEVICE_MISSING"), AttachmentNotFound),
)
_DEVICE_GONE = _codes("VIR_ERR_DEVICE_MISSING")
_NO_DOMAIN = _codes("VIR_ERR_NO_DOMAIN")


def translate(exc: libvirt.libvirtError, what: str) -> BoxvolError:
    """The boxvol error for a libvirt error: class by ``get_error_code()``; libvirt's own
    message only goes into the text a human reads."""
    code = exc.get_error_code()
    message = f"{what}: {exc.get_error_message() or exc}"
    for codes, cls in _ERROR_TABLE:
        if code in codes:
            return cls(message)
    return HypervisorError(message)


@contextlib.contextmanager
def _libvirt(what: str) -> Iterator[None]:
    """Run a libvirt call, raising its error as boxvol's (``what`` says what was tried)."""
    try:
        yield
    except libvirt.libvirtError as exc:
        raise translate(exc, what) from None


# -- libvirt's event loop ------------------------------------------------------------------

_loop_lock = threading.Lock()
_loop_thread: threading.Thread | None = None


def _run_event_loop() -> None:
    while True:
        try:
            libvirt.virEventRunDefaultImpl()
        except libvirt.libvirtError as exc:  # pragma: no cover - libvirt internal failure
            log.error("libvirt event loop: %s", exc)
            time.sleep(0.5)


def ensure_event_loop() -> None:
    """Register libvirt's default event implementation and run it in a daemon thread, once
    per process. Must happen before a connection that wants events is opened."""
    global _loop_thread
    with _loop_lock:
        if _loop_thread is not None:
            return
        libvirt.virEventRegisterDefaultImpl()
        # libvirt prints every error to stderr by default, even those handled here by code.
        libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
        _loop_thread = threading.Thread(target=_run_event_loop, name="libvirt-events", daemon=True)
        _loop_thread.start()


class _Removals:
    """DEVICE_REMOVED / DEVICE_REMOVAL_FAILED events, handed from the event thread to the
    thread waiting for them. Only expected (domain uuid, alias) pairs are kept."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._outcomes: dict[tuple[str, str], str | None] = {}

    def expect(self, uuid: str, alias: str) -> None:
        with self._cond:
            self._outcomes[(uuid, alias)] = None

    def post(self, uuid: str, alias: str, outcome: str) -> None:
        """Called on libvirt's event thread: record and wake the waiter, nothing more."""
        with self._cond:
            if (uuid, alias) in self._outcomes:
                self._outcomes[(uuid, alias)] = outcome
                self._cond.notify_all()

    def wait(self, uuid: str, alias: str, timeout: float) -> str | None:
        """``removed``, ``failed`` or None if nothing came within ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                outcome = self._outcomes.get((uuid, alias))
                left = deadline - time.monotonic()
                if outcome is not None or left <= 0:
                    return outcome
                self._cond.wait(left)

    def forget(self, uuid: str, alias: str) -> None:
        with self._cond:
            self._outcomes.pop((uuid, alias), None)


# -- the driver ----------------------------------------------------------------------------


class _State:
    """A domain as one operation sees it: its definitions read once, up front."""

    def __init__(self, dom: Any, name: str) -> None:
        self.dom = dom
        self.name = name
        with _libvirt(f"cannot read the state of domain {name}"):
            self.uuid: str = dom.UUIDString()
            self.running: bool = bool(dom.isActive())
            self.persistent: bool = bool(dom.isPersistent())
            self.live_xml: str | None = dom.XMLDesc(0) if self.running else None
            self.config_xml: str | None = dom.XMLDesc(_CONFIG_XML) if self.persistent else None

    def scope(self, wanted: Scope | None) -> Scope:
        """The scope an operation gets: ``wanted``, checked against the domain, or the
        default (everything that exists: the running guest, the persistent definition)."""
        if wanted is None:
            return Scope(live=self.running, config=self.persistent)
        if wanted.live and not self.running:
            raise DomainStateConflict(
                f"domain {self.name} is not running: --live needs a running guest (leave it "
                "out to change only the persistent definition)"
            )
        if wanted.config and not self.persistent:
            raise DomainStateConflict(
                f"domain {self.name} is transient: it has no persistent definition for "
                "--config (use --live)"
            )
        return wanted


class _Step:
    """One spec's progress through ``attach`` (what a roll-back has to undo)."""

    def __init__(self, spec: VolumeSpec, volume: dict[str, Any]) -> None:
        self.spec = spec
        self.volume = volume
        self.record: dx.AttachmentRecord | None = None
        self.socket: str | None = None
        self.attached = False


class LibvirtDriver:
    """boxvol's VM driver for libvirt (``vmdriver.driver.VMDriver``).

    Attributes:
        client: boxvold's API client (volumes and exports).
        uri: the libvirt connection URI.
    """

    client: Client
    uri: str
    _conn: Any
    _removals: _Removals
    _callbacks: list[int]

    def __init__(
        self,
        client: Client,
        uri: str = DEFAULT_URI,
        *,
        lock_dir: str | None = None,
        lock_wait: float = DEFAULT_LOCK_WAIT,
    ) -> None:
        self.client = client
        self.uri = uri
        #: Where the per-domain change locks live (``vmdriver.locks``), and how long a
        #: change waits for another one on the same domain.
        self.lock_dir = lock_dir if lock_dir is not None else default_lock_dir()
        self.lock_wait = lock_wait
        self._conn = None
        self._removals = _Removals()
        self._callbacks = []

    # -- connection ---------------------------------------------------------------------

    @property
    def conn(self) -> Any:
        """The libvirt connection, opened (with device-removal callbacks) on first use."""
        if self._conn is None:
            ensure_event_loop()
            try:
                conn = libvirt.open(self.uri)
            except libvirt.libvirtError as exc:
                raise HypervisorUnavailable(
                    f"cannot connect to libvirt at {self.uri}: {exc.get_error_message()}; is "
                    "libvirtd running (start it, or give another URI with --connect)?"
                ) from None
            with _libvirt("cannot subscribe to libvirt's device events"):
                self._callbacks = [
                    conn.domainEventRegisterAny(
                        None, libvirt.VIR_DOMAIN_EVENT_ID_DEVICE_REMOVED, self._on_removed, None
                    ),
                    conn.domainEventRegisterAny(
                        None,
                        libvirt.VIR_DOMAIN_EVENT_ID_DEVICE_REMOVAL_FAILED,
                        self._on_removal_failed,
                        None,
                    ),
                ]
            self._conn = conn
        return self._conn

    def close(self) -> None:
        """Deregister the callbacks and close the connection (if one was opened)."""
        conn, self._conn = self._conn, None
        if conn is None:
            return
        for callback_id in self._callbacks:
            with contextlib.suppress(libvirt.libvirtError):
                conn.domainEventDeregisterAny(callback_id)
        self._callbacks = []
        with contextlib.suppress(libvirt.libvirtError):
            conn.close()

    def __enter__(self) -> LibvirtDriver:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _on_removed(self, _conn: Any, dom: Any, alias: str, _opaque: Any) -> None:
        self._removals.post(dom.UUIDString(), alias, "removed")

    def _on_removal_failed(self, _conn: Any, dom: Any, alias: str, _opaque: Any) -> None:
        self._removals.post(dom.UUIDString(), alias, "failed")

    @contextlib.contextmanager
    def _changing(self, name: str) -> Iterator[_State]:
        """The domain, read while this process holds its change lock (``vmdriver.locks``):
        what another ``boxvol vm`` command wrote before is seen, and nothing it writes
        meanwhile is lost."""
        dom = self._lookup(name)
        with _libvirt(f"cannot read the UUID of domain {name}"):
            uuid = dom.UUIDString()
        with domain_lock(self.lock_dir, uuid, name, wait=self.lock_wait):
            yield _State(dom, name)

    def _lookup(self, name: str) -> Any:
        conn = self.conn
        with _libvirt(f"no domain {name!r} on {self.uri}"):
            return conn.lookupByName(name)

    def _domain(self, name: str) -> _State:
        return _State(self._lookup(name), name)

    def _check_version(self) -> None:
        with _libvirt("cannot read libvirt's version"):
            version = int(self.conn.getLibVersion())
        if version < MIN_LIBVIRT_VERSION:
            raise HypervisorError(
                f"libvirt {version // 1_000_000}.{version // 1000 % 1000} cannot attach virtio-fs "
                "to an external virtiofsd; boxvol needs libvirt 8.0 or later"
            )

    # -- prepare ------------------------------------------------------------------------

    def prepare(
        self, domain: str, *, spare_root_ports: int = dx.DEFAULT_SPARE_ROOT_PORTS
    ) -> PrepareResult:
        """Give the domain's persistent definition shared memory (and, on q35, spare PCIe
        root ports for hot-plug); a prepared domain is left untouched. A running domain
        gets the change at its next boot."""
        with self._changing(domain) as state:
            if state.config_xml is None:
                raise DomainStateConflict(
                    f"domain {domain} is transient: its memory backing cannot change while it "
                    "runs; define it (virsh define) and prepare that"
                )
            result = dx.prepare_domain(state.config_xml, spare_root_ports=spare_root_ports)
            if result.changes:
                with _libvirt(f"libvirt refused the prepared definition of {domain}"):
                    self.conn.defineXML(result.xml)
                log.info("prepared %s: %s", domain, "; ".join(result.changes))
            return PrepareResult(domain, result.changes, state.running and bool(result.changes))

    # -- listing ------------------------------------------------------------------------

    def _attachments(self, state: _State) -> list[Attachment]:
        live_devices = {}
        config_devices = {}
        records: dict[str, dx.AttachmentRecord] = {}
        if state.config_xml is not None:
            config_devices = {fs.tag: fs for fs in dx.boxvol_filesystems(state.config_xml)}
            records.update((r.tag, r) for r in dx.attachment_records(state.config_xml))
        if state.live_xml is not None:
            live_devices = {fs.tag: fs for fs in dx.boxvol_filesystems(state.live_xml)}
            records.update((r.tag, r) for r in dx.attachment_records(state.live_xml))
        tags = list(dict.fromkeys([*records, *live_devices, *config_devices]))
        out = []
        for tag in tags:
            record = records.get(tag)
            device = live_devices.get(tag) or config_devices.get(tag)
            out.append(
                Attachment(
                    domain=state.name,
                    tag=tag,
                    guest_path=record.guest_path if record else "",
                    read_only=record.read_only if record else False,
                    export_id=record.export_id if record else None,
                    volume=VolumeRef(record.volume_id, record.volume_name) if record else None,
                    via=record.via if record else "direct",
                    alias=device.alias if device else (record.alias if record else None),
                    socket=device.socket if device else None,
                    live=tag in live_devices,
                    config=tag in config_devices,
                )
            )
        return out

    def list_attachments(self, domain: str) -> list[Attachment]:
        """The domain's boxvol attachments: recorded ones and boxvol devices, each marked
        live (in the running guest) and/or config (in the persistent definition)."""
        return self._attachments(self._domain(domain))

    # -- attach -------------------------------------------------------------------------

    def attach(
        self,
        domain: str,
        specs: Sequence[VolumeSpec | str],
        *,
        scope: Scope | None = None,
        via: Via = "direct",
    ) -> list[Attachment]:
        """Attach one volume per spec (``-v`` text or parsed) to ``domain``, all or nothing.

        Boot-time (a stopped domain, or ``Scope(live=False, config=True)``): the persistent
        definition gains the devices and, for a kernel-booted guest, ``boxvol.mount=`` words.
        Hot-plug (a running domain): the running guest and, if the domain is persistent, its
        definition. Everything is checked before anything is created; on a failure, what this
        call did is undone in reverse order.
        """
        if via not in VIAS:
            raise InvalidArgument(f"invalid via {via!r}: give one of {', '.join(VIAS)}")
        if not specs:
            raise InvalidArgument("nothing to attach: give at least one -v SPEC")
        # The whole list is (re)validated as one, before libvirt or boxvold hear of it: a
        # host path is refused here, as are two specs for one guest path.
        specs = parse_specs([s if isinstance(s, str) else str(s) for s in specs])
        self._check_version()
        with self._changing(domain) as state:
            scope = state.scope(scope)
            existing = self._attachments(state)
            check_specs_against(specs, existing)
            self._check_prepared(state, scope)
            kernel_cmdline = (
                scope.config
                and state.config_xml is not None
                and dx.has_direct_kernel_boot(state.config_xml)
            )
            if kernel_cmdline:
                for spec in specs:
                    dx.check_cmdline_path(spec.guest_path)
            taken = {a.tag for a in existing}
            for xml in (state.live_xml, state.config_xml):
                if xml is not None:
                    taken |= dx.filesystem_tags(xml)

            volumes = ensure_spec_volumes(
                self.client, list(specs), consumer=f"{VM_CONSUMER_PREFIX}{domain}"
            )
            flags = (_AFFECT_LIVE if scope.live else 0) | (_AFFECT_CONFIG if scope.config else 0)
            steps = [_Step(spec, volume) for spec, volume in zip(specs, volumes, strict=True)]
            try:
                for step in steps:
                    spec, volume = step.spec, step.volume
                    tag = dx.derive_tag(volume.get("name"), volume["id"], taken)
                    taken.add(tag)
                    export = self._create_export(volume["id"], spec.read_only, via, domain, tag)
                    step.socket = export["socket"]
                    step.record = dx.AttachmentRecord(
                        tag=tag,
                        guest_path=spec.guest_path,
                        read_only=spec.read_only,
                        export_id=export["id"],
                        volume_id=volume["id"],
                        volume_name=volume.get("name"),
                        via=via,
                        alias=dx.alias_for_tag(tag),
                    )
                    device = dx.filesystem_device(export["socket"], tag, alias=step.record.alias)
                    log.info("attaching %s to %s as %s (%s)", volume["id"], domain, tag, scope)
                    with _libvirt(f"libvirt could not attach {spec} to {domain}"):
                        state.dom.attachDeviceFlags(device, flags)
                    step.attached = True
                records = [s.record for s in steps if s.record is not None]
                self._record(state, scope, add=records)
                if kernel_cmdline:
                    words = [dx.MountWord(r.tag, r.guest_path, r.read_only) for r in records]
                    self._edit_cmdline(state, add=words)
            except BaseException:
                self._roll_back(state, scope, steps, kernel_cmdline)
                raise
            return [
                Attachment(
                    domain=domain,
                    tag=r.tag,
                    guest_path=r.guest_path,
                    read_only=r.read_only,
                    export_id=r.export_id,
                    volume=VolumeRef(r.volume_id, r.volume_name),
                    via=r.via,
                    alias=r.alias,
                    socket=s.socket,
                    live=scope.live,
                    config=scope.config,
                )
                for s in steps
                if (r := s.record) is not None
            ]

    def _check_prepared(self, state: _State, scope: Scope) -> None:
        if scope.live and state.live_xml is not None and not dx.has_shared_memory(state.live_xml):
            raise DomainNotPrepared(
                f"domain {state.name} runs without shared memory, which virtio-fs needs: run "
                f"'boxvol vm prepare {state.name}' and restart it (or attach with --config "
                "to have the volume at its next boot)"
            )
        if (
            scope.config
            and state.config_xml is not None
            and not dx.has_shared_memory(state.config_xml)
        ):
            raise DomainNotPrepared(
                f"domain {state.name} has no shared memory, which virtio-fs needs: run "
                f"'boxvol vm prepare {state.name}' first"
            )

    def _create_export(
        self, volume_id: str, read_only: bool, via: Via, domain: str, tag: str
    ) -> dict[str, Any]:
        """A virtio-fs export of the volume for this domain and tag; boxvold answers with
        the vhost-user socket it serves (the only path libvirt ever gets)."""
        export = self.client.create_export(
            volume_id,
            kind="virtiofs",
            read_only=read_only,
            via=via,
            consumer={"vm": domain, "tag": tag},
        )
        if not export.get("socket") or not export.get("id"):
            raise HypervisorError(f"boxvold answered a virtio-fs export without a socket: {export}")
        return export

    def _roll_back(
        self, state: _State, scope: Scope, steps: Sequence[_Step], kernel_cmdline: bool
    ) -> None:
        """Undo a failed attach in reverse order, with detach's rule: a record, an export
        and an anonymous volume only go once their device is confirmed gone. What cannot be
        undone is logged and left for ``detach`` (or the domain's undefinition) to finish."""
        for step in reversed(steps):
            record = step.record
            try:
                if record is not None:
                    if step.attached:
                        self._remove_device(state, record.tag, record.alias, scope, timeout=30.0)
                    self._record(state, scope, remove_tags=[record.tag])
                    if kernel_cmdline:
                        self._edit_cmdline(state, remove_tags=[record.tag])
                    self.client.remove_export(record.export_id)
                if step.spec.anonymous:
                    self.client.remove_volume(step.volume["id"], force=True)
            except BoxvolError as exc:
                log.error(
                    "could not undo the attachment of %s to %s: %s", step.spec, state.name, exc
                )

    # -- metadata and command line ---------------------------------------------------------

    def _record(
        self,
        state: _State,
        scope: Scope,
        *,
        add: Sequence[dx.AttachmentRecord] = (),
        remove_tags: Sequence[str] = (),
    ) -> None:
        """Rewrite our metadata element in the definitions ``scope`` names."""
        drop = set(remove_tags) | {r.tag for r in add}
        for flag, wanted in ((_AFFECT_LIVE, scope.live), (_AFFECT_CONFIG, scope.config)):
            if not wanted:
                continue
            with _libvirt(f"cannot read the definition of {state.name}"):
                if flag == _AFFECT_LIVE and not state.dom.isActive():
                    continue  # it stopped meanwhile: the running definition is gone
                current = state.dom.XMLDesc(_CONFIG_XML if flag == _AFFECT_CONFIG else 0)
            records = [r for r in dx.attachment_records(current) if r.tag not in drop]
            records += add
            element = dx.metadata_element(records) if records else None
            try:
                with _libvirt(f"cannot record the attachments of {state.name}"):
                    state.dom.setMetadata(
                        libvirt.VIR_DOMAIN_METADATA_ELEMENT, element, dx.NS_PREFIX, dx.NS, flag
                    )
            except (DomainStateConflict, HypervisorError):
                # A guest may power off right after it releases a device: then the running
                # definition is gone, and there is nothing left to record in it.
                if flag == _AFFECT_LIVE and not state.dom.isActive():
                    continue
                raise

    def _edit_cmdline(
        self,
        state: _State,
        *,
        add: Sequence[dx.MountWord] = (),
        remove_tags: Sequence[str] = (),
    ) -> None:
        """Edit ``boxvol.mount=`` words of the persistent definition's kernel command line."""
        with _libvirt(f"cannot read the definition of {state.name}"):
            current = state.dom.XMLDesc(_CONFIG_XML)
        updated = dx.update_cmdline(current, add=add, remove_tags=remove_tags)
        if updated != current:
            with _libvirt(f"libvirt refused the new kernel command line of {state.name}"):
                self.conn.defineXML(updated)

    # -- detach -------------------------------------------------------------------------

    def detach(
        self,
        domain: str,
        targets: Sequence[str] = (),
        *,
        scope: Scope | None = None,
        timeout: float = DEFAULT_REMOVAL_TIMEOUT,
    ) -> list[Attachment]:
        """Detach attachments given by tag or guest path (all of them if none are given).

        Per attachment, in this order: the device is removed from the running guest and
        libvirt's DEVICE_REMOVED event for its alias is awaited; then it leaves the persistent
        definition, its record and its ``boxvol.mount=`` word; then, once no definition holds
        the device any more, its export is deleted, which stops virtiofsd. A guest that does
        not release the device within ``timeout`` seconds (or refuses) stops the detach with
        an error and the export keeps running: QEMU still holds its socket.
        """
        with self._changing(domain) as state:
            scope = state.scope(scope)
            attachments = self._attachments(state)
            chosen = select(domain, attachments, targets)
            done = []
            for attachment in chosen:
                self._detach_one(state, attachment, scope, timeout)
                done.append(attachment)
            return done

    def _detach_one(
        self, state: _State, attachment: Attachment, scope: Scope, timeout: float
    ) -> None:
        alias = attachment.alias or dx.alias_for_tag(attachment.tag)
        live, config = self._remove_device(state, attachment.tag, alias, scope, timeout)
        self._record(state, Scope(live=live, config=config), remove_tags=[attachment.tag])
        if config and state.config_xml is not None:
            self._edit_cmdline(state, remove_tags=[attachment.tag])
        still_live = state.running and attachment.live and not live
        still_config = state.persistent and attachment.config and not config
        if still_live or still_config:
            return
        # Without a record (an attach that failed half-way), boxvold still knows the export
        # by its consumer: this domain and this tag.
        export_id = attachment.export_id or self._export_for(state.name, attachment.tag)
        if export_id is not None:
            log.info("deleting export %s of %s", export_id, attachment.tag)
            try:
                self.client.remove_export(export_id)
            except NotFound:
                log.info("export %s was already gone", export_id)

    def _export_for(self, domain: str, tag: str) -> str | None:
        for export in self.client.list_exports():
            if export.get("consumer") == {"vm": domain, "tag": tag}:
                return str(export["id"])
        return None

    def _remove_device(
        self, state: _State, tag: str, alias: str, scope: Scope, timeout: float
    ) -> tuple[bool, bool]:
        """Remove the device from the definitions in ``scope``; live first, confirmed by
        the DEVICE_REMOVED event. Returns which definitions no longer hold it."""
        live_done = config_done = False
        if scope.live:
            self._remove_live(state, tag, alias, timeout)
            live_done = True
        if scope.config:
            with _libvirt(f"cannot read the definition of {state.name}"):
                current = state.dom.XMLDesc(_CONFIG_XML)
            device = _device(current, tag)
            if device is not None:
                try:
                    state.dom.detachDeviceFlags(device.xml, _AFFECT_CONFIG)
                except libvirt.libvirtError as exc:
                    if exc.get_error_code() not in _DEVICE_GONE:
                        raise translate(exc, f"cannot remove {tag} from {state.name}") from None
            config_done = True
        return live_done, config_done

    def _remove_live(self, state: _State, tag: str, alias: str, timeout: float) -> None:
        with _libvirt(f"cannot read the running definition of {state.name}"):
            if not state.dom.isActive():
                return
            current = state.dom.XMLDesc(0)
        device = _device(current, tag)
        if device is None:
            return
        alias = device.alias or alias
        self._removals.expect(state.uuid, alias)
        try:
            started = time.monotonic()
            try:
                state.dom.detachDeviceFlags(device.xml, _AFFECT_LIVE)
            except libvirt.libvirtError as exc:
                if exc.get_error_code() in _DEVICE_GONE:
                    return
                # A detach repeated while the guest completes an earlier unplug request (a
                # detach that timed out) can fail inside libvirt although the device is on
                # its way out ("chardev ... is busy"): what counts is whether it leaves.
                error = translate(exc, f"libvirt could not unplug {tag} from {state.name}")
                grace = min(started + timeout, time.monotonic() + ERROR_GRACE)
                if self._wait_removed(state, tag, alias, grace) in (None, "failed"):
                    raise error from None
                log.info("%s left %s although libvirt reported: %s", tag, state.name, error)
                return
            outcome = self._wait_removed(state, tag, alias, started + timeout)
            elapsed = time.monotonic() - started
        finally:
            self._removals.forget(state.uuid, alias)
        if outcome == "failed":
            raise DeviceRemovalFailed(
                f"the guest {state.name} refused to release {tag} (DEVICE_REMOVAL_FAILED); "
                "its export keeps running; try again once the guest has unmounted it"
            )
        if outcome is None:
            raise DeviceRemovalTimeout(
                f"the guest {state.name} did not release {tag} within {timeout:.0f} s; its "
                "export keeps running (QEMU still holds the socket); unmount it in the guest "
                "and detach again, or give a longer --timeout"
            )
        log.info("%s left %s after %.2f s (%s)", tag, state.name, elapsed, outcome)

    def _wait_removed(self, state: _State, tag: str, alias: str, deadline: float) -> str | None:
        """The DEVICE_REMOVED event; every second the running definition is looked at too,
        so a removal whose event was lost (a reconnect) is still seen."""
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            outcome = self._removals.wait(state.uuid, alias, min(left, 1.0))
            if outcome is not None:
                return outcome
            with _libvirt(f"cannot read the running definition of {state.name}"):
                if not state.dom.isActive():
                    return "stopped"
                if _device(state.dom.XMLDesc(0), tag) is None:
                    return "gone"

    # -- lifecycle ----------------------------------------------------------------------

    def release(self, domain: str) -> Released:
        """Delete the exports (``consumer.vm == domain``) and remove the anonymous volumes
        (``consumer == "vm:<domain>"``) of a domain that no longer exists on this connection.
        Refused while the domain exists: its guest may still use them."""
        if self._exists(domain):
            raise DomainStateConflict(
                f"domain {domain} still exists; its volumes are released once it is undefined"
            )
        return self._release(domain)

    def _exists(self, domain: str) -> bool:
        """Whether a domain of this name exists on the connection (defined, or transient and
        running). Only libvirt's VIR_ERR_NO_DOMAIN means it does not: any other libvirt error
        (a lost connection, a refused call) is raised, so nothing is released on a guess."""
        try:
            self._lookup(domain)
        except DomainNotFound:
            return False
        return True

    def reconcile(self) -> list[LifecycleEvent]:
        """Release every domain that boxvold still exports to but that no longer exists on
        this connection: those undefined (or, transient, stopped) while no watcher listened.

        The candidates are the domains named by exports' consumers (``{"vm": name, ...}``, as
        ``attach`` records them) and by anonymous volumes' (``vm:NAME``); each is looked up by
        name and released (as ``release``
        does: exports deleted, anonymous volumes removed) only if libvirt answers
        VIR_ERR_NO_DOMAIN. A domain whose lookup or release fails otherwise is logged and
        kept for the next reconcile. Raises if boxvold cannot list its exports. Blocks.
        """
        names: dict[str, None] = {}
        for export in self.client.list_exports():
            consumer = export.get("consumer")
            if isinstance(consumer, dict) and isinstance(consumer.get("vm"), str):
                names[consumer["vm"]] = None
        # Anonymous volumes can outlive their exports (a release cut short, an attach that
        # failed half-way, a volume kept while in use elsewhere): their domains count too.
        for volume in self.client.list_volumes([("kind", "anonymous")]):
            consumer = volume.get("consumer")
            if isinstance(consumer, str) and consumer.startswith(VM_CONSUMER_PREFIX):
                names[consumer[len(VM_CONSUMER_PREFIX) :]] = None
        events = []
        for name in names:
            try:
                if self._exists(name):
                    continue
                log.info("domain %s no longer exists on %s: releasing its volumes", name, self.uri)
                released = self._release(name)
            except BoxvolError as exc:
                log.error("reconcile: kept the exports of %s: %s", name, exc.message)
                continue
            events.append(LifecycleEvent(name, None, "gone", released))
        return events

    def _release(self, domain: str) -> Released:
        exports = []
        for export in self.client.list_exports():
            consumer = export.get("consumer")
            if isinstance(consumer, dict) and consumer.get("vm") == domain:
                try:
                    self.client.remove_export(export["id"])
                    exports.append(export["id"])
                except NotFound:
                    pass
        volumes, kept = [], []
        for volume in self.client.list_volumes([("kind", "anonymous")]):
            if volume.get("consumer") != f"{VM_CONSUMER_PREFIX}{domain}":
                continue
            try:
                self.client.remove_volume(volume["id"])
                volumes.append(volume["id"])
            except NotFound:
                pass
            except InUse as exc:
                kept.append((volume["id"], exc.message))
        released = Released(domain, tuple(exports), tuple(volumes), tuple(kept))
        log.info("released %s: exports %s, volumes %s, kept %s", domain, exports, volumes, kept)
        return released

    def _gone(self, uuid: str) -> bool:
        """True if no domain with this uuid exists any more (undefined and not running)."""
        try:
            dom = self.conn.lookupByUUIDString(uuid)
        except libvirt.libvirtError as exc:
            if exc.get_error_code() in _NO_DOMAIN:
                return True
            raise translate(exc, f"cannot look up domain {uuid}") from None
        # Undefined while running: it lives on as a transient domain until it stops.
        with _libvirt(f"cannot read the state of domain {uuid}"):
            return not (dom.isActive() or dom.isPersistent())

    def handle_lifecycle_event(self, name: str, uuid: str, event: int) -> LifecycleEvent:
        """The reaction to one libvirt lifecycle event (``VIR_DOMAIN_EVENT_*``): a domain
        that is gone has its volumes released. Blocks (the watcher runs it in a thread)."""
        kind: LifecycleKind = _KINDS.get(event, "other")
        released = None
        if kind in ("undefined", "stopped") and self._gone(uuid):
            released = self._release(name)
        return LifecycleEvent(name, uuid, kind, released)

    # -- lifecycle subscriptions (for ``vmdriver.libvirt_watch``) -------------------------

    def subscribe(
        self,
        on_lifecycle: Callable[[Any, Any, int, int, Any], None],
        on_close: Callable[[Any, int, Any], None],
        opaque: object,
    ) -> Subscription:
        """Open the connection if needed and register a lifecycle callback and the
        connection's close callback (``opaque`` is handed back to ``on_close``). Both run on
        libvirt's event thread. All or nothing; blocks."""
        conn = self.conn
        with _libvirt(f"cannot subscribe to libvirt's lifecycle events on {self.uri}"):
            callback_id = conn.domainEventRegisterAny(
                None, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, on_lifecycle, None
            )
        try:
            with _libvirt(f"cannot watch the libvirt connection to {self.uri}"):
                conn.registerCloseCallback(on_close, opaque)
        except BoxvolError:
            _deregister(conn, callback_id)
            raise
        return Subscription(conn, callback_id)

    def unsubscribe(self, subscription: Subscription) -> None:
        """Undo ``subscribe``; errors of a connection that is already gone are ignored."""
        with contextlib.suppress(libvirt.libvirtError):
            subscription.conn.unregisterCloseCallback()
        _deregister(subscription.conn, subscription.callback_id)

    async def watch_lifecycle(
        self,
        *,
        on_event: Callable[[LifecycleEvent], object] | None = None,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Follow libvirt's domain lifecycle events until cancelled, reconciling at start,
        after every reconnection and every minute; see ``vmdriver.libvirt_watch.watch``."""
        from vmdriver.libvirt_watch import watch

        await watch(self, on_event=on_event, task_status=task_status)


class Subscription:
    """A lifecycle callback and a close callback registered on one libvirt connection."""

    def __init__(self, conn: Any, callback_id: int) -> None:
        self.conn = conn
        self.callback_id = callback_id


_KINDS: dict[int, LifecycleKind] = {
    libvirt.VIR_DOMAIN_EVENT_DEFINED: "defined",
    libvirt.VIR_DOMAIN_EVENT_UNDEFINED: "undefined",
    libvirt.VIR_DOMAIN_EVENT_STARTED: "started",
    libvirt.VIR_DOMAIN_EVENT_STOPPED: "stopped",
}


def _deregister(conn: Any, callback_id: int) -> None:
    with contextlib.suppress(libvirt.libvirtError):
        conn.domainEventDeregisterAny(callback_id)


def _device(xml: str, tag: str) -> dx.FilesystemDevice | None:
    return next((fs for fs in dx.filesystems(xml) if fs.tag == tag), None)
