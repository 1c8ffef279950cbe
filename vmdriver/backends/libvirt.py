"""The libvirt backend: virtio-fs shares served by boxvold, attached through libvirt.

``LibvirtBackend`` is the backend of the attach workflow (``vmdriver.attachments``) for one
libvirt connection (any libvirt URI; ``qemu:///system`` by default): domains looked up by
name and known by UUID, boxvol's filesystem devices in the running guest and the persistent
definition, each added with a copy of its record in the domain's metadata (and a
``boxvol.mount=`` word on a kernel-booted guest's command line), each removed from the running
guest with the removal *confirmed* by libvirt's DEVICE_REMOVED event before the workflow
stops its export. It also owns libvirt's default event loop (one daemon thread) and the
translation of libvirt errors into boxvol's by error code (never by message text).

``LibvirtDriver`` is the workflow over that backend plus what only libvirt has: ``prepare``
(shared memory and spare root ports in a domain's definition) and the lifecycle watcher that
reconnects after a libvirtd restart (``vmdriver.backends.libvirt_watch``). A stopped domain
keeps its exports (boxvold re-arms virtiofsd for the next boot); an undefined one has them
released, when its event arrives or at the next reconcile.

Event callbacks run on libvirt's event thread and only hand what they saw to the side waiting
for it (a condition variable for device removals, a trio memory channel for lifecycle events);
they never change state themselves. Every method except the watchers blocks.

Talks to boxvold only through ``volumed.client``; boxvold never imports this module.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from typing import Any

import libvirt
import trio

from vmdriver import domain_xml as dx
from vmdriver.attachments import Attachments
from vmdriver.backends.base import Device, NewDevice, VmRef
from vmdriver.driver import (
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
    Scope,
)
from vmdriver.locks import DEFAULT_WAIT as DEFAULT_LOCK_WAIT
from vmdriver.locks import default_lock_dir, domain_lock
from volumed.client import Client
from volumed.errors import BoxvolError

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


# -- the backend ---------------------------------------------------------------------------


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


class LibvirtBackend:
    """boxvol's backend for one libvirt connection (``vmdriver.backends.base.Backend``).

    A VM is a domain; its instance is the domain's UUID. Besides the device, each attachment
    leaves a copy of its record in the domain's metadata (for operators: ``virsh dumpxml``)
    and, for a kernel-booted guest's persistent definition, a ``boxvol.mount=`` word on its
    kernel command line; nothing reads the metadata back but ``virsh``.
    """

    label = "libvirt"
    names_vms = True
    _conn: Any
    _removals: _Removals
    _callbacks: list[int]

    def __init__(
        self,
        uri: str = DEFAULT_URI,
        *,
        lock_dir: str | None = None,
        lock_wait: float = DEFAULT_LOCK_WAIT,
    ) -> None:
        self.uri = uri
        #: ``prepare``'s change lock (the workflow holds the same lock for its changes).
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

    def _on_removed(self, _conn: Any, dom: Any, alias: str, _opaque: Any) -> None:
        self._removals.post(dom.UUIDString(), alias, "removed")

    def _on_removal_failed(self, _conn: Any, dom: Any, alias: str, _opaque: Any) -> None:
        self._removals.post(dom.UUIDString(), alias, "failed")

    def _lookup(self, name: str) -> Any:
        conn = self.conn
        with _libvirt(f"no domain {name!r} on {self.uri}"):
            return conn.lookupByName(name)

    def _state(self, vm: VmRef) -> _State:
        """The domain of ``vm`` by its UUID (a new domain of the same name is another VM)."""
        conn = self.conn
        with _libvirt(f"domain {vm.name} ({vm.instance}) is gone from {self.uri}"):
            dom = conn.lookupByUUIDString(vm.instance)
        return _State(dom, vm.name)

    def _check_version(self) -> None:
        with _libvirt("cannot read libvirt's version"):
            version = int(self.conn.getLibVersion())
        if version < MIN_LIBVIRT_VERSION:
            raise HypervisorError(
                f"libvirt {version // 1_000_000}.{version // 1000 % 1000} cannot attach virtio-fs "
                "to an external virtiofsd; boxvol needs libvirt 8.0 or later"
            )

    # -- the Backend interface ---------------------------------------------------------

    def lookup(self, name: str) -> VmRef:
        """The domain called ``name``, with every virtio-fs tag its definitions use."""
        state = _State(self._lookup(name), name)
        tags: set[str] = set()
        for xml in (state.live_xml, state.config_xml):
            if xml is not None:
                tags |= dx.filesystem_tags(xml)
        return VmRef(name, state.uuid, state.running, state.persistent, frozenset(tags))

    def instance_exists(self, instance: str) -> bool:
        """Whether the domain with this UUID still exists (defined, or transient and
        running). Only libvirt's VIR_ERR_NO_DOMAIN means it does not."""
        return not self._gone(instance)

    def devices(self, vm: VmRef) -> list[Device]:
        """boxvol's filesystems in the running guest and in the persistent definition."""
        state = self._state(vm)
        live = {fs.tag: fs for fs in dx.boxvol_filesystems(state.live_xml or "<domain/>")}
        config = {fs.tag: fs for fs in dx.boxvol_filesystems(state.config_xml or "<domain/>")}
        found = []
        for tag in dict.fromkeys([*live, *config]):
            device = live.get(tag) or config[tag]
            found.append(
                Device(
                    tag,
                    device.alias or dx.alias_for_tag(tag),
                    live=tag in live,
                    config=tag in config,
                )
            )
        return found

    def check_ready(self, vm: VmRef, scope: Scope, guest_paths: Sequence[str]) -> None:
        """libvirt 8.0 or later, shared memory in every definition in ``scope``, and guest
        paths a kernel command line can carry (for a kernel-booted guest)."""
        self._check_version()
        state = self._state(vm)
        self._check_prepared(state, scope)
        if self._kernel_cmdline(state, scope):
            for path in guest_paths:
                dx.check_cmdline_path(path)

    def add_device(self, vm: VmRef, device: NewDevice, scope: Scope) -> None:
        """The filesystem device, then the record's copy in the metadata, then (persistent,
        kernel-booted) the ``boxvol.mount=`` word; the device goes again if either fails."""
        state = self._state(vm)
        flags = (_AFFECT_LIVE if scope.live else 0) | (_AFFECT_CONFIG if scope.config else 0)
        xml = dx.filesystem_device(device.socket, device.tag, alias=device.device_id)
        with _libvirt(f"libvirt could not attach {device.tag} to {vm.name}"):
            state.dom.attachDeviceFlags(xml, flags)
        record = dx.AttachmentRecord(
            tag=device.tag,
            guest_path=device.guest_path,
            read_only=device.read_only,
            export_id=device.export_id,
            volume_id=device.volume_id,
            volume_name=device.volume_name,
            via=device.via,
            alias=device.device_id,
        )
        try:
            self._record(state, scope, add=[record])
            if self._kernel_cmdline(state, scope):
                self._edit_cmdline(
                    state, add=[dx.MountWord(device.tag, device.guest_path, device.read_only)]
                )
        except BaseException:
            with contextlib.suppress(BoxvolError):
                self.remove_device(
                    vm,
                    Device(device.tag, device.device_id, live=scope.live, config=scope.config),
                    scope,
                    ERROR_GRACE,
                )
            raise

    def remove_device(self, vm: VmRef, device: Device, scope: Scope, timeout: float) -> None:
        """The device leaves the running guest (confirmed by DEVICE_REMOVED), then the
        persistent definition; its metadata copy and command-line word go with it."""
        state = self._state(vm)
        live, config = self._remove_device(state, device.tag, device.device_id, scope, timeout)
        self._record(state, Scope(live=live, config=config), remove_tags=[device.tag])
        if config and state.config_xml is not None:
            self._edit_cmdline(state, remove_tags=[device.tag])

    def _kernel_cmdline(self, state: _State, scope: Scope) -> bool:
        """Whether the change reaches the persistent definition of a kernel-booted guest."""
        return (
            scope.config
            and state.config_xml is not None
            and dx.has_direct_kernel_boot(state.config_xml)
        )

    async def watch(
        self,
        on_ended: Callable[[str], Awaitable[object]],
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Report each domain that is gone (undefined, or a transient one stopped), through
        ``vmdriver.backends.libvirt_watch`` (it also reconnects after libvirtd restarts)."""
        from vmdriver.backends.libvirt_watch import watch

        await watch(_EndReporter(self, on_ended), task_status=task_status)

    def prepare(
        self, domain: str, *, spare_root_ports: int = dx.DEFAULT_SPARE_ROOT_PORTS
    ) -> PrepareResult:
        """Give the domain's persistent definition shared memory (and, on q35, spare PCIe
        root ports for hot-plug); a prepared domain is left untouched. A running domain
        gets the change at its next boot."""
        with self._changing_definition(domain) as state:
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
        """What one libvirt lifecycle event (``VIR_DOMAIN_EVENT_*``) means: its kind, and
        whether the domain is gone now. Blocks."""
        kind: LifecycleKind = _KINDS.get(event, "other")
        gone = kind in ("undefined", "stopped") and self._gone(uuid)
        return LifecycleEvent(name, uuid, "gone" if gone else kind)

    # -- lifecycle subscriptions (for ``vmdriver.backends.libvirt_watch``) --------------------

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

    @contextlib.contextmanager
    def _changing_definition(self, name: str) -> Iterator[_State]:
        """The domain, read while this process holds its change lock."""
        dom = self._lookup(name)
        with _libvirt(f"cannot read the UUID of domain {name}"):
            uuid = dom.UUIDString()
        with domain_lock(self.lock_dir, uuid, name, wait=self.lock_wait):
            yield _State(dom, name)


class _EndReporter:
    """What ``vmdriver.backends.libvirt_watch`` drives, for ``LibvirtBackend.watch``: domains that
    are gone go to ``on_ended``; reconciling is the workflow's."""

    def __init__(self, backend: LibvirtBackend, on_ended: Callable[[str], Awaitable[object]]):
        self.backend = backend
        self.uri = backend.uri
        self.on_ended = on_ended

    def subscribe(self, *args: Any) -> Subscription:
        return self.backend.subscribe(*args)

    def unsubscribe(self, subscription: Subscription) -> None:
        self.backend.unsubscribe(subscription)

    def close(self) -> None:
        self.backend.close()

    def reconcile(self) -> list[LifecycleEvent]:
        return []

    def handle_lifecycle_event(self, name: str, uuid: str, event: int) -> LifecycleEvent:
        seen = self.backend.handle_lifecycle_event(name, uuid, event)
        if seen.kind == "gone":
            trio.from_thread.run(self.on_ended, uuid)
        return seen


