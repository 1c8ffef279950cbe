"""QEMU over QMP: ``qmp:///ABSOLUTE/PATH/qmp.sock``, one QEMU process per URI.

For QEMU processes another tool started (as Kata and many sandbox runtimes do), with
``-qmp unix:PATH,server=on,wait=off``. The VM instance is the QEMU process itself (its pid
and start time, from the QMP socket's peer credentials): when it ends, so does the VM.

- attach: ``chardev-add`` (a unix socket client: ``"server": false``, said explicitly since
  QMP's default is server), then ``device_add`` ``vhost-user-fs-pci`` on a free
  ``pcie-root-port`` (q35) or the root bus (pc). Refused first if the guest's RAM is not
  shared memory, which vhost-user needs;
- detach: ``device_del``, then ``DEVICE_DELETED`` for that id awaited (the guest released
  it), ``DEVICE_UNPLUG_GUEST_ERROR`` and a deadline reported, then ``chardev-remove``;
- lifecycle: the QEMU process is watched through a pidfd, so the watcher does not hold the
  QMP socket (QEMU serves one QMP client at a time) between commands.

Each operation opens its own QMP session (``vmdriver.qmp``) and closes it.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import trio

from vmdriver.backends.base import Device, NewDevice, VmRef
from vmdriver.domain_xml import ALIAS_PREFIX
from vmdriver.driver import (
    DeviceRemovalFailed,
    DeviceRemovalTimeout,
    DomainNotFound,
    DomainNotPrepared,
    HypervisorUnavailable,
    Scope,
)
from vmdriver.processes import ProcessInstance, follow_processes, instance_alive, socket_uri_path
from vmdriver.qmp import QmpCommandError, QmpConnection

log = logging.getLogger(__name__)

SCHEME = "qmp"
T = TypeVar("T")
#: QEMU run states in which the guest exists and can take a hot-plug.
_LIVE_STATES = {"running", "paused", "debug", "prelaunch", "suspended", "watchdog", "io-error"}


def chardev_id(device_id: str) -> str:
    """The chardev of a device: its id with ``-chr`` (injective, as device ids are)."""
    return f"{device_id}-chr"


def socket_path(uri: str) -> str:
    """The QMP socket a ``qmp:///PATH`` URI names; refuses anything else."""
    return socket_uri_path(uri, SCHEME, "QMP", "qmp.sock")


