"""The volume record as the registry stores it; pure data."""

from __future__ import annotations

import dataclasses
from typing import Literal

VolumeKind = Literal["named", "anonymous"]
KINDS: tuple[VolumeKind, ...] = ("named", "anonymous")
#: What holds a volume's data: a plain directory on the home's filesystem, or an ext4 image
#: of its own (``volumed.images``), loop-mounted at that directory, whose size is the cap.
Backing = Literal["directory", "image"]


@dataclasses.dataclass(frozen=True, slots=True)
class Volume:
    """A managed volume: what boxvold knows about it, never where a caller wants it."""

    id: str
    kind: VolumeKind
    created_at: str
    name: str | None = None
    labels: dict[str, str] = dataclasses.field(default_factory=dict)
    #: Hard size cap in bytes: the size of the volume's image (``backing == "image"``).
    #: Registries older than images may hold one on a directory volume: recorded, unenforced.
    size_bytes: int | None = None
    #: Inode count the image was made with (as asked; ext4 rounds it to whole inode-table
    #: blocks per block group, so the image has about this many).
    inode_limit: int | None = None
    #: For anonymous volumes: who the volume belongs to (a VM, a container...).
    consumer: str | None = None
    backing: Backing = "directory"

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
