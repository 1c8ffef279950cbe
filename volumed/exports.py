"""Exports: what boxvold serves a volume as, and under which policy; pure data and rules.

An export is a view of exactly one volume. Its policy (read-only, ownership mapping, kernel
cache) is fixed when it is created. Must not import pyfuse3 or trio.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

from volumed.errors import InvalidArgument

ExportKind = Literal["fuse"]
EXPORT_KINDS: tuple[ExportKind, ...] = ("fuse",)
MAX_CONSUMER_BYTES = 256
MAX_ID = (1 << 32) - 2  # uid/gid 4294967295 is (uid_t)-1, "no change"


@dataclasses.dataclass(frozen=True, slots=True)
class CachePolicy:
    """How long the kernel may trust what the export told it."""

    #: Seconds a name lookup (and a negative one) stays valid in the kernel.
    entry_timeout: float
    #: Seconds attributes (size, mtime, mode) stay valid without asking the daemon.
    attr_timeout: float
    #: Keep file pages cached across opens; libfuse's auto_inval_data still drops them
    #: when a later getattr shows the file changed (mtime or size).
    keep_cache: bool


#: ``auto`` (the default) trusts the kernel cache for one second: reads and stats of
#: unchanged files are served by the kernel at native speed, and a change made to the
#: volume elsewhere (another export, a virtiofsd, the host) shows within about a second.
#: ``none`` asks the daemon every time (always fresh, slow); ``always`` trusts the cache
#: for ten minutes and suits a volume that only this export changes.
CACHE_POLICIES: dict[str, CachePolicy] = {
    "auto": CachePolicy(entry_timeout=1.0, attr_timeout=1.0, keep_cache=True),
    "none": CachePolicy(entry_timeout=0.0, attr_timeout=0.0, keep_cache=False),
    "always": CachePolicy(entry_timeout=600.0, attr_timeout=600.0, keep_cache=True),
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
    if consumer is not None and (
        not consumer or len(consumer.encode()) > MAX_CONSUMER_BYTES or "\n" in consumer
    ):
        raise InvalidArgument(
            f"invalid consumer {consumer!r}: give a one-line label of 1 to "
            f"{MAX_CONSUMER_BYTES} bytes"
        )
    return consumer


@dataclasses.dataclass(frozen=True, slots=True)
class Export:
    """A live export of one volume."""

    id: str
    volume_id: str
    kind: ExportKind
    policy: ExportPolicy
    created_at: str
    consumer: str | None = None