class QmpBackend:
    """boxvol's backend for one QEMU process's QMP socket (``vmdriver.backends.base``)."""

    label = "QEMU (QMP)"
    names_vms = False

    def __init__(self, uri: str) -> None:
        self.uri = uri
        self.path = socket_path(uri)

    def close(self) -> None:
        """Nothing stays open between operations."""

    def _run(self, operation: Callable[[QmpConnection], Awaitable[T]], name: str) -> T:
        """One QMP session for ``operation``; QEMU's refusals name the VM and the URI."""

        async def session() -> T:
            async with QmpConnection.open(self.path) as qmp:
                return await operation(qmp)

        try:
            return trio.run(session)
        except QmpCommandError as exc:
            raise QmpCommandError(
                f"QEMU VM {name} ({self.uri}): {exc.message}", exc.error_class
            ) from None

    def _check_instance(self, qmp: QmpConnection, vm: VmRef) -> None:
        if str(qmp.instance) != vm.instance:
            raise DomainNotFound(
                f"QEMU at {self.path} is now another process ({qmp.instance}); VM {vm.name} "
                f"({vm.instance}) has ended"
            )

    # -- the Backend interface --------------------------------------------------------

    def lookup(self, name: str) -> VmRef:
        """The QEMU behind the socket, under the name boxvol records for it."""

        async def look(qmp: QmpConnection) -> VmRef:
            status = await qmp.execute("query-status")
            running = str(status.get("status")) in _LIVE_STATES
            return VmRef(name, str(qmp.instance), running=running, persistent=False)

        try:
            return self._run(look, name)
        except HypervisorUnavailable as exc:
            raise DomainNotFound(f"no QEMU for VM {name}: {exc.message}") from None

    def instance_exists(self, instance: str) -> bool:
        """Whether that QEMU process still runs."""
        return instance_alive(instance, "QEMU")

    def devices(self, vm: VmRef) -> list[Device]:
        """boxvol's vhost-user-fs devices (ids starting ``ua-boxvol-``) and their tags."""

        async def listing(qmp: QmpConnection) -> list[Device]:
            self._check_instance(qmp, vm)
            return await _devices(qmp)

        return self._run(listing, vm.name)

    def check_ready(self, vm: VmRef, scope: Scope, guest_paths: Sequence[str]) -> None:
        """Shared memory, and (q35) a free pcie-root-port per guest path."""

        async def check(qmp: QmpConnection) -> None:
            self._check_instance(qmp, vm)
            await _check_shared_memory(qmp, vm.name)
            if await _is_q35(qmp):
                free = await _free_root_ports(qmp)
                if len(free) < len(guest_paths):
                    raise DomainNotPrepared(
                        f"QEMU VM {vm.name} has {len(free)} free pcie-root-port(s) and needs "
                        f"{len(guest_paths)}: start it with spare ports, e.g. -device "
                        "pcie-root-port,id=boxvol-rp1,chassis=1,slot=1 (one per share)"
                    )

        self._run(check, vm.name)

    def add_device(self, vm: VmRef, device: NewDevice, scope: Scope) -> None:
        """chardev-add (client), then device_add on a free port; the chardev goes again if
        the device is refused."""

        async def add(qmp: QmpConnection) -> None:
            self._check_instance(qmp, vm)
            chardev = chardev_id(device.device_id)
            await qmp.execute(
                "chardev-add",
                {
                    "id": chardev,
                    "backend": {
                        "type": "socket",
                        "data": {
                            "addr": {"type": "unix", "data": {"path": device.socket}},
                            "server": False,
                        },
                    },
                },
            )
            arguments: dict[str, Any] = {
                "driver": "vhost-user-fs-pci",
                "id": device.device_id,
                "chardev": chardev,
                "tag": device.tag,
                "queue-size": device.queue_size,
            }
            if await _is_q35(qmp):
                free = await _free_root_ports(qmp)
                if not free:
                    raise DomainNotPrepared(f"QEMU VM {vm.name} has no free pcie-root-port left")
                arguments["bus"] = free[0]
            try:
                await qmp.execute("device_add", arguments)
            except BaseException:
                with trio.CancelScope(shield=True):
                    await _remove_chardev(qmp, chardev)
                raise

        self._run(add, vm.name)

    def remove_device(self, vm: VmRef, device: Device, scope: Scope, timeout: float) -> None:
        """device_del, DEVICE_DELETED awaited, then chardev-remove."""

        async def remove(qmp: QmpConnection) -> None:
            self._check_instance(qmp, vm)
            present = {d.device_id for d in await _devices(qmp)}
            if device.device_id in present:
                try:
                    await qmp.execute("device_del", {"id": device.device_id})
                except QmpCommandError as exc:
                    if exc.error_class != "DeviceNotFound":
                        raise
                else:
                    await _await_deleted(qmp, vm.name, device, timeout)
            await _remove_chardev(qmp, chardev_id(device.device_id))

        self._run(remove, vm.name)

    async def watch(
        self,
        on_ended: Callable[[str], Awaitable[object]],
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Follow the QEMU processes behind the socket, one after another."""

        async def probe() -> ProcessInstance:
            async with QmpConnection.open(self.path) as qmp:
                return qmp.instance

        task_status.started()
        await follow_processes(probe, on_ended, f"QEMU at {self.path}")


async def _devices(qmp: QmpConnection) -> list[Device]:
    entries = await qmp.execute("qom-list", {"path": "/machine/peripheral"})
    found = []
    for entry in entries:
        name = str(entry.get("name", ""))
        if not name.startswith(ALIAS_PREFIX) or "vhost-user-fs" not in str(entry.get("type")):
            continue
        tag = await qmp.execute(
            "qom-get", {"path": f"/machine/peripheral/{name}", "property": "tag"}
        )
        found.append(Device(str(tag), name, live=True, config=False))
    return found


async def _is_q35(qmp: QmpConnection) -> bool:
    machine = await qmp.execute("qom-get", {"path": "/machine", "property": "type"})
    return "q35" in str(machine)


async def _check_shared_memory(qmp: QmpConnection, name: str) -> None:
    """vhost-user needs the guest RAM in shared memory: a memory backend with share=on."""
    memdevs = await qmp.execute("query-memdev")
    if memdevs and all(m.get("share") for m in memdevs):
        return
    raise DomainNotPrepared(
        f"QEMU VM {name} runs without shared guest memory, which vhost-user-fs needs: start "
        "it with -object memory-backend-memfd,id=mem,size=<RAM>,share=on -machine "
        "memory-backend=mem"
    )


async def _free_root_ports(qmp: QmpConnection) -> list[str]:
    """ids of pcie-root-ports with nothing plugged in, in bus order."""
    free = []
    for bus in await qmp.execute("query-pci"):
        for dev in bus.get("devices", []):
            bridge = dev.get("pci_bridge")
            qdev_id = dev.get("qdev_id")
            if bridge is None or not qdev_id:
                continue
            if not bridge.get("devices"):
                free.append(str(qdev_id))
    return free


async def _remove_chardev(qmp: QmpConnection, chardev: str) -> None:
    try:
        await qmp.execute("chardev-remove", {"id": chardev})
    except QmpCommandError as exc:
        log.debug("chardev-remove %s: %s", chardev, exc.message)


async def _await_deleted(qmp: QmpConnection, name: str, device: Device, timeout: float) -> None:
    """Wait for DEVICE_DELETED of the device; the guest's refusal and the deadline raise."""
    path = f"/machine/peripheral/{device.device_id}"
    with trio.move_on_after(timeout if math.isfinite(timeout) else 1e9) as waited:
        while True:
            event = await qmp.next_event()
            data = event.get("data") or {}
            if data.get("device") != device.device_id and data.get("path") != path:
                continue
            if event.get("event") == "DEVICE_DELETED":
                return
            if event.get("event") == "DEVICE_UNPLUG_GUEST_ERROR":
                raise DeviceRemovalFailed(
                    f"the guest of QEMU VM {name} refused to release {device.tag} "
                    "(DEVICE_UNPLUG_GUEST_ERROR); its export keeps running"
                )
    if waited.cancelled_caught:
        raise DeviceRemovalTimeout(
            f"the guest of QEMU VM {name} did not release {device.tag} within {timeout:.0f} s; "
            "its export keeps running (QEMU still holds the socket); unmount it in the guest "
            "and detach again, or give a longer --timeout"
        )