# -- the driver ----------------------------------------------------------------------------


class LibvirtDriver(Attachments):
    """The attach workflow (``vmdriver.attachments``) over a libvirt connection, plus what
    only libvirt has: ``prepare`` (shared memory and spare root ports in a domain's
    definition) and its lifecycle watcher with reconnection (``vmdriver.backends.libvirt_watch``).

    Attributes:
        client: boxvold's API client (volumes and exports).
        uri: the libvirt connection URI.
    """

    backend: LibvirtBackend

    def __init__(
        self,
        client: Client,
        uri: str = DEFAULT_URI,
        *,
        lock_dir: str | None = None,
        lock_wait: float = DEFAULT_LOCK_WAIT,
    ) -> None:
        backend = LibvirtBackend(uri, lock_dir=lock_dir, lock_wait=lock_wait)
        super().__init__(client, backend, lock_dir=backend.lock_dir, lock_wait=lock_wait)
        self.uri = uri

    def __enter__(self) -> LibvirtDriver:
        return self

    @property
    def conn(self) -> Any:
        """The libvirt connection, opened (with device-removal callbacks) on first use."""
        return self.backend.conn

    def prepare(
        self, domain: str, *, spare_root_ports: int = dx.DEFAULT_SPARE_ROOT_PORTS
    ) -> PrepareResult:
        """See ``LibvirtBackend.prepare``."""
        return self.backend.prepare(domain, spare_root_ports=spare_root_ports)

    def handle_lifecycle_event(self, name: str, uuid: str, event: int) -> LifecycleEvent:
        """The reaction to one lifecycle event: a domain that is gone has its volumes
        released (matched by its UUID). Blocks (the watcher runs it in a thread)."""
        seen = self.backend.handle_lifecycle_event(name, uuid, event)
        if seen.kind != "gone":
            return seen
        kind: LifecycleKind = _KINDS.get(event, "other")
        return LifecycleEvent(name, uuid, kind, self._release(uuid))

    def subscribe(
        self,
        on_lifecycle: Callable[[Any, Any, int, int, Any], None],
        on_close: Callable[[Any, int, Any], None],
        opaque: object,
    ) -> Subscription:
        """See ``LibvirtBackend.subscribe``."""
        return self.backend.subscribe(on_lifecycle, on_close, opaque)

    def unsubscribe(self, subscription: Subscription) -> None:
        """See ``LibvirtBackend.unsubscribe``."""
        self.backend.unsubscribe(subscription)

    async def watch(
        self,
        on_event: Any = None,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Follow libvirt's domain lifecycle events until cancelled, reconciling at start,
        after every reconnection and every minute; see ``vmdriver.backends.libvirt_watch.watch``."""
        from vmdriver.backends.libvirt_watch import watch

        await watch(self, on_event=on_event, task_status=task_status)

    async def watch_lifecycle(
        self,
        *,
        on_event: Callable[[LifecycleEvent], object] | None = None,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """The same as ``watch``."""
        await self.watch(on_event, task_status=task_status)


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
