"""The volume record as the registry stores it; pure data."""

from __future__ import annotations

import dataclasses
from typing import Literal

VolumeKind = Literal["named", "anonymous"]
KINDS: tuple[VolumeKind, ...] = ("named", "anonymous")


@dataclasses.dataclass(frozen=True, slots=True)
class Volume:
    """A managed volume: what boxvold knows about it, never where a caller wants it."""

    id: str
    kind: VolumeKind
    created_at: str
    name: str | None = None
    labels: dict[str, str] = dataclasses.field(default_factory=dict)
    #: Hard size cap in bytes; recorded now, enforced by loop-mounted images later.
    size_bytes: int | None = None
    #: Inode cap; recorded now, enforced later.
    inode_limit: int | None = None
    #: For anonymous volumes: who the volume belongs to (a VM, a container...).
    consumer: str | None = None

    @property
    def key(self) -> str:
        """The directory name under the kind's managed root: the name, or the id."""
        return self.name if self.name is not None else self.id


@dataclasses.dataclass(frozen=True, slots=True)
class ListFilter:
    """Which volumes a listing keeps; every given criterion must hold."""

    kind: VolumeKind | None = None
    #: (key, value) pairs; a value of None matches any value of the key.
    labels: tuple[tuple[str, str | None], ...] = ()
    #: Substring of the name (or of the id, for anonymous volumes).
    name_contains: str | None = None
    #: True: only volumes with live exports; False: only those without ("dangling").
    in_use: bool | None = None
