"""The VM driver's vocabulary: scopes, attachments, lifecycle events, and its errors.

What the attach workflow (``vmdriver.attachments``) and every backend (``vmdriver.backends``)
share: the ``Attachment`` that ``boxvol vm ls`` prints, the ``Scope`` of a change (the running
guest, the persistent definition), what a release let go, and one error hierarchy mapped to
exit codes by the CLI.

Pure: no libvirt, no trio at import time.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, Literal

from volumed.errors import BoxvolError, Conflict, InvalidArgument, NotFound
from volumed.specs import VolumeSpec

Via = Literal["direct", "fuse"]
VIAS: tuple[Via, ...] = ("direct", "fuse")


@dataclasses.dataclass(frozen=True, slots=True)
class Scope:
    """Which definitions an operation changes: the running guest, the persistent one, both.

    ``None`` where a Scope is optional means the default: the running guest and the persistent
    definition if the domain runs (only the running guest for a transient domain), the
    persistent definition if it does not.
    """

    live: bool
    config: bool

    def __post_init__(self) -> None:
        if not (self.live or self.config):
            raise InvalidArgument("an operation must affect the live guest, its config, or both")

    def __str__(self) -> str:
        return "+".join(n for n, on in (("live", self.live), ("config", self.config)) if on)


@dataclasses.dataclass(frozen=True, slots=True)
class VolumeRef:
    """The volume behind an attachment."""

    id: str
    name: str | None

    def __str__(self) -> str:
        return self.name or self.id


@dataclasses.dataclass(frozen=True, slots=True)
class Attachment:
    """One boxvol volume attached to one domain as one virtio-fs share."""

    domain: str
    #: The virtio-fs tag the guest mounts (``mount -t virtiofs TAG PATH``).
    tag: str
    #: Where the spec asked for it in the guest; recorded in the domain's metadata.
    guest_path: str
    read_only: bool
    #: boxvold's export serving it (None if the record is gone but a device remains).
    export_id: str | None
    volume: VolumeRef | None
    via: Via | str = "direct"
    #: The device's user alias (``ua-boxvol-...``), which DEVICE_REMOVED events carry.
    alias: str | None = None
    #: The vhost-user socket QEMU connects to (boxvold's; never a volume path).
    socket: str | None = None
    #: Present in the running guest.
    live: bool = False
    #: Present in the persistent definition (the next boot has it).
    config: bool = False

    def to_json(self) -> dict[str, Any]:
        """As ``boxvol vm ls --format json`` prints it."""
        return {
            "domain": self.domain,
            "tag": self.tag,
            "guest_path": self.guest_path,
            "read_only": self.read_only,
            "export_id": self.export_id,
            "volume": None
            if self.volume is None
            else {"id": self.volume.id, "name": self.volume.name},
            "via": self.via,
            "alias": self.alias,
            "socket": self.socket,
            "live": self.live,
            "config": self.config,
        }


@dataclasses.dataclass(frozen=True, slots=True)
class PrepareResult:
    """What ``prepare`` changed in a domain's persistent definition."""

    domain: str
    changes: tuple[str, ...]
    #: The domain runs, and shared memory only takes effect when it boots again.
    restart_needed: bool


@dataclasses.dataclass(frozen=True, slots=True)
class Released:
    """What was let go for a domain that no longer exists."""

    domain: str
    exports: tuple[str, ...]
    volumes: tuple[str, ...]
    #: Anonymous volumes that could not be removed (in use elsewhere), with why.
    kept: tuple[tuple[str, str], ...] = ()


#: ``gone``: found missing when the watcher (re)connected, not seen as an event.
LifecycleKind = Literal["defined", "undefined", "started", "stopped", "gone", "other"]


@dataclasses.dataclass(frozen=True, slots=True)
class LifecycleEvent:
    """A domain lifecycle event as the watcher saw it, and what it did about it."""

    domain: str
    #: The VM instance (libvirt's UUID; ``pid=N,start=T`` for a VMM process), as the event
    #: or boxvold's records name it.
    uuid: str | None
    kind: LifecycleKind
    #: Set when the domain was gone and its exports and anonymous volumes were released.
    released: Released | None = None


# -- errors -----------------------------------------------------------------------------


class VMDriverError(BoxvolError):
    """A VM operation failed."""

    code = "vm_error"


class DomainNotFound(NotFound):
    """No domain of that name on the connection."""

    code = "domain_not_found"


class AttachmentNotFound(NotFound):
    """The domain has no boxvol attachment with that tag or guest path."""

    code = "attachment_not_found"


class DomainNotPrepared(Conflict):
    """The domain cannot take virtio-fs yet (no shared memory); ``boxvol vm prepare``."""

    code = "domain_not_prepared"


class DomainStateConflict(Conflict):
    """The operation does not fit the domain's state (e.g. ``--live`` on a stopped one)."""

    code = "domain_state"


class DomainBusy(Conflict):
    """Another VM driver process is changing the same domain."""

    code = "domain_busy"


class HypervisorUnavailable(VMDriverError):
    """The hypervisor connection could not be opened or was lost."""

    code = "hypervisor_unavailable"


class HypervisorError(VMDriverError):
    """The hypervisor refused or failed an operation."""

    code = "hypervisor_error"


class DeviceRemovalTimeout(VMDriverError):
    """The guest did not release a device in time; its export was left running."""

    code = "device_removal_timeout"


class DeviceRemovalFailed(VMDriverError):
    """The hypervisor reported that the guest refused to release a device."""

    code = "device_removal_failed"


def check_specs_against(specs: Sequence[VolumeSpec], existing: Sequence[Attachment]) -> None:
    """Refuse specs whose guest path an existing attachment already uses."""
    used = {a.guest_path: a for a in existing}
    for spec in specs:
        if spec.guest_path in used:
            a = used[spec.guest_path]
            raise InvalidArgument(
                f"{a.domain} already has {a.volume or 'a volume'} at {spec.guest_path} "
                f"(tag {a.tag}); detach it first or choose another guest path"
            )
