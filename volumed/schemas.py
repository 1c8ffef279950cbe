"""Request and response shapes of the HTTP API, and the refusal of host-path fields.

Requests forbid unknown fields; a field that looks like a host path is refused by name
before anything else, because boxvol references volumes by name or id only. Responses are
declared here for the OpenAPI document.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator
from pydantic.json_schema import WithJsonSchema
from pydantic_core import PydanticCustomError

from volumed.exports import BACKEND_URI, EXPORT_ID, GUEST_PATH, MAX_ID, TAG, VM_INSTANCE, VM_NAME
from volumed.names import (
    CONSUMER,
    LABEL_FILTER,
    LABEL_KEY,
    LABEL_RULE,
    LABEL_VALUE,
    MAX_LABELS,
    NAME,
    NAME_FILTER,
    REFERENCE,
    check_labels,
    check_name,
    check_reference,
)
from volumed.sizes import (
    MAX_INODES,
    MAX_SIZE_BYTES,
    MIN_INODES,
    MIN_SIZE_BYTES,
    check_inodes,
    check_size,
)
from volumed.text import TextRule

#: Field names a client might use to smuggle a host path in: refused as a top-level field of
#: any request body and as a query parameter name (labels are free-form data, not fields).
HOST_PATH_FIELDS = frozenset(
    {
        "host_path",
        "hostpath",
        "path",
        "paths",
        "source",
        "src",
        "source_path",
        "mountpoint",
        "mount_point",
        "mount",
        "device",
        "dev",
        "dir",
        "directory",
        "bind",
        "binds",
        "bind_path",
        "host",
        "file",
        "filename",
        "location",
        "root",
        "volume_path",
        "data_dir",
    }
)
HOST_PATH_MESSAGE = (
    "field '{field}' looks like a host path, and boxvol never takes one: volumes are "
    "referenced by name or id. Create a volume with 'boxvol create NAME' and refer to it"
)


def refuse_host_path_fields(keys: Any) -> None:
    """Raise the ``host_path_refused`` validation error if any key names a host path."""
    for key in keys:
        if isinstance(key, str) and key.lower() in HOST_PATH_FIELDS:
            raise PydanticCustomError("host_path_refused", HOST_PATH_MESSAGE, {"field": key})


def _text(rule: TextRule) -> tuple[AfterValidator, WithJsonSchema]:
    """Metadata of a text field: checked by ``rule``, documented as ``rule`` states."""
    return AfterValidator(rule.check), WithJsonSchema(rule.json_schema())


def _check_name(name: str) -> str:
    return check_name(name)


# Each rule is checked by the code in volumed (messages for humans) and stated in the OpenAPI
# document from the same TextRule, so a generated client knows it.
NameText = Annotated[str, AfterValidator(_check_name), WithJsonSchema(NAME.json_schema())]
ReferenceText = Annotated[
    str, AfterValidator(check_reference), WithJsonSchema(REFERENCE.json_schema())
]
ConsumerText = Annotated[str, *_text(CONSUMER)]
VmText = Annotated[str, *_text(VM_NAME)]
TagText = Annotated[str, *_text(TAG)]
BackendUriText = Annotated[str, *_text(BACKEND_URI)]
VmInstanceText = Annotated[str, *_text(VM_INSTANCE)]
GuestPathText = Annotated[str, *_text(GUEST_PATH)]
ExportIdText = Annotated[str, *_text(EXPORT_ID)]
Labels = Annotated[
    dict[str, str],
    AfterValidator(check_labels),
    WithJsonSchema(
        {
            "type": "object",
            "maxProperties": MAX_LABELS,
            "propertyNames": LABEL_KEY.json_schema(),
            "additionalProperties": LABEL_VALUE.json_schema(),
            "description": LABEL_RULE + f"; at most {MAX_LABELS} labels",
        }
    ),
]
LabelFilterText = Annotated[str, *_text(LABEL_FILTER)]
NameFilterText = Annotated[str, *_text(NAME_FILTER)]
#: A boolean in a query string is exactly ``true`` or ``false``.
QueryBool = Literal["true", "false"]
Uid = Annotated[int, Field(ge=0, le=MAX_ID)]
SizeBytes = Annotated[
    int,
    AfterValidator(check_size),
    WithJsonSchema({"type": "integer", "minimum": MIN_SIZE_BYTES, "maximum": MAX_SIZE_BYTES}),
]
InodeCount = Annotated[
    int,
    AfterValidator(check_inodes),
    WithJsonSchema({"type": "integer", "minimum": MIN_INODES, "maximum": MAX_INODES}),
]


class Request(BaseModel):
    """Base of every request body: strict about unknown and host-path fields, and about
    types: a boolean is ``true`` or ``false``, an integer is a JSON integer (no strings, no
    floats), a string is a string."""

    model_config = ConfigDict(extra="forbid", strict=True)

    @model_validator(mode="before")
    @classmethod
    def _no_host_paths(cls, data: Any) -> Any:
        if isinstance(data, dict):
            refuse_host_path_fields(data.keys())
        return data


class CreateVolume(Request):
    """Create a named volume (``name`` given) or an anonymous one."""

    name: NameText | None = Field(
        default=None, description="Volume name; omit for an anonymous volume."
    )
    labels: Labels = Field(default_factory=dict)
    size_bytes: SizeBytes | None = Field(
        default=None,
        description="Hard size cap in bytes: the volume gets an ext4 image of this size, so "
        "writes past it fail with ENOSPC. At most the host's free space minus the reserve.",
    )
    inode_limit: InodeCount | None = Field(
        default=None, description="Inodes of the volume's image (needs size_bytes)."
    )
    consumer: ConsumerText | None = Field(
        default=None, description="Who an anonymous volume belongs to."
    )


class Owner(Request):
    """A uid/gid pair an export presents every file as."""

    uid: Uid
    gid: Uid


class VirtiofsConsumer(Request):
    """The guest a virtio-fs export is for."""

    vm: VmText = Field(description="Domain name.")
    tag: TagText = Field(description="virtio-fs tag in the guest.")
    backend: BackendUriText | None = Field(
        default=None,
        description="The VMM connection the attachment was made through (boxvol vm --connect); "
        "given together with instance.",
    )
    instance: VmInstanceText | None = Field(
        default=None, description="The VM instance on that backend (libvirt UUID; pid=N,start=T)."
    )
    guest_path: GuestPathText | None = Field(
        default=None, description="Where the guest mounts the share (a path in the guest)."
    )


class CreateExport(Request):
    """Export a volume (by name or id): a FUSE view, or a virtio-fs socket for one guest."""

    volume: ReferenceText = Field(description="Volume name, id or unique id prefix.")
    kind: Literal["fuse", "virtiofs"] = "fuse"
    read_only: bool = False
    owner: Owner | None = Field(
        default=None,
        description="Present every file as this uid/gid (FUSE views: fuse, or virtiofs via fuse).",
    )
    consumer: ConsumerText | VirtiofsConsumer | None = Field(
        default=None,
        description="fuse: a free-form label; virtiofs: {vm, tag} (required).",
    )
    cache: Literal["auto", "none", "always"] | None = Field(
        default=None,
        description="Kernel caching of the FUSE view (see docs/fuse.md); default: the "
        "daemon's export_cache setting (auto unless configured).",
    )
    via: Literal["direct", "fuse"] | None = Field(
        default=None,
        description="virtiofs only: serve the volume directly (default) or its FUSE view.",
    )


class ExportVolume(BaseModel):
    """The volume an export serves."""

    id: str
    name: str | None


class ExportOwner(BaseModel):
    """Ownership mapping of an export."""

    uid: int
    gid: int


class ExportConsumer(BaseModel):
    """The guest of a virtio-fs export, and the attachment record if one was given."""

    vm: str
    tag: str
    backend: str | None = None
    instance: str | None = None
    guest_path: str | None = None


class VirtiofsdStatus(BaseModel):
    """The virtiofsd behind a virtio-fs export."""

    pid: int | None
    restarts: int
    last_exit: int | None
    #: True while a virtiofsd adopted after a boxvold crash serves a FUSE view that died with
    #: that crash: the guest sees I/O errors on the share until it stops using it.
    source_lost: bool = False


class ServerStatus(BaseModel):
    """The server process behind an export's FUSE view (one per export)."""

    pid: int | None
    restarts: int
    last_exit: int | None


