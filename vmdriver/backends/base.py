"""What a VMM backend does for the attach workflow: a few operations on one VMM connection.

The workflow (``vmdriver.attachments``) owns everything else: spec checks, volumes and
exports from boxvold, the records, rollback, the order of a detach, releases and the per-VM
lock. A backend only looks VMs up, lists, adds and removes its vhost-user-fs devices, says
whether a VM instance still exists, and reports VM instances that end.

Pure: no VMM library, no I/O at import time.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Protocol

from vmdriver.driver import Scope

if TYPE_CHECKING:
    import trio

#: Queue size of every vhost-user-fs device boxvol adds (virtiofsd's default maximum).
QUEUE_SIZE = 1024
#: Request queues per device (virtiofsd serves one; the hiprio queue comes on top).
NUM_QUEUES = 1


@dataclasses.dataclass(frozen=True, slots=True)
class VmRef:
    """A VM as its backend found it."""

    #: The name boxvol records for it (the DOMAIN of ``boxvol vm``).
    name: str
    #: What identifies this VM instance on its backend for as long as it exists: libvirt's
    #: UUID; for a VMM process, ``pid=N,start=T`` (``vmdriver.processes``).
    instance: str
    #: Its guest runs (devices can be hot-plugged).
    running: bool
    #: It has a definition that outlives the guest (libvirt only).
    persistent: bool
    #: Every virtio-fs tag the VM uses, boxvol's or not: a new tag must differ from them.
    tags_in_use: frozenset[str] = frozenset()


@dataclasses.dataclass(frozen=True, slots=True)
class Device:
    """A vhost-user-fs device boxvol added to a VM."""

    tag: str
    #: The id the VMM knows it by (QMP/Cloud Hypervisor id, libvirt alias).
    device_id: str
    #: In the running guest.
    live: bool = True
    #: In the persistent definition.
    config: bool = False


@dataclasses.dataclass(frozen=True, slots=True)
class NewDevice:
    """A vhost-user-fs device to add: QEMU or Cloud Hypervisor connects to ``socket``."""

    tag: str
    device_id: str
    socket: str
    #: What the device is for, for a backend that keeps a copy of the record next to the
    #: device (libvirt's domain metadata, the kernel command line of a kernel-booted guest).
    guest_path: str = ""
    read_only: bool = False
    export_id: str = ""
    volume_id: str = ""
    volume_name: str | None = None
    via: str = "direct"
    queue_size: int = QUEUE_SIZE
    num_queues: int = NUM_QUEUES


class Backend(Protocol):
    """One connection to one VMM (or one VM's API socket). Every method but ``watch``
    blocks; the workflow calls them from a worker thread in async code."""

    #: The ``--connect`` URI, recorded with every attachment made through this backend.
    uri: str
    #: For messages: "libvirt", "QEMU (QMP)", "Cloud Hypervisor".
    label: str
    #: The VMM names its VMs (libvirt). Otherwise DOMAIN is only the name boxvol records for
    #: the VM behind the URI, and a VM is always called by the name it was first given.
    names_vms: bool

    def lookup(self, name: str) -> VmRef:
        """The VM called ``name``; raises DomainNotFound."""
        ...

    def instance_exists(self, instance: str) -> bool:
        """Whether the VM instance ``instance`` (a ``VmRef.instance``) still exists. Raises
        when the answer is unknown (the VMM unreachable for another reason): nothing is
        released on a guess."""
        ...

    def devices(self, vm: VmRef) -> list[Device]:
        """boxvol's vhost-user-fs devices of the VM."""
        ...

    def check_ready(self, vm: VmRef, scope: Scope, guest_paths: Sequence[str]) -> None:
        """Refuse, before anything changes, a VM that cannot take one more device per guest
        path in ``scope`` (no shared memory, no free hot-plug slot): DomainNotPrepared naming
        the fix."""
        ...

    def add_device(self, vm: VmRef, device: NewDevice, scope: Scope) -> None:
        """Add the device in ``scope``; all or nothing (a half-added device is removed
        again)."""
        ...

    def remove_device(self, vm: VmRef, device: Device, scope: Scope, timeout: float) -> None:
        """Remove the device from the definitions in ``scope`` and return once the VMM
        confirms the guest released it. Raises DeviceRemovalTimeout or DeviceRemovalFailed,
        leaving the device in place."""
        ...

    async def watch(
        self,
        on_ended: Callable[[str], Awaitable[object]],
        *,
        task_status: trio.TaskStatus[None] = ...,
    ) -> None:
        """Call ``on_ended(instance)`` for each VM instance on this connection that ends,
        until cancelled; ``task_status.started()`` once it listens."""
        ...

    def close(self) -> None:
        """Let go of the connection."""
        ...
