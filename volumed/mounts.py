"""The kernel's mount tables as text: what ``/proc/self/fdinfo/<fd>`` and
``/proc/self/mountinfo`` say, parsed by pure functions so the gate can tell a volume directory
from a mount over one, and name that mount to the operator.

Pure: no I/O, no syscalls; the gate reads the files and hands the text in. Imports only the
standard library.
"""

from __future__ import annotations

import dataclasses
import os
import re

_OCTAL_ESCAPE = re.compile(r"\\([0-7]{3})")


@dataclasses.dataclass(frozen=True, slots=True)
class MountEntry:
    """One line of ``/proc/self/mountinfo`` (proc(5)); paths unescaped."""

    mount_id: int
    parent_id: int
    #: The directory of the source filesystem that is mounted: ``/`` for a whole filesystem,
    #: the bound directory (relative to its filesystem's root) for a bind mount.
    root: str
    #: Where it is mounted, relative to this process's root.
    mount_point: str
    fs_type: str
    #: The filesystem's source (a device, or whatever the mounter named: ``tmpfs``, ``fuse``).
    source: str

    def describe(self) -> str:
        """The mount as an operator would look for it in ``findmnt``."""
        what = self.source if self.root == "/" else f"{self.source}[{self.root}]"
        return f"{what} ({self.fs_type}, mount id {self.mount_id})"


def fdinfo_mount_id(text: str) -> int:
    """The ``mnt_id`` of an fd, from the text of ``/proc/self/fdinfo/<fd>``.

    It is the mount the fd's file was reached through — the same id ``mountinfo`` lists
    first — so two directories on one filesystem (equal ``st_dev``) still differ here when
    one of them is a bind mount.
    """
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() == "mnt_id":
            return int(value.strip())
    raise ValueError("fdinfo has no mnt_id line (the kernel predates 3.15?)")


def unescape(field: str) -> str:
    """Undo the kernel's octal escapes (``\\040`` for a space, ``\\134`` for a backslash…)."""
    return _OCTAL_ESCAPE.sub(lambda m: chr(int(m.group(1), 8)), field)


def parse_mountinfo(text: str) -> list[MountEntry]:
    """Every mount in the text of ``/proc/self/mountinfo``, in its order.

    A line is ``ID PARENT MAJ:MIN ROOT MOUNT_POINT OPTIONS [OPTIONAL...] - FSTYPE SOURCE
    SUPER_OPTIONS``; the optional fields vary in number, so the fields after them are found
    from the ``-`` separator. Lines that do not have that shape are skipped.
    """
    entries = []
    for line in text.splitlines():
        fields = line.split(" ")
        try:
            separator = fields.index("-", 6)
            entries.append(
                MountEntry(
                    mount_id=int(fields[0]),
                    parent_id=int(fields[1]),
                    root=unescape(fields[3]),
                    mount_point=unescape(fields[4]),
                    fs_type=unescape(fields[separator + 1]),
                    source=unescape(fields[separator + 2]),
                )
            )
        except (ValueError, IndexError):
            continue
    return entries


def find_mount(entries: list[MountEntry], mount_id: int) -> MountEntry | None:
    """The mount with ``mount_id``, if it is still listed."""
    return next((entry for entry in entries if entry.mount_id == mount_id), None)


def mounts_below(entries: list[MountEntry], directory: str) -> list[MountEntry]:
    """Mounts strictly inside ``directory`` (canonical, absolute), in the table's order.

    A mount on a directory inside a volume is reached by anything that walks the volume, so
    a removal must not delete through it.
    """
    prefix = directory.rstrip(os.sep) + os.sep
    return [entry for entry in entries if entry.mount_point.startswith(prefix)]
