"""The gate: the one function that turns a volume record into its directory.

Every consumer of a volume's data (exports, usage, removal, GC) goes through
``volume_directory``. It accepts only a real directory exactly one level below one of the
two managed roots, judged after canonicalising both home and the candidate, so a symlink
planted under a root, a deeper path or the roots themselves never come out of it. Nor does a
directory that something else is mounted on (root's ``mount --bind``): that raises
``ForeignMount`` naming the mount, unless boxvold made that mount itself (``own_mounts``).
A sized volume's directory is the other way round: it must be the mount of its image, and
is refused (``ImageUnavailable``) while it is the bare directory under it.
Blocking: it stats the filesystem and reads ``/proc/self``.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Container

from volumed.errors import ForeignMount, ImageUnavailable, OutsideManagedRoots
from volumed.locations import Layout
from volumed.model import Volume
from volumed.mounts import fdinfo_mount_id, find_mount, parse_mountinfo
from volumed.names import is_valid_name, is_volume_id

#: The mounts boxvold made at volume directories itself, by mount id (as ``mnt_id`` in
#: ``/proc/self/fdinfo`` and the first field of ``/proc/self/mountinfo``): none here. The
#: store passes ``volumed.images.ImageMounts``, which records the id each image mount got
#: and forgets it when it unmounts — the kernel reuses ids.
NO_OWN_MOUNTS: frozenset[int] = frozenset()


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


def volume_directory(
    layout: Layout, volume: Volume, *, own_mounts: Container[int] = NO_OWN_MOUNTS
) -> str:
    """The canonical directory of ``volume``; raises OutsideManagedRoots otherwise, and
    ForeignMount if something boxvold did not mount (not in ``own_mounts``) is mounted on it.
    """
    fd, directory, _ = _open_checked(layout, volume, own_mounts)
    os.close(fd)
    return directory


def _open_checked(
    layout: Layout, volume: Volume, own_mounts: Container[int]
) -> tuple[int, str, os.stat_result]:
    """An ``O_PATH`` fd of the volume's directory, its path and its stat, every check passed.

    The checks that look at the directory are made on this very fd, so what a caller keeps
    is what was checked.
    """
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
    try:
        fd = os.open(canonical, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        raise _refuse(layout, canonical, f"it changed while it was being opened ({exc})") from None
    try:
        opened = _check_opened(
            layout, canonical, fd, st, own_mounts, image=volume.backing == "image"
        )
    except BaseException:
        os.close(fd)
        raise
    return fd, canonical, opened


def _check_opened(
    layout: Layout,
    directory: str,
    fd: int,
    checked: os.stat_result,
    own_mounts: Container[int],
    *,
    image: bool,
) -> os.stat_result:
    """The stat of ``fd`` if it is the very directory that was ``checked`` and nothing is
    mounted on it but what ``own_mounts`` allows; for an ``image`` volume, if it is one of
    those mounts."""
    opened = os.fstat(fd)
    if (opened.st_dev, opened.st_ino) != (checked.st_dev, checked.st_ino):
        raise _refuse(layout, directory, "it changed while it was being opened")
    root, key = os.path.split(directory)
    if image:
        if _mount_id(fd) not in own_mounts:
            raise ImageUnavailable(
                f"volume {key!r} is sized, and its image is not mounted at {directory} "
                "(boxvold mounts images as it starts; its log and the 'reconciled' list of "
                "GET /v1/health say why "
                "one was not), so nothing is served from the bare directory"
            )
        return opened
    _check_mount(f"volume {key!r}", directory, root, fd, own_mounts)
    return opened


def check_not_mounted_over(
    parent: str, name: str, *, own_mounts: Container[int] = NO_OWN_MOUNTS
) -> None:
    """Raise ForeignMount if ``parent/name`` (of any type) is a mount point boxvold did not
    make. For entries that are not volumes (yet), which reconciliation would otherwise adopt
    or quarantine *through* the mount. Raises FileNotFoundError if there is no such entry.
    """
    parent_fd = os.open(parent, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        # O_PATH | O_NOFOLLOW opens a symlink itself, and crosses a mount on the last
        # component like every lookup does: exactly the entry a rename or chmod would hit.
        fd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent_fd)
    finally:
        os.close(parent_fd)
    try:
        _check_mount(f"entry {name!r}", os.path.join(parent, name), parent, fd, own_mounts)
    finally:
        os.close(fd)


def _check_mount(what: str, path: str, parent: str, fd: int, own_mounts: Container[int]) -> None:
    # A bind mount of a directory of the same filesystem has the same st_dev, so the mount
    # ids are compared: a directory reached through another mount than its parent's is a
    # mount point.
    mount_id = _mount_id(fd)
    if mount_id in own_mounts:
        return
    parent_fd = os.open(parent, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        parent_mount_id = _mount_id(parent_fd)
    finally:
        os.close(parent_fd)
    if mount_id != parent_mount_id:
        raise foreign_mount(what, path, mount_id)


def _mount_id(fd: int) -> int:
    with open(f"/proc/self/fdinfo/{fd}", encoding="ascii") as info:
        return fdinfo_mount_id(info.read())


def foreign_mount(what: str, path: str, mount_id: int) -> ForeignMount:
    """The error for a mount (``mount_id``) found at ``path``, naming it. Blocking: reads
    ``/proc/self/mountinfo``."""
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as table:
        entry = find_mount(parse_mountinfo(table.read()), mount_id)
    mounted = entry.describe() if entry is not None else f"mount id {mount_id}"
    return ForeignMount(
        f"refusing {what}: {path} is a mount point boxvold did not make ({mounted} is "
        f"mounted on it); boxvol never serves, measures or removes data through a mount it "
        f"did not make. Unmount it (umount {path}) and try again"
    )


def check_volume_path(
    layout: Layout, path: str, *, own_mounts: Container[int] = NO_OWN_MOUNTS
) -> str:
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
    return volume_directory(layout, record, own_mounts=own_mounts)


def open_volume_directory(
    layout: Layout, volume: Volume, *, own_mounts: Container[int] = NO_OWN_MOUNTS
) -> tuple[int, os.stat_result]:
    """An ``O_PATH`` fd of the volume's directory, opened through the gate.

    The final component is opened without following symlinks and must be the very
    directory the gate accepted, so a swap between the check and the open is refused; the
    mount check is made on the fd itself. Blocking.
    """
    fd, _, st = _open_checked(layout, volume, own_mounts)
    return fd, st
