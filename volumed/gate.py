"""The gate: the one function that turns a volume record into its directory.

Every consumer of a volume's data (exports, usage, removal, GC) goes through
``volume_directory``. It accepts only a real directory exactly one level below one of the
two managed roots, judged after canonicalising both home and the candidate, so a symlink
planted under a root, a deeper path or the roots themselves never come out of it.
Blocking: it stats the filesystem.
"""

from __future__ import annotations

import os
import stat

from volumed.errors import OutsideManagedRoots
from volumed.locations import Layout
from volumed.model import Volume
from volumed.names import is_valid_name, is_volume_id


def _refuse(layout: Layout, what: str, why: str) -> OutsideManagedRoots:
    return OutsideManagedRoots(
        f"refusing {what}: {why}; only a directory directly inside {layout.named} or "
        f"{layout.anonymous} is a volume. If a volume's directory was replaced or moved, "
        "restart boxvold so it reconciles the registry with the disk"
    )


def managed_roots(layout: Layout) -> tuple[str, str]:
    """The canonical named and anonymous roots."""
    home = os.path.realpath(layout.home)
    canonical = Layout(home)
    return canonical.named, canonical.anonymous


def volume_directory(layout: Layout, volume: Volume) -> str:
    """The canonical directory of ``volume``; raises OutsideManagedRoots otherwise."""
    key = volume.key
    if volume.kind == "named":
        valid_key = volume.name is not None and is_valid_name(key)
    else:
        valid_key = volume.name is None and is_volume_id(key)
    if not valid_key:
        raise _refuse(layout, f"volume {key!r}", "its key is not a valid volume name or id")
    named_root, anonymous_root = managed_roots(layout)
    root = named_root if volume.kind == "named" else anonymous_root
    candidate = os.path.join(root, key)
    canonical = os.path.realpath(candidate)
    if canonical != candidate:
        raise _refuse(layout, candidate, f"it resolves to {canonical}")
    try:
        st = os.lstat(canonical)
    except FileNotFoundError:
        raise _refuse(layout, candidate, "it does not exist") from None
    if not stat.S_ISDIR(st.st_mode):
        raise _refuse(layout, candidate, "it is not a directory")
    return canonical


def check_volume_path(layout: Layout, path: str) -> str:
    """Canonicalise an arbitrary path and accept it only if it is a volume directory.

    For consumers that come across a path (e.g. a mount table) rather than a record.
    """
    named_root, anonymous_root = managed_roots(layout)
    canonical = os.path.realpath(path)
    parent, key = os.path.split(canonical)
    if parent == named_root and is_valid_name(key):
        kind = "named"
    elif parent == anonymous_root and is_volume_id(key):
        kind = "anonymous"
    else:
        raise _refuse(layout, path, f"it resolves to {canonical}")
    record = Volume(
        id=key if kind == "anonymous" else "",
        kind=kind,  # type: ignore[arg-type]
        created_at="",
        name=key if kind == "named" else None,
    )
    return volume_directory(layout, record)


def open_volume_directory(layout: Layout, volume: Volume) -> tuple[int, os.stat_result]:
    """An ``O_PATH`` fd of the volume's directory, opened through the gate.

    The final component is opened without following symlinks and must be the very
    directory the gate accepted, so a swap between the check and the open is refused.
    Blocking.
    """
    directory = volume_directory(layout, volume)
    checked = os.lstat(directory)
    fd = os.open(directory, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    st = os.fstat(fd)
    if (st.st_dev, st.st_ino) != (checked.st_dev, checked.st_ino):
        os.close(fd)
        raise _refuse(layout, directory, "it changed while it was being opened")
    return fd, st