class ExportOut(BaseModel):
    """A live export."""

    id: str
    kind: Literal["fuse", "virtiofs"]
    volume: ExportVolume
    read_only: bool
    owner: ExportOwner | None
    cache: str
    consumer: str | ExportConsumer | None
    created_at: str
    mountpoint: str | None = Field(description="Where the FUSE view is, if there is one.")
    server: ServerStatus | None = Field(
        default=None, description="The process serving the FUSE view, if there is one."
    )
    via: Literal["direct", "fuse"] | None = None
    tag: str | None = None
    socket: str | None = Field(default=None, description="The vhost-user socket (virtiofs).")
    virtiofsd: VirtiofsdStatus | None = None


class ExportList(BaseModel):
    """Listing answer."""

    exports: list[ExportOut]


class PruneVolumes(Request):
    """Remove unused volumes: anonymous ones, or every unused one with ``all``."""

    all: bool = False


class ResizeVolume(Request):
    """Grow a sized volume (never shrink; only while it is not exported)."""

    size_bytes: SizeBytes


class ImageOut(BaseModel):
    """A sized volume's image: its filesystem's size and use, and what it takes on the host."""

    file: str = Field(description="The image, relative to boxvold's home.")
    size_bytes: int = Field(description="Size of the filesystem in the image (the cap).")
    used_bytes: int
    total_inodes: int = Field(description="Inodes the filesystem has (the inode cap).")
    used_inodes: int
    allocated_bytes: int = Field(description="Host blocks the sparse image file takes.")


