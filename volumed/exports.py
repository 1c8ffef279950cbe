"""Exports: what boxvold serves a volume as, and under which policy; pure data and rules.

An export is a view of exactly one volume. Its policy (read-only, ownership mapping, kernel
cache) is fixed when it is created. Must not import pyfuse3 or trio.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Literal

from volumed.errors import InvalidArgument
from volumed.names import CONSUMER
from volumed.text import SAFE_TEXT_RULE, UNSAFE_CHARS, TextRule

ExportKind = Literal["fuse", "virtiofs"]
EXPORT_KINDS: tuple[ExportKind, ...] = ("fuse", "virtiofs")
Via = Literal["direct", "fuse"]
MAX_TAG_BYTES = 36
#: The virtio-fs tag a guest mounts (the device's config space holds 36 bytes; ASCII only).
TAG = TextRule(
    "tag",
    r"^[A-Za-z0-9._-]+$",
    MAX_TAG_BYTES,
    rule=f"a virtio-fs tag is 1 to {MAX_TAG_BYTES} letters, digits, '.', '_' and '-'",
)
TAG_RULE = TAG.rule
#: An export id: a ULID, in any case.
EXPORT_ID = TextRule(
    "export id",
    r"^[0-9A-HJKMNP-TV-Za-hjkmnp-tv-z]+$",
    26,
    26,
    "an export id is the 26-character id 'boxvol export ls' shows",
)
MAX_VM_NAME_CHARS = 255
#: A VM (domain) name as a consumer names it: free text without '/'.
VM_NAME = TextRule(
    "VM name",
    f"^[^/{UNSAFE_CHARS}]+$",
    MAX_VM_NAME_CHARS,
    rule=(f"give the domain's name: 1 to {MAX_VM_NAME_CHARS} characters, no '/', {SAFE_TEXT_RULE}"),
)
#: The VMM connection an attachment was made through, as ``boxvol vm --connect`` took it
#: (``qemu:///system``, ``qmp:///run/vm/qmp.sock``, ``ch:///run/vm/api.sock``).
BACKEND_URI = TextRule(
    "backend URI",
    rf"^[A-Za-z][A-Za-z0-9+.-]*:[^\s{UNSAFE_CHARS}]*$",
    512,
    rule="a VMM connection URI (SCHEME:...), up to 512 characters without spaces or controls",
)
#: What identifies one VM instance on its backend (libvirt's UUID; pid=N,start=T).
VM_INSTANCE = TextRule(
    "VM instance",
    r"^[A-Za-z0-9=,._:-]+$",
    128,
    rule="a VM instance id: 1 to 128 letters, digits and '=,._:-'",
)
MAX_GUEST_PATH_CHARS = 4096
#: Where the guest mounts an attachment (recorded for ``boxvol vm ls``; never a host path).
GUEST_PATH = TextRule(
    "guest path",
    f"^/[^{UNSAFE_CHARS}]*$",
    MAX_GUEST_PATH_CHARS,
    rule=(
        f"an absolute path in the guest, up to {MAX_GUEST_PATH_CHARS} characters, {SAFE_TEXT_RULE}"
    ),
)
MAX_ID = (1 << 32) - 2  # uid/gid 4294967295 is (uid_t)-1, "no change"


@dataclasses.dataclass(frozen=True, slots=True)
class CachePolicy:
    """How long the kernel may trust what the export told it."""

    #: Seconds a name lookup stays valid in the kernel.
    entry_timeout: float
    #: Seconds the kernel may remember that a name does not exist. Short: a program that
    #: looks a name up and then creates it (every create through a virtiofsd stacked on
    #: the view does) is spared a second lookup, while a name created elsewhere shows
    #: within this long.
    negative_timeout: float
    #: Seconds attributes (size, mtime, mode) stay valid without asking the daemon.
    attr_timeout: float
    #: Keep file pages cached across opens; libfuse's auto_inval_data still drops them
    #: when a later getattr shows the file changed (mtime or size).
    keep_cache: bool


#: ``auto`` (the default) lets the kernel trust names and attributes for 5 seconds and keep
#: file pages across opens. Stats, opens and reads of files seen in the last 5 s are then
#: answered by the kernel at native speed, without the daemon. The price is freshness when
#: the volume is also changed elsewhere (another export of it, a virtiofsd serving it, the
#: host): such a change can go unseen for up to 5 s (an old size, mtime, mode or name, and
#: the old pages until a getattr shows the new mtime or size), and a name created there can
#: take 1 s to show if it was looked up just before. Changes made through the export itself
#: are seen at once. Why 5 and not 1: a program that walks a tree and comes
#: back to it (a build, a test run, ``git status``; bench/fuse.py's warm stat, after an
#: untimed pass over 5,000 files that takes 1-1.5 s at the daemon's speed) found all it had
#: seen expired, and each stat cost a trip to the daemon: 0.01x native against 1.5x with
#: 5 s (10 s measured the same). 5 s stays at the short end of what network file systems
#: use (NFS keeps attributes 3 to 60 s). ``none`` asks the daemon every time (always
#: fresh, slowest): for a volume changed by several parties at once. ``always`` trusts the
#: cache for ten minutes: for a volume that only this export changes.
CACHE_POLICIES: dict[str, CachePolicy] = {
    "auto": CachePolicy(entry_timeout=5.0, negative_timeout=1.0, attr_timeout=5.0, keep_cache=True),
    "none": CachePolicy(
        entry_timeout=0.0, negative_timeout=0.0, attr_timeout=0.0, keep_cache=False
    ),
    "always": CachePolicy(
        entry_timeout=600.0, negative_timeout=600.0, attr_timeout=600.0, keep_cache=True
    ),
}
DEFAULT_CACHE = "auto"


@dataclasses.dataclass(frozen=True, slots=True)
class ExportPolicy:
    """The rules an export enforces on its volume."""

    read_only: bool = False
    #: Present every file as this (uid, gid); None passes ownership through.
    owner: tuple[int, int] | None = None
    cache: str = DEFAULT_CACHE

    @property
    def cache_policy(self) -> CachePolicy:
        """The kernel cache settings of ``cache``."""
        return CACHE_POLICIES[self.cache]

    def to_json(self) -> dict[str, Any]:
        """As stored in the registry and shown by the API."""
        owner = None if self.owner is None else {"uid": self.owner[0], "gid": self.owner[1]}
        return {"read_only": self.read_only, "owner": owner, "cache": self.cache}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ExportPolicy:
        """Inverse of ``to_json``."""
        owner = data.get("owner")
        return cls(
            read_only=bool(data.get("read_only", False)),
            owner=None if owner is None else (int(owner["uid"]), int(owner["gid"])),
            cache=str(data.get("cache", DEFAULT_CACHE)),
        )


def check_policy(policy: ExportPolicy) -> ExportPolicy:
    """Return ``policy`` if it is valid, else raise InvalidArgument naming the problem."""
    if policy.cache not in CACHE_POLICIES:
        raise InvalidArgument(
            f"invalid cache mode {policy.cache!r}: give one of " + ", ".join(CACHE_POLICIES)
        )
    if policy.owner is not None:
        for what, value in zip(("uid", "gid"), policy.owner, strict=True):
            if not 0 <= value <= MAX_ID:
                raise InvalidArgument(f"invalid owner {what} {value}: give 0 to {MAX_ID}")
    return policy


def check_consumer(consumer: str | None) -> str | None:
    """Return a valid free-form consumer label (or None)."""
    return None if consumer is None else CONSUMER.check(consumer)


def check_tag(tag: str) -> str:
    """Return a valid virtio-fs tag, else raise InvalidArgument stating the rule."""
    return TAG.check(tag)


def check_vm_name(vm: str) -> str:
    """Return a plausible VM (domain) name, else raise InvalidArgument."""
    return VM_NAME.check(vm)


def check_target(target: VirtiofsTarget) -> VirtiofsTarget:
    """Return ``target`` if each of its fields holds to its rule, else raise InvalidArgument;
    a record names its backend and its VM instance together or neither."""
    check_vm_name(target.vm)
    check_tag(target.tag)
    if (target.backend is None) != (target.instance is None):
        raise InvalidArgument(
            "an attachment record names both the backend and the VM instance, or neither"
        )
    if target.backend is not None:
        BACKEND_URI.check(target.backend)
    if target.instance is not None:
        VM_INSTANCE.check(target.instance)
    if target.guest_path is not None:
        GUEST_PATH.check(target.guest_path)
    return target


@dataclasses.dataclass(frozen=True, slots=True)
class VirtiofsTarget:
    """Which guest a virtio-fs export is for, and the tag it appears under there."""

    vm: str
    tag: str
    #: ``direct``: virtiofsd serves the volume directory (fastest); ``fuse``: it serves the
    #: export's FUSE view, so the FUSE policy applies. Read-only always goes through the
    #: FUSE view: libvirt 9.0 ignores <readonly/> for an external virtiofsd.
    via: Via = "direct"
    #: The attachment record ``boxvol vm`` keeps here (vmdriver.attachments): the VMM
    #: connection, the VM instance on it and the guest path. None for a bare export.
    backend: str | None = None
    instance: str | None = None
    guest_path: str | None = None

    @property
    def guest(self) -> tuple[str | None, str]:
        """Who the tag must be unique for: the VM instance on its backend when recorded (two
        VMs of one name on two VMMs are two guests), else the VM's name."""
        if self.backend is not None and self.instance is not None:
            return (self.backend, self.instance)
        return (None, self.vm)

    def consumer_json(self) -> dict[str, Any]:
        """The API's ``consumer`` of this export: the record fields only when set."""
        body: dict[str, Any] = {"vm": self.vm, "tag": self.tag}
        for field in ("backend", "instance", "guest_path"):
            value = getattr(self, field)
            if value is not None:
                body[field] = value
        return body