class UsageOut(BaseModel):
    """What a volume takes now (``inspect`` of one volume)."""

    bytes: int
    inodes: int
    image: ImageOut | None


class VolumeOut(BaseModel):
    """A volume as the API reports it; there is deliberately no host path in it."""

    id: str
    name: str | None
    kind: Literal["named", "anonymous"]
    created_at: str
    labels: dict[str, str]
    size_bytes: int | None
    inode_limit: int | None
    consumer: str | None
    backing: Literal["directory", "image"] = Field(
        description="Where the data lives: a plain directory, or an ext4 image of its own "
        "whose size is the cap (volumes created with size_bytes)."
    )
    in_use: bool
    exports: int
    usage: UsageOut | None = Field(
        default=None, description="Measured for one volume (GET by reference), absent in lists."
    )


class VolumeList(BaseModel):
    """Listing answer."""

    volumes: list[VolumeOut]


class RemovedVolume(BaseModel):
    """What a removal took away."""

    id: str
    name: str | None
    kind: Literal["named", "anonymous"]


class RemoveAnswer(BaseModel):
    """Answer to a delete."""

    removed: RemovedVolume


class PruneAnswer(BaseModel):
    """Answer to a prune."""

    removed: list[RemovedVolume]
    reclaimed_bytes: int


class VolumeUsage(BaseModel):
    """Space one volume takes."""

    id: str
    name: str | None
    kind: Literal["named", "anonymous"]
    bytes: int
    inodes: int
    in_use: bool
    backing: Literal["directory", "image"]
    cap_bytes: int | None = Field(description="The size cap (sized volumes), else null.")
    cap_inodes: int | None = Field(description="Inodes the image has (sized volumes), else null.")
    allocated_bytes: int = Field(
        description="Host bytes the volume takes: its image's blocks, or the directory's."
    )


class UsageTotals(BaseModel):
    """Sums over every volume (or one kind)."""

    volumes: int
    bytes: int
    inodes: int


class CollectGarbage(Request):
    """Find what boxvol created and lost track of; reclaim it unless ``dry_run``."""

    dry_run: bool = False


class GcFinding(BaseModel):
    """One leftover (``volumed.gc.Finding``)."""

    kind: str
    what: str = Field(description="A path, an id or a pid.")
    bytes: int
    action: str = Field(description="quarantine (data kept), forget-row, delete, unlink, ...")
    detail: str


class GcAnswer(BaseModel):
    """Answer of ``/v1/system/gc``."""

    dry_run: bool
    findings: list[GcFinding]
    reclaimed_bytes: int = Field(
        description="Bytes freed (or that would be); quarantined data still takes its space."
    )


class ReserveOut(BaseModel):
    """boxvold's reserve (``boxvol reserve-release``)."""

    target_bytes: int
    present_bytes: int


class ReserveReleased(BaseModel):
    """Answer of ``/v1/system/reserve-release``."""

    released_bytes: int
    reserve: ReserveOut


class HostSpace(BaseModel):
    """Room left on the filesystem that holds the home."""

    total_bytes: int
    free_bytes: int
    total_inodes: int
    free_inodes: int


class DiskUsage(BaseModel):
    """Answer of ``/v1/system/df``."""

    volumes: list[VolumeUsage]
    totals: UsageTotals
    by_kind: dict[Literal["named", "anonymous"], UsageTotals]
    reserve: ReserveOut
    host: HostSpace
    measured_at: str = Field(
        description="When the volumes were walked (RFC 3339 UTC): an answer is reused for up "
        "to 2 seconds, so several callers at once cost one walk."
    )


class ReconcileEntry(BaseModel):
    """One repair made at start-up."""

    action: str
    kind: str
    key: str
    detail: str


class Health(BaseModel):
    """Answer of ``/v1/health``."""

    status: Literal["ok"]
    volumes: int
    reconciled: list[ReconcileEntry]


class Version(BaseModel):
    """Answer of ``/v1/version``."""

    version: str
    api_version: str


class ExportCount(BaseModel):
    """How many exports of one kind are in one state."""

    kind: Literal["fuse", "virtiofs"]
    state: Literal["serving", "unserved"] = Field(
        description="serving, or unserved: kept but not served (a foreign mount on its "
        "volume at start; docs/design.md)."
    )
    count: int


class Restarts(BaseModel):
    """Restarts since boxvold started (they only grow)."""

    fuse_server: int = Field(description="Export servers (FUSE views) that died and restarted.")
    virtiofsd: int = Field(description="virtiofsd processes that died and restarted.")


class SystemStatus(BaseModel):
    """Answer of ``/v1/system/status``: what ``boxvol status`` shows."""

    version: str
    api_version: str
    started_at: str = Field(description="When boxvold started (RFC 3339 UTC).")
    uptime_seconds: float
    volumes: dict[Literal["named", "anonymous"], int]
    exports: list[ExportCount]
    restarts: Restarts
    host: HostSpace
    reserve: ReserveOut


class ErrorBody(BaseModel):
    """``{"code", "message"}`` of every error answer."""

    code: str
    message: str


class ErrorAnswer(BaseModel):
    """Every error is answered as ``{"error": {...}}``."""

    error: ErrorBody


class RestoreVolume(Request):
    """Restore a volume from the tar stream passed with the request (docs/archives.md)."""

    force: bool = Field(
        default=False, description="Replace the content of a volume that is not empty."
    )


class ArchiveReport(BaseModel):
    """What an archive (or a restore) did; ``skipped`` and ``neutralised`` count entries by
    kind (docs/archives.md lists the kinds)."""

    entries: int = Field(description="Entries written.")
    bytes: int = Field(description="Bytes of file content.")
    skipped: dict[str, int] = Field(description="Entries left out, by kind.")
    neutralised: dict[str, int] = Field(description="Entries made harmless, by kind.")


class RestoreReport(ArchiveReport):
    """Answer to a restore."""

    created: bool = Field(description="The named volume did not exist and was created.")