@dataclasses.dataclass(frozen=True, slots=True)
class Export:
    """A live export of one volume."""

    id: str
    volume_id: str
    kind: ExportKind
    policy: ExportPolicy
    created_at: str
    consumer: str | None = None
    virtiofs: VirtiofsTarget | None = None

    @property
    def served_by_fuse_view(self) -> bool:
        """True if the export has a FUSE view (every FUSE export, and virtio-fs exports that
        go through it: via=fuse, or read-only)."""
        if self.virtiofs is None:
            return True
        return self.virtiofs.via == "fuse" or self.policy.read_only

    def spec(self) -> dict[str, Any]:
        """What the registry stores besides id, volume, kind and time."""
        spec: dict[str, Any] = {**self.policy.to_json(), "consumer": self.consumer}
        if self.virtiofs is not None:
            spec["virtiofs"] = dataclasses.asdict(self.virtiofs)
        return spec

    @classmethod
    def from_row(
        cls, export_id: str, volume_id: str, kind: str, created_at: str, spec: dict[str, Any]
    ) -> Export:
        """Inverse of storing ``spec()`` with the other columns."""
        target = spec.get("virtiofs")
        return cls(
            id=export_id,
            volume_id=volume_id,
            kind="virtiofs" if kind == "virtiofs" else "fuse",
            policy=ExportPolicy.from_json(spec),
            created_at=created_at,
            consumer=spec.get("consumer") if isinstance(spec.get("consumer"), str) else None,
            virtiofs=None
            if not isinstance(target, dict)
            else VirtiofsTarget(
                vm=str(target["vm"]),
                tag=str(target["tag"]),
                via="fuse" if target.get("via") == "fuse" else "direct",
                backend=_optional_text(target.get("backend")),
                instance=_optional_text(target.get("instance")),
                guest_path=_optional_text(target.get("guest_path")),
            ),
        )


def _optional_text(value: object) -> str | None:
    return value if isinstance(value, str) else None


def encode_export(export: Export) -> str:
    """An export's registry row as one JSON text (what boxvold hands an export server)."""
    return json.dumps(
        {
            "id": export.id,
            "volume_id": export.volume_id,
            "kind": export.kind,
            "created_at": export.created_at,
            "spec": export.spec(),
        }
    )


def decode_export(text: str) -> Export:
    """Inverse of ``encode_export``."""
    row = json.loads(text)
    return Export.from_row(row["id"], row["volume_id"], row["kind"], row["created_at"], row["spec"])
